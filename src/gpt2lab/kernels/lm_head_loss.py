"""The LM head and its cross-entropy in one pass, without the (tokens x vocab) logits in memory.

Applied from outside the model: :func:`lm_head_loss` takes :meth:`GPT.hidden_states` and the head's weight,
and :class:`LanguageModelLoss` wraps a model into the module whose forward is the training loss (what the
trainer wraps in DDP / FSDP). Generation and per-token evaluation, which need the logits, use the plain head.
"""

from __future__ import annotations

import torch
from torch import nn


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, targets of -1 ignored:
    ``F.cross_entropy(logits, targets, ignore_index=-1)`` without the logits. hidden: (B, T, C) or (N, C);
    weight: (V, C); targets: (B, T) or (N,)."""
    return LMHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1))


class LanguageModelLoss(nn.Module):
    """A GPT and its logit-free loss as one module: ``forward(idx, targets)`` -> the mean next-token loss.

    The trainer calls the loss through this module so that DDP and FSDP, which act around a module's
    forward, see the whole computation; the model itself stays the ``model`` attribute.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(idx)  # (B, T, C)
        return lm_head_loss(hidden, self.model.lm_head.weight, targets)


class LMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding the (N, vocab) logits.

    With GPT-2's 50,257-word vocabulary the logits are the largest activation of a training step (4 bytes
    x 50,257 per token in fp32), and the usual path keeps three tensors of that size alive: the logits,
    their log-softmax and its gradient. Here rows are processed in chunks of 32 MiB of logits, and each
    chunk's gradient (softmax - one-hot) goes straight into the gradients of ``hidden`` and ``weight``:
    forward does the backward's matrix products and backward only scales them. Same FLOPs, a fraction
    of the memory and of the elementwise passes. The idea of Liger Kernel's fused linear cross-entropy
    (Hsu et al. 2024), written here with PyTorch operations.

    Targets equal to -1 are ignored, as in :func:`torch.nn.functional.cross_entropy`. Under autocast
    the products run in the autocast dtype; the softmax and the weight gradient's sum in fp32.
    """

    CHUNK_BYTES = 32 * 2**20  # logits of one chunk of rows

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # hidden: (N, C), weight: (V, C), targets: (N,)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        N, V = hidden.shape[0], weight.shape[0]
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            valid = targets != -1
            index = targets.clamp(min=0)
            count = valid.sum()
            scale = 1.0 / count.clamp(min=1)  # mean over the counted targets
            total = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if need_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
            rows = min(N, max(1, LMHeadLoss.CHUNK_BYTES // (4 * V)))
            # One buffer for every chunk: a fresh allocation this large is page-faulted in every time.
            buffer = torch.empty(V * rows, device=hidden.device, dtype=dtype)
            for start in range(0, N, rows):
                end = min(start + rows, N)
                h, t, ok = hidden[start:end].to(dtype), index[None, start:end], valid[start:end]
                # Logits transposed, (V, n): on CPU this product runs faster than (n, V) (docs/benchmarks.md).
                logits = torch.mm(w, h.T, out=buffer[: V * (end - start)].view(V, -1)).float()
                lse = torch.logsumexp(logits, dim=0)  # (n,)
                total += ((lse - logits.gather(0, t)[0]) * ok).sum()
                if not need_grad:
                    continue
                # d(mean loss)/d(logits) = (softmax - one-hot) / count, zero for ignored targets. The
                # 1/count is applied in backward, together with the loss scale of fp16 training: values
                # as small as 1/count would underflow in fp16 before the scale could lift them.
                grad = logits.sub_(lse).exp_()
                grad.scatter_add_(0, t, torch.full_like(grad[:1], -1.0))
                grad.mul_(ok)
                g = grad.to(dtype)
                grad_hidden[start:end] = g.T @ w
                if dtype == grad_weight.dtype:
                    grad_weight.addmm_(g, h)
                else:
                    grad_weight += (g @ h).float()
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, scale)
            ctx.weight_dtype = weight.dtype
        # An empty target set gives nan, as F.cross_entropy does.
        return torch.where(count > 0, total * scale, torch.nan)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad_loss * scale  # the loss's gradient (the loss scale in fp16 training) / count
        return grad_hidden * factor, (grad_weight * factor).to(ctx.weight_dtype), None
