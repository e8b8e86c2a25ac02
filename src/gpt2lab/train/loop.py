"""Training: the loop. Build the model and optimizer, step, evaluate, checkpoint, log, stop on a signal, export.

One process or many (``torchrun``, DDP or FSDP2) run the same code; see :mod:`gpt2lab.train.distributed`.
Resuming is exact: the checkpoint holds the model, the optimizer, the step (the schedule is a pure
function of it), the fp16 loss scaler, every RNG state and the batch sampler's own generator, so a
stopped and resumed run draws the same batches and produces the same losses as one that never stopped.
The configuration is :mod:`gpt2lab.train.config`; the files a run writes are :mod:`gpt2lab.train.run`.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gpt2lab.checkpoints.train_state import save_checkpoint
from gpt2lab.data.loader import BatchLoader
from gpt2lab.data.tokens import TokenData, gather_batch, sample_offsets
from gpt2lab.errors import GPT2LabError
from gpt2lab.eval.hellaswag import accuracies, evaluate_hellaswag, load_examples
from gpt2lab.files import write_json
from gpt2lab.kernels.precision import grad_scaler, set_tf32
from gpt2lab.model import GPT
from gpt2lab.outputs import CKPT_NAME, LOSS_PLOT_FILE, TRAIN_CONFIG_FILE
from gpt2lab.plots import plot_losses
from gpt2lab.tokenizer import copy_tokenizer
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.distributed import Dist, gather_state, load_state, setup, sync_context, teardown, wrap_model
from gpt2lab.train.guards import StepGuard
from gpt2lab.train.plan import peak_flops, train_flops_per_token
from gpt2lab.train.resume import data_fingerprint, read_resume_state, resume_checkpoint
from gpt2lab.train.run import (
    RunLock,
    append_metrics,
    capture_rng,
    check_run_folder,
    clear_run,
    read_metrics,
    restore_rng,
    start_metrics,
)
from gpt2lab.train.setup import (
    build_model,
    check_fits,
    lr_at,
    make_optimizer,
    micro_batches_per_rank,
    resolve_dtype,
    seed_everything,
)
from gpt2lab.train.tracking import Trackers, check_log_to

# ---------------------------------------------------------------------------------------- the loop


class Trainer:
    """One training run. Every process of a distributed run builds one; only rank 0 logs and writes."""

    def __init__(
        self,
        cfg: TrainConfig,
        dist: Dist,
        resume: bool = False,
        allow_changes: bool = False,
        from_saved: bool = False,
        run_name: str | None = None,
    ) -> None:
        self.cfg, self.dist = cfg, dist
        self.log_to, self.run_name, self.trackers = check_log_to(cfg.log_to), run_name, None
        self.out = Path(cfg.out_dir)
        device = dist.device
        if device.type == "cuda":
            set_tf32(True)
        self.dtype = resolve_dtype(cfg.dtype, device)
        if self.dtype == torch.float16 and dist.world > 1 and cfg.strategy == "fsdp":
            raise GPT2LabError(
                "dtype float16 with strategy fsdp: each process's loss scaler would see only its own gradient "
                "shards; use bfloat16, or strategy ddp"
            )
        self.accum = micro_batches_per_rank(cfg, dist)
        self.data_gen = seed_everything(cfg.seed)
        self.data = TokenData.open(cfg.data_dir)
        saved = read_resume_state(cfg, from_saved) if resume else None  # the model takes its shape from it
        model = build_model(cfg, vocab_size=self.data.vocab_size, resumed=saved["model_config"] if saved else None)
        self.model_config = model.config
        check_fits(cfg, self.data, model.config)
        self._set_peak(model.config)
        resume_state = resume_checkpoint(cfg, self.data, model.config, allow_changes, saved)

        # the model, the loss module (for sync_context), what each step calls (compiled whole or per block)
        wrapped = wrap_model(model.to(device), dist, cfg.strategy, self.dtype, cfg.compile)
        self.wrapped, self.loss, self.loss_fn = wrapped
        self.optimizer = make_optimizer(self.wrapped, cfg, device)
        self.scaler = grad_scaler(self.dtype, device)
        self.step = 0
        counts = self._restore(resume_state)
        params = list(self.wrapped.parameters())
        self.guard = StepGuard(cfg, dist, params, self.optimizer, self.scaler, **counts)
        mine = (dist.rank * self.accum, self.accum)  # this rank's micro-batches of each step
        self.loader = BatchLoader(
            self.data.train, cfg.seq_len, cfg.batch_size, cfg.grad_accum, mine, self.data_gen, device
        )
        self.resumed = resume_state is not None
        self.stop_signal: int | None = None
        self.losses: list[tuple[int, float]] = []
        self.saved_step = self.step if self.resumed else 0  # step of the last checkpoint written
        self._clock = (time.perf_counter(), self.step)  # (time, step) since which logged steps are timed
        self.last_eval: dict[str, float] = {}
        # read (or downloaded) before training starts, so a missing file fails at once
        vocab = self.model_config.vocab_size
        self.hellaswag = load_examples(cfg.hellaswag_file, vocab_size=vocab) if cfg.hellaswag_interval else None

    def _restore(self, resume_state: dict | None) -> dict[str, int]:
        """Load a checkpoint's model, optimizer, RNG, loss-scaler state and step; return the counts of steps
        skipped so far (non-finite with skip_nonfinite, fp16 overflows), which the step guard carries on."""
        counts = {"skipped": 0, "overflows": 0}
        if resume_state is None:
            return counts
        load_state(self.wrapped, self.optimizer, resume_state["model"], resume_state["optimizer"])
        if "rng" in resume_state:  # absent when continuing from the saved model: the seed's RNGs go on
            restore_rng(resume_state["rng"], self.data_gen)
        if resume_state.get("scaler"):  # empty when the run was not float16 (resumed with --allow-changes)
            self.scaler.load_state_dict(resume_state["scaler"])
        self.step = resume_state["step"]
        return {name: resume_state.get(name, 0) for name in counts}

    def _set_peak(self, model_config) -> None:
        """MFU's terms: training FLOPs per token and the GPU's peak FLOP/s (:data:`gpt2lab.train.plan.PEAK_FLOPS`
        lists A100/H100/H200), named in every row that logs MFU. None on a CPU or an unlisted GPU: no MFU."""
        peak = peak_flops(self.dist.device, self.dtype)
        self.flops_per_s_peak = peak * self.dist.world if peak else None
        self.flops_per_token = train_flops_per_token(self.cfg, model_config) if peak else None
        if peak:
            device, kind = self.dist.device, str(self.dtype).removeprefix("torch.")
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            self.mfu_peak = f"{name} {kind} {peak / 1e12:g} TFLOP/s x {self.dist.world}"

    # -------------------------------------------------------------- pieces
    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def train_step(self) -> torch.Tensor:
        """One optimizer step on the global batch; returns this rank's mean micro-batch loss (detached, on
        the device: nothing in a step waits for the device, see :mod:`gpt2lab.train.guards`).

        All ranks draw the same global batch offsets from the shared generator and each takes its own
        slice of micro-batches (:class:`~gpt2lab.data.loader.BatchLoader`), so N processes see exactly the
        batch one process would.
        """
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.dist.device)
        for i, (x, y) in enumerate(self.loader.next_step()):
            with sync_context(self.loss, last=i == self.accum - 1), self.autocast():
                loss = self.loss_fn(x, y)
            self.scaler.scale(loss / self.accum).backward()  # fp16: scaled so small gradients survive
            total += loss.detach()
        # clip, check finiteness, update; the norm (before clipping) is read when the step is logged
        self.grad_norm = self.guard.apply(self.step + 1, total / self.accum, self.saved_step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / self.accum

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over ``eval_iters`` batches of each split. The batches come from a generator seeded
        the same way every time, so evaluations are comparable and never disturb the training RNG. The
        losses stay on the device until the split is done: one read per split, not one per batch."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.wrapped.eval()
        result = {}
        for split in ("train", "val"):
            tokens = getattr(self.data, split)
            losses = []
            for _ in range(cfg.eval_iters):
                offsets = sample_offsets(len(tokens), cfg.seq_len, cfg.batch_size, gen)
                x, y = (t.to(self.dist.device) for t in gather_batch(tokens, offsets, cfg.seq_len))
                with self.autocast():
                    losses.append(self.loss_fn(x, y))
            values = torch.stack(losses).tolist()
            result[f"{split}_loss"] = sum(values) / len(values)
        self.wrapped.train()
        result["val_ppl"] = math.exp(min(result["val_loss"], 50.0))
        return result

    def checkpoint(self) -> dict:
        """Gather the full model/optimizer state (a collective under FSDP) and, on rank 0, write it. A
        diverged step found now stops the run first: no non-finite step reaches a checkpoint."""
        self.guard.check(self.saved_step)
        model_state, optim_state = gather_state(self.wrapped, self.optimizer)
        if self.dist.master:
            payload = {
                "format": "gpt2lab-train",
                "version": 1,
                "step": self.step,
                "model": model_state,
                "optimizer": optim_state,
                "model_config": self.model_config.to_dict(),
                "train_config": self.cfg.to_dict(),
                "rng": capture_rng(self.loader.generator_state()),  # as of the batches used, none drawn ahead
                "scaler": self.scaler.state_dict(),  # empty unless float16
                "skipped": self.guard.skipped,
                "overflows": self.guard.overflows,
                "data": data_fingerprint(self.data),
            }
            save_checkpoint(self.out / CKPT_NAME, payload)
        self.saved_step = self.step
        self.dist.barrier()
        self._clock = (time.perf_counter(), self.step)  # the next logged steps' time leaves the writing out
        return model_state

    def log(self, row: dict) -> None:
        if self.dist.master:
            append_metrics(self.out, row)
            self.trackers.log(row)

    def _start_outputs(self) -> None:
        """The run folder, its metrics log (a resumed run's cut back to its checkpoint) and its config."""
        if self.dist.master:
            self.out.mkdir(parents=True, exist_ok=True)
            start_metrics(self.out, keep_until=self.step if self.resumed else None)
            config = {**self.cfg.to_dict(), "model": self.model_config.to_dict()}
            resumed_at = self.step if self.resumed else None
            self.trackers = Trackers(self.log_to, self.out, config, self.run_name, resumed_at)
            write_json(self.out / TRAIN_CONFIG_FILE, self.cfg.to_dict())
            copy_tokenizer(self.data.path, self.out)  # generate / eval read and write what the data holds

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    # -------------------------------------------------------------- run
    def _log_step(self, loss: torch.Tensor, bar: tqdm) -> None:
        """Log the step: the one point between evaluations where a step's numbers are read from the device.
        ``dt`` is the mean time of the steps since the clock last started (the last logged step, evaluation
        or checkpoint), measured after waiting for the device, so it holds with no read inside a step."""
        self.guard.check(self.saved_step)
        value = self.dist.mean(loss).item()
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)  # the steps' last kernels (the update) included
        dt = self._restart_clock()
        self.losses.append((self.step, value))
        tokens_per_s = self.cfg.grad_accum * self.cfg.batch_size * self.cfg.seq_len / dt
        row = {"step": self.step, "loss": value, "lr": lr_at(self.step - 1, self.cfg), "dt": dt}
        row |= {"grad_norm": self.grad_norm.item(), "tokens_per_s": tokens_per_s}
        if self.flops_per_s_peak:
            row |= {"mfu": self.flops_per_token * tokens_per_s / self.flops_per_s_peak, "mfu_peak": self.mfu_peak}
        if self.guard.skipped:
            row["skipped_steps"] = self.guard.skipped
        if self.scaler.is_enabled():
            row |= {"loss_scale": self.scaler.get_scale(), "overflow_steps": self.guard.overflows}
        self.log(row)
        # refresh=False: the bar redraws at its own pace (tqdm's mininterval), not on every logged step
        bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def _restart_clock(self) -> float:
        """Seconds per step since the clock last started; starts it again."""
        now, (started, step) = time.perf_counter(), self._clock
        self._clock = (now, self.step)
        return (now - started) / max(1, self.step - step)

    def _evaluate_and_log(self, bar: tqdm | None = None) -> None:
        """Evaluate and log; with ``bar``, also print the losses (the step-0 evaluation is not printed)."""
        self.guard.check(self.saved_step)
        self.last_eval = result = self.evaluate()
        self.log({"step": self.step, **result})
        if bar is not None:
            line = f"step {self.step}: train {result['train_loss']:.4f}, val {result['val_loss']:.4f}"
            bar.write(line + self._reference_note())
        self._clock = (time.perf_counter(), self.step)  # evaluation read the device: it is idle now

    def _reference_note(self) -> str:
        """`` (reference NAME: val X at N tokens)``: the published loss nearest ahead of the tokens seen so far."""
        cfg = self.cfg
        point = cfg.reference_at(self.step * cfg.grad_accum * cfg.batch_size * cfg.seq_len)
        if point is None:
            return ""
        tokens = next(
            (f"{point[0] / scale:.3g}{unit}" for scale, unit in ((1e9, "B"), (1e6, "M")) if point[0] >= scale), None
        )
        return f" (reference {cfg.reference['name']}: val {point[1]:.2f} at {tokens or f'{point[0]:,}'} tokens)"

    def _hellaswag(self, bar: tqdm) -> None:
        """Score HellaSwag, each rank a share of the examples; log and print the accuracies."""
        with self.autocast():
            counts = evaluate_hellaswag(
                self.wrapped, self.hellaswag, self.model_config.block_size, self.dist.rank, self.dist.world
            )
        summed = self.dist.mean(torch.tensor(list(counts.values()), dtype=torch.float64, device=self.dist.device))
        result = accuracies(dict(zip(counts, (summed * self.dist.world).round().tolist(), strict=True)))
        self.last_eval.update(result)
        self.log({"step": self.step, **result})
        if self.dist.master:
            bar.write(f"step {self.step}: hellaswag acc_norm {result['hellaswag_acc_norm']:.4f}")
        self._clock = (time.perf_counter(), self.step)

    def _loop(self, bar: tqdm) -> tuple[bool, dict | None]:
        """Train to ``max_iters`` or to a signal; returns (stopped by a signal, last saved model state)."""
        cfg = self.cfg
        stop, model_state = False, None
        if self.step == 0 and not self.resumed:
            self._evaluate_and_log()
        self._clock = (time.perf_counter(), self.step)
        while self.step < cfg.max_iters:
            loss = self.train_step()
            last = self.step == cfg.max_iters
            log_step = self.step % cfg.log_interval == 0 or last
            if log_step:
                self._log_step(loss, bar)
            bar.update(1)
            if self.step % cfg.eval_interval == 0 or last:
                self._evaluate_and_log(bar)
            if cfg.hellaswag_interval and (self.step % cfg.hellaswag_interval == 0 or last):
                self._hellaswag(bar)
            stop = self.dist.stop_after(self.step, self.stop_signal, log_step)  # not after every step in a group
            self.stop_signal = stop or self.stop_signal  # the signal agreed on, which another rank may have caught
            if stop or self.step % cfg.ckpt_interval == 0 or last:
                model_state = self.checkpoint()
            if stop:
                break
        return stop, model_state

    def run(self) -> dict:
        self._start_outputs()
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        master = self.dist.master
        bar = tqdm(total=self.cfg.max_iters, initial=self.step, unit="step", disable=not master, dynamic_ncols=True)
        try:
            stop, model_state = self._loop(bar)
        finally:
            self.loader.close()
            bar.close()
            if self.trackers is not None:
                self.trackers.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        if self.step == self.cfg.max_iters or stop:
            self._export(model_state)
        return {
            "out_dir": str(self.out),
            "step": self.step,
            "losses": self.losses,
            "stopped": bool(stop),
            "signal": self.stop_signal,
            **self.last_eval,
        }

    def _export(self, model_state: dict | None) -> None:
        """The model in gpt2lab format (config.json + model.safetensors) and the loss curve, for
        ``gpt2lab generate/eval --model RUN_DIR``."""
        if model_state is None:  # nothing trained in this session (resumed a finished run)
            model_state, _ = gather_state(self.wrapped, self.optimizer)
        if self.dist.master:
            plain = GPT(self.model_config)
            plain.load_state_dict(model_state)
            plain.save_pretrained(self.out)
            plot_losses(read_metrics(self.out), self.out / LOSS_PLOT_FILE)
        self.dist.barrier()


def train(
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    allow_changes: bool = False,
    from_saved_model: bool = False,
    run_name: str | None = None,
) -> dict:
    """Run ``cfg`` (in this process, or as one rank under torchrun); returns a summary on every rank.

    The run folder belongs to this run alone: a fresh run into a folder that holds one is refused unless
    ``overwrite`` (then the old run's files are removed first) or ``resume``; a second training into the
    same folder at once is refused by a lock. Nothing is written before these checks pass. ``run_name``
    names the run in the trackers of ``cfg.log_to`` (default: the run folder's name).
    """
    run_dir = Path(cfg.out_dir)
    check_run_folder(run_dir, resume, overwrite)
    dist, lock = setup(cfg.device, cfg.process_group), None
    try:
        # reads the data (and checkpoint); writes nothing
        trainer = Trainer(cfg, dist, resume, allow_changes, from_saved_model, run_name)
        lock = RunLock(run_dir) if dist.master else None
        if overwrite and dist.master:
            clear_run(run_dir)
        dist.barrier()
        return trainer.run()
    finally:
        if lock is not None:
            lock.release()
        teardown(dist)
