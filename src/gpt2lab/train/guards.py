"""The end of a training step: clip the gradients, check that the step is finite, update the model.

A non-finite loss or gradient norm is divergence: the run stops with one line naming the step, and no
non-finite weights ever reach a checkpoint; with ``skip_nonfinite`` such steps are skipped and counted.

The lean path (float32 and bfloat16 with a fused AdamW, i.e. on CUDA and CPU) never reads the device
during a step. The finiteness flag stays on the device and goes to the optimizer the way
``torch.amp.GradScaler`` hands its overflow flag over (``optimizer.found_inf``): the fused kernel skips
the update of a non-finite step on the device, step counts included. The first bad step (its number,
loss and gradient norm) and the count of bad steps are kept on the device too, and read by
:meth:`StepGuard.check` only where the run reads the device anyway: at log steps, evaluations, and
before every checkpoint write, so a diverged run stops there before anything is saved.

The host path reads the flags every step: float16 (the loss scaler must tell an overflow, which is
routine, from divergence, and reads its own flag every step anyway) and optimizers without the fused
kernel (``foreach``, on other devices), which cannot skip an update on the device.
"""

from __future__ import annotations

import math

import torch

from gpt2lab.errors import GPT2LabError
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.distributed import Dist


def divergence_error(step: int, loss: float, norm: float, saved_step: int) -> GPT2LabError:
    saved = f"the last checkpoint (step {saved_step}) is intact" if saved_step else "no checkpoint was written"
    return GPT2LabError(
        f"training diverged at step {step}: loss {loss:.4g}, gradient norm {norm:.4g}; that step did not update "
        f"the model, nothing since was saved, and {saved}; lower lr, or set skip_nonfinite = true to skip such steps"
    )


class StepGuard:
    """Clips, checks and applies each step's gradients; keeps the counts of skipped and overflowed steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        dist: Dist,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        skipped: int = 0,
        overflows: int = 0,
    ) -> None:
        self.cfg, self.dist, self.optimizer, self.scaler = cfg, dist, optimizer, scaler
        self.lean = not scaler.is_enabled() and bool(optimizer.defaults.get("fused"))
        self.skipped = skipped  # steps skipped for a non-finite loss or gradient (skip_nonfinite)
        self.overflows = overflows  # fp16 steps skipped because the scaled gradients overflowed
        self.params = params  # in the model's order: the norm sums them in that order
        device = dist.device
        # On the device (lean path): [first bad step or -1, bad steps so far], and that step's loss and norm.
        self._counts = torch.tensor([-1, skipped], dtype=torch.int64, device=device)
        self._first_values = torch.zeros(2, dtype=torch.float32, device=device)

    def apply(self, step: int, loss: torch.Tensor, saved_step: int) -> torch.Tensor:
        """Clip, check and (if finite) apply step ``step``'s gradients; returns the gradient norm before
        clipping (on the device). ``loss`` is this process's mean loss of the step; ``saved_step`` the step
        of the last checkpoint, for the divergence message."""
        self.scaler.unscale_(self.optimizer)  # fp16: clipping and the check see the true gradients
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grads = [p for p in self.params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        if self.lean:
            self._apply_on_device(step, loss, norm)
        elif self._finite_on_host(step, loss, norm, saved_step):
            self.scaler.step(self.optimizer)
        self.scaler.update()  # fp16: lowers the scale after an overflow, raises it after a clean stretch
        return norm

    def _apply_on_device(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))  # () bool
        if self.dist.grouped:  # a bad step on any process is a bad step on all of them, still on the device
            bad = self.dist.mean(bad.float()) > 0
        first = bad & (self._counts[0] < 0)
        self._counts[0].masked_fill_(first, step)
        self._counts[1].add_(bad)
        self._first_values.copy_(torch.where(first, torch.stack((loss.float(), norm.float())), self._first_values))
        self.optimizer.found_inf = bad.float()  # fused AdamW: 1 skips this step's update on the device
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def check(self, saved_step: int) -> None:
        """Read the device's flags (lean path): stop with one line if a step diverged and ``skip_nonfinite``
        is off; update :attr:`skipped`. Called at log steps, evaluations and before every checkpoint write."""
        if not self.lean:
            return
        first, self.skipped = self._counts.tolist()
        if first >= 0 and not self.cfg.skip_nonfinite:
            loss, norm = self._first_values.tolist()
            raise divergence_error(first, loss, norm, saved_step)

    def _finite_on_host(self, step: int, loss: torch.Tensor, norm: torch.Tensor, saved_step: int) -> bool:
        """Whether the loss and the gradient norm are finite on every process, read now.

        In float16 training a finite loss with overflowing gradients is the loss scale being too high:
        the step is skipped, counted, and the scaler lowers the scale; that is routine, not divergence.
        """
        bad_loss = self.dist.any(not bool(torch.isfinite(loss)))
        if not bad_loss and not self.dist.any(not bool(torch.isfinite(norm))):
            return True
        if not bad_loss and self.scaler.is_enabled():
            self.overflows += 1
            return False
        if not self.cfg.skip_nonfinite:
            raise divergence_error(step, loss.item(), norm.item(), saved_step)
        self.skipped += 1
        return False
