"""The sections of the GPU check (benchmarks/gpu_check.py), its sizes, and what they share (:class:`Context`).

Each section fills a dict of figures as it goes, so one stopped by its budget keeps what it had measured.
Sizes: ``FULL`` on one GPU; ``SMOKE`` at tiny sizes, on a CPU too, where what needs CUDA is recorded as
skipped. Nothing here reads ../shared or the network: the reference weights are random (unless --weights)
and the text for the character-level runs is written by the check.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from common import load_reference

from gpt2lab.data.tokens import prepare, shakespeare_text
from gpt2lab.files import read_json
from gpt2lab.kernels import apply_inference_kernels
from gpt2lab.kernels.choice import ENV as KERNEL_ENV
from gpt2lab.kernels.compiled_decoding import CompiledDecoder, cache_capacity
from gpt2lab.loading import load_model
from gpt2lab.outputs import METRICS_NAME
from gpt2lab.train.config import TRAIN_FIELDS, load_config
from gpt2lab.train.loop import train
from gpt2lab.train.plan import peak_flops, plan
from gpt2lab.train.run import read_metrics

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(prompt=64, greedy=32, text_chars=300_000, tiny_steps=40, train_batches=(64, 16), train_steps=30,
            train_warm=5, train_min_s=90, decode_batches=(1, 64), decode_tokens=(256, 128),
            attn_lengths=(1024, 4096, 8192), attn_window=256, attn_batch=4, attn_repeats=10)  # fmt: skip
SMOKE = dict(prompt=16, greedy=8, text_chars=30_000, tiny_steps=6, train_batches=(4, 2), train_steps=4,
             train_warm=1, train_min_s=0, decode_batches=(1, 4), decode_tokens=(8, 8),
             attn_lengths=(256,), attn_window=32, attn_batch=2, attn_repeats=1)  # fmt: skip
WINDOW_PATHS = ("sliding_window_attention", "flex_sliding_window_attention", "banded_sliding_window_attention")
HEAD_SIZE = 64


class Stopped(BaseException):
    """SIGTERM: the outer timeout is near. What is on disk stays; the check ends."""


@dataclass
class Context:
    device: torch.device
    smoke: bool
    tmp: Path
    weights: Path | None = None  # --weights: a hub-layout GPT-2 folder; None: random weights
    deadline: float = math.inf  # time.monotonic() at which the running section's budget ends
    made: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sizes(self) -> dict:
        return SMOKE if self.smoke else FULL

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def reference(self) -> Path:
        """The weights both libraries load: --weights, else seeded random GPT-2 124M (tiny with --smoke)."""
        if self.weights is not None:
            return self.weights
        if "reference" not in self.made:
            from transformers import GPT2Config, GPT2LMHeadModel  # the reference is optional for gpt2lab

            torch.manual_seed(0)
            shape = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128) if self.smoke else {}
            GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(self.tmp / "reference")
            self.made["reference"] = self.tmp / "reference"
        return self.made["reference"]

    def char_data(self) -> Path:
        """Character-level data from a text the check writes: the opening of Tiny Shakespeare (shipped with gpt2lab)."""
        if "data" not in self.made:
            text = self.tmp / "text" / "corpus.txt"
            text.parent.mkdir(parents=True, exist_ok=True)
            text.write_text(shakespeare_text()[: self.sizes["text_chars"]], encoding="utf-8")
            prepare([text], self.tmp / "char-data", tokenizer="char", num_threads=1)
            self.made["data"] = self.tmp / "char-data"
        return self.made["data"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 matrix product rate on random data (the ceiling MFU is read against, measured, not the datasheet's)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


# ---------------------------------------------------------------------------------------- (b) parity


def parity(ctx: Context, out: dict) -> None:
    """Logits of the same weights in gpt2lab and transformers, fp32 and bf16, and greedy tokens (fp32). Runs before
    any training section: those switch TF32 on for the process, and fp32 here means IEEE fp32 products."""
    weights, n = ctx.reference(), ctx.sizes["greedy"]
    vocab = read_json(weights / "config.json")["vocab_size"]
    prompt = torch.randint(0, vocab, (2, ctx.sizes["prompt"]), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(ctx.device)
    out["tf32_matmul"] = torch.get_float32_matmul_precision() != "highest"
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = apply_inference_kernels(load_model(weights, device=ctx.device), dtype)
        ref = load_reference(weights, dtype).to(ctx.device)
        with torch.no_grad():
            a, b = ours(prompt).float(), ref(prompt).logits.float()
        out[f"{name}_max_abs_logit_diff"] = (a - b).abs().max().item()
        out[f"{name}_relative_logit_error"] = relative_error(a, b)
        if name == "fp32":
            want = ref.generate(prompt[:1], max_new_tokens=n, min_new_tokens=n, do_sample=False)
            got = ours.generate(prompt[:1], n, temperature=0)
            out["greedy_tokens"] = n
            out["greedy_tokens_equal"] = torch.equal(want.cpu(), got.cpu())
        del ours, ref
    out["fp32_ok"] = out["fp32_max_abs_logit_diff"] < 1e-3
    out["headline"] = (
        f"fp32 max |logit diff| {out['fp32_max_abs_logit_diff']:.2e}, "
        f"bf16 relative {out['bf16_relative_logit_error']:.2e}, "
        f"{n} greedy tokens {'equal' if out['greedy_tokens_equal'] else 'DIFFERENT'}"
    )


# ---------------------------------------------------------------------------------------- (e) decoding


def decoding(ctx: Context, out: dict) -> None:
    """124M greedy decoding in fp32: eager, compiled, and compiled + CUDA graphs (generate(compile=True) on CUDA).
    Per mode: tokens/s of a whole generate call after a warm-up one (prefill, and the recording, included), and
    the steady step time of the decoder alone. Tokens of every mode compared with eager's."""
    model = apply_inference_kernels(load_model(ctx.reference(), device=ctx.device), torch.float32)
    modes = ("eager", "compiled", "cudagraphs") if ctx.cuda else ("eager",)
    for batch, new in zip(ctx.sizes["decode_batches"], ctx.sizes["decode_tokens"], strict=True):
        row = out.setdefault(f"B={batch}", {"new_tokens": new})
        prompt = torch.randint(0, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
        prompt, tokens = prompt.to(ctx.device), {}
        for mode in modes:
            with _kernel_pin(mode):
                tokens[mode], row[mode] = _decode_rates(model, prompt, new, mode)
        for mode in ("compiled", "cudagraphs"):
            row.setdefault(mode, "skipped: needs CUDA" if not ctx.cuda else "skipped")
        equal = [(tokens[m] == tokens["eager"]).all(dim=1) for m in modes[1:]]
        row["tokens_equal"] = all(bool(e.all()) for e in equal)
        row["rows_equal"] = min((e.float().mean().item() for e in equal), default=1.0)
    rows = [(b, out[f"B={b}"]) for b in ctx.sizes["decode_batches"]]
    rates = [f"B={b}: " + " / ".join(_rate(m, row[m]) for m in modes) for b, row in rows]
    out["headline"] = f"{', '.join(rates)} tok/s; tokens equal: {all(row['tokens_equal'] for _, row in rows)}"


def _rate(mode: str, figures: dict) -> str:
    fell_back = f" (ran {figures['mode_used']})" if figures["mode_used"] != mode else ""
    return f"{mode} {figures['steady_tok_s']:,.0f}{fell_back}"


@contextlib.contextmanager
def _kernel_pin(mode: str):
    """GPT2LAB_KERNEL pins the decoder's mode for generate(compile=True); restored afterwards."""
    old = os.environ.get(KERNEL_ENV)
    os.environ[KERNEL_ENV] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ[KERNEL_ENV]
        else:
            os.environ[KERNEL_ENV] = old


def _decode_rates(model, prompt: torch.Tensor, new: int, mode: str) -> tuple[torch.Tensor, dict]:
    device, batch, compile = prompt.device, prompt.shape[0], mode != "eager"
    figures = {}
    for label in ("first_call_s", "call_s"):  # the first call compiles (and records); the second is timed
        sync(device)
        start = time.perf_counter()
        ids = model.generate(prompt, new, temperature=0, compile=compile)
        sync(device)
        figures[label] = time.perf_counter() - start
    figures["call_tok_s"] = batch * new / figures["call_s"]
    seconds, figures["mode_used"] = _steady_step_s(model, prompt, new, mode)
    figures["step_ms"] = 1000 * seconds
    figures["steady_tok_s"] = batch / figures["step_ms"] * 1000
    return ids[:, prompt.shape[1] :].cpu(), figures


@torch.no_grad()
def _steady_step_s(model, prompt: torch.Tensor, new: int, mode: str) -> tuple[float, str]:
    """Seconds per decoding step once running: the cache generate would allocate (so the compiled graph is reused),
    one untimed step (which records the graph), then ``new - 2`` steps timed together, one sync at the end; and
    the mode the decoder ran in (a failed recording falls back to "compiled", a failed compilation to "eager",
    each with a warning only)."""
    batch, length = prompt.shape
    cache = model.new_cache(batch, cache_capacity(length + new) if mode != "eager" else length + new)
    logits = model(prompt, cache=cache, last_only=True)
    step = partial(model, cache=cache, last_only=True) if mode == "eager" else CompiledDecoder(model, cache, mode)
    logits = step(logits[:, -1].argmax(-1, keepdim=True))
    sync(prompt.device)
    start = time.perf_counter()
    for _ in range(new - 2):
        logits = step(logits[:, -1].argmax(-1, keepdim=True))
    sync(prompt.device)
    return (time.perf_counter() - start) / max(new - 2, 1), step.mode if mode != "eager" else "eager"


# ---------------------------------------------------------------------------------------- (d), (g): tiny runs


def _tiny_losses(ctx: Context, device: torch.device, name: str, extra: tuple[str, ...] = ()) -> list[float]:
    """The losses of one tiny character-level run (fp32, not compiled, fixed seed) through the real trainer."""
    run = ctx.tmp / f"tiny-{name}"
    sets = [f"data.dir={ctx.char_data()}", f"out_dir={run}", f"max_iters={ctx.sizes['tiny_steps']}",
            "batch_size=8", "seq_len=64", "grad_accum=1", "warmup_iters=5", "lr=3e-3", "eval_interval=1000000",
            "eval_iters=1", "ckpt_interval=1000000", "log_interval=1", "dtype=float32", "compile=false",
            "seed=1234", f"device={device.type}", "model.n_layer=2", "model.n_head=4", "model.n_embd=64",
            "model.block_size=64", "model.pos_encoding=learned", "model.window=full", *extra]  # fmt: skip
    summary = train(load_config(None, sets))
    shutil.rmtree(run, ignore_errors=True)
    if summary.get("stopped"):
        raise Stopped()
    return [round(float(loss), 6) for _, loss in summary["losses"]]


def tiny_loss(ctx: Context, out: dict) -> None:
    """The same tiny run on the CPU and on the GPU (TF32 on there, as the trainer sets it): the loss curves."""
    cpu = _tiny_losses(ctx, torch.device("cpu"), "cpu")
    out |= {"steps": len(cpu), "final_loss_cpu": cpu[-1], "losses_cpu": cpu}
    if not ctx.cuda:
        out["gpu"] = "skipped: needs CUDA"
        out["headline"] = f"CPU final loss {cpu[-1]:.4f} over {len(cpu)} steps; GPU skipped (no CUDA)"
        return
    gpu = _tiny_losses(ctx, ctx.device, "gpu")
    out |= {"final_loss_gpu": gpu[-1], "losses_gpu": gpu}
    out["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(cpu, gpu, strict=True))
    out["headline"] = (
        f"final loss CPU {cpu[-1]:.4f} GPU {gpu[-1]:.4f} after {len(cpu)} steps; "
        f"largest difference {out['max_abs_loss_diff']:.2e}"
    )


def distributed(ctx: Context, out: dict) -> None:
    """DDP and FSDP2 wrapping on a one-process group (``process_group = "always"``): losses against the bare run."""
    if "process_group" not in TRAIN_FIELDS:
        out["status"] = "skipped: TrainConfig has no process_group option (no one-process group in this checkout)"
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    bare = _tiny_losses(ctx, ctx.device, "bare")
    out["bare_final_loss"] = bare[-1]
    for strategy in ("ddp", "fsdp"):
        losses = _tiny_losses(ctx, ctx.device, strategy, ("process_group=always", f"strategy={strategy}"))
        left_open = torch.distributed.is_initialized()
        if left_open:  # the next run could not form its group
            torch.distributed.destroy_process_group()
        diff = max(abs(a - b) for a, b in zip(bare, losses, strict=True))
        out[strategy] = {"final_loss": losses[-1], "max_abs_loss_diff_vs_bare": diff, "group_left_open": left_open}
    runs = [
        f"{s} final {out[s]['final_loss']:.4f} ({out[s]['max_abs_loss_diff_vs_bare']:.1e} from bare)"
        for s in ("ddp", "fsdp")
    ]
    out["headline"] = f"{'; '.join(runs)} on {ctx.device.type}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- (c) training


def training(ctx: Context, out: dict) -> None:
    """124M at T=1024, bf16, compiled, through the trainer; B=64 first (llm.c's micro-batch), then B=16. A run
    that the section's budget stops still reports the steps it logged (``cut_short``)."""
    try:
        for batch in ctx.sizes["train_batches"]:
            if out and ctx.left() < ctx.sizes["train_min_s"]:
                out[f"B={batch}"] = f"skipped: {ctx.left():.0f} s of the section's budget left"
                continue
            cfg = _train_config(ctx, ctx.tmp / f"train-B{batch}", batch)
            started = time.perf_counter()
            try:
                summary = _train(ctx, cfg)
            except BaseException:  # the section's alarm (or SIGTERM): the figures of the steps logged by then
                if _timed_steps(cfg):
                    figures = _train_figures(ctx, cfg, time.perf_counter() - started, None)
                    out[f"B={batch}"] = {**figures, "cut_short": True}
                raise
            out[f"B={batch}"] = _train_figures(ctx, cfg, time.perf_counter() - started, summary)
            shutil.rmtree(cfg.out_dir, ignore_errors=True)
    finally:  # finished or stopped: the batch sizes measured by then
        out["headline"] = _training_headline(ctx, out)


def _training_headline(ctx: Context, out: dict) -> str:
    done = [(b, out[f"B={b}"]) for b in ctx.sizes["train_batches"] if isinstance(out.get(f"B={b}"), dict)]
    return "; ".join(
        f"B={b}: {f['tokens_per_s']:,.0f} tok/s, MFU {_percent(f['mfu'])}, peak {f['peak_memory_gib']:.1f} GiB "
        f"(plan {f['plan_memory_gib']:.1f}){' cut short' if f.get('cut_short') else ''}"
        for b, f in done
    )


def _train_config(ctx: Context, run: Path, batch: int):
    sets = [f"data.dir={ctx.char_data()}", f"out_dir={run}", f"max_iters={ctx.sizes['train_steps']}",
            f"batch_size={batch}", "grad_accum=1", "warmup_iters=10", "eval_interval=1000000", "eval_iters=1",
            "ckpt_interval=1000000", "log_interval=1", f"device={ctx.device.type}"]  # fmt: skip
    if ctx.smoke:
        sets += ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=64", "seq_len=64",
                 "model.pos_encoding=learned", "model.window=full", "dtype=float32", "compile=false"]  # fmt: skip
        return load_config(None, sets)
    # GPT-2's vocabulary for the LM head, whatever the characters: the step costs what GPT-2 124M's costs.
    sets += ["seq_len=1024", "dtype=bfloat16", "compile=true", "model.vocab_size=50257"]
    return load_config(ROOT / "configs" / "gpt2-124m.toml", sets)


def _train(ctx: Context, cfg) -> dict:
    torch._dynamo.reset()  # each batch size compiles its own static graph, as a fresh run would
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    summary = train(cfg)
    if summary.get("stopped"):
        raise Stopped()
    return summary


def _timed_steps(cfg) -> list[dict]:
    """The logged steps of a run that carry a step time (none where the run stopped before its first)."""
    metrics = Path(cfg.out_dir) / METRICS_NAME
    return [r for r in read_metrics(cfg.out_dir) if "dt" in r] if metrics.is_file() else []


def _train_figures(ctx: Context, cfg, wall: float, summary: dict | None) -> dict:
    """The figures of a training run from its logged steps (``summary`` None: a run stopped early)."""
    rows = _timed_steps(cfg)
    timed = rows[ctx.sizes["train_warm"] :] or rows
    step_s = statistics.median(r["dt"] for r in timed)
    p = plan(cfg)
    peak = peak_flops(ctx.device, torch.bfloat16 if p["dtype"] == "bfloat16" else torch.float32)
    tok_s = p["tokens_per_step"] / step_s
    six_n = _six_n_flops_per_token(p, cfg.seq_len)
    losses = summary["losses"] if summary else [(r["step"], r["loss"]) for r in rows if "loss" in r]
    figures = {"batch": f"{cfg.batch_size} x {cfg.seq_len}", "steps": len(rows), "wall_s_incl_compile": wall,
               "first_step_s": rows[0]["dt"], "median_step_s": step_s, "tokens_per_s": tok_s,
               "flops_per_token": p["flops"]["train_per_token"],
               "mfu": tok_s * p["flops"]["train_per_token"] / peak if peak else None,
               "mfu_6n_12lct": tok_s * six_n / peak if peak else None,  # nanoGPT's and llm.c's count
               "trainer_mfu": statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
               "plan_step_s_at_40pct_mfu": p["flops"]["per_step"] / (0.4 * peak) if peak else None,
               "plan_memory_gib": p["memory_per_gpu"]["ddp"]["total"] / 2**30,
               "final_loss": losses[-1][1] if losses else None}  # fmt: skip
    if ctx.cuda:
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        figures["peak_reserved_gib"] = torch.cuda.max_memory_reserved(ctx.device) / 2**30
        figures["memory_vs_plan"] = figures["peak_memory_gib"] / figures["plan_memory_gib"]
    else:
        figures["peak_memory_gib"] = float("nan")  # no allocator statistics for CPU tensors
    return figures


def _six_n_flops_per_token(p: dict, seq_len: int) -> float:
    """Training FLOPs per token as nanoGPT and llm.c count them for MFU: 6 N (N without the position embeddings,
    the padded vocabulary's rows included, as both count them) plus 12 L C T for attention; gpt2lab's plan counts
    the mean keys a causal query sees, about 8 % less."""
    c = p["model"]
    return 6 * (p["params"] - c["block_size"] * c["n_embd"]) + 12 * c["n_layer"] * c["n_embd"] * seq_len


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
