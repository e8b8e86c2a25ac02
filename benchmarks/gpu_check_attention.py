"""The GPU check's attention section (benchmarks/gpu_check.py): sliding-window attention against full causal
attention, forward + backward, and every path's output and gradients against a dense-mask reference.

The paths are those of :mod:`gpt2lab.sliding_window` that exist in this checkout (``WINDOW_PATHS``; a name that
is missing is recorded as such). The reference is independent of all of them: explicit float64 scores, a
(T, T) mask built here, softmax, autograd. A window of T (every earlier key visible) is checked against that
reference too, so a path that takes the causal shortcut there is checked, not compared with itself.

Each FlexAttention shape compiles its own graph (heads, T and the window are fixed in it): this section makes
five at the first length (MHA and GQA, each at W and W=T, and the timed shape) and two at each later one (W
and the timed shape), more than Dynamo's 8 per function, past which flex runs uncompiled and materialises
the (T, T) scores (13 GB at the timed shape of T=8192). The limit is raised for this section only.
"""

from __future__ import annotations

import math
import statistics
import time
from functools import partial

import torch
from gpu_check_sections import HEAD_SIZE, WINDOW_PATHS, Context, relative_error, sync

from gpt2lab import sliding_window

HEADS = 12  # GPT-2 124M's
CHECK_HEADS = 4  # correctness inputs: (1, 4, T, 64), so that the float64 reference fits at 8k tokens
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # relative error of output and gradients
RECOMPILE_LIMIT = 32  # compiled flex graphs this section may make (Dynamo's default: 8; see above)


def attention(ctx: Context, out: dict) -> None:
    """Per length: correctness of every path (window W; window T and GQA at the first length), then the time of
    full causal attention and of each windowed path, forward + backward, and the speed-ups."""
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        _attention(ctx, out)


def _attention(ctx: Context, out: dict) -> None:
    window, dtype = ctx.sizes["attn_window"], torch.bfloat16 if ctx.cuda else torch.float32
    paths = {name: getattr(sliding_window, name, None) for name in WINDOW_PATHS}
    out["missing"] = [name for name, fn in paths.items() if fn is None]
    paths = {name: fn for name, fn in paths.items() if fn is not None}
    out |= {"window": window, "dtype": str(dtype).removeprefix("torch."), "tolerance": TOLERANCE[dtype]}
    for i, length in enumerate(ctx.sizes["attn_lengths"]):
        if i and ctx.left() < 20:
            out[f"T={length}"] = f"skipped: {ctx.left():.0f} s of the section's budget left"
            continue
        row = out.setdefault(f"T={length}", {})
        row["errors"] = _check(paths, length, window, dtype, ctx.device, first=i == 0)
        numbers = [e for e in row["errors"].values() if isinstance(e, float)]
        row["all_within_tolerance"] = all(e <= TOLERANCE[dtype] for e in numbers)  # of the paths that ran
        row["failures"] = sorted(name for name, e in row["errors"].items() if isinstance(e, str))
        row["ms"] = _times(paths, length, window, dtype, ctx)
        row["speedup_vs_full"] = {
            name: row["ms"]["full"] / ms for name, ms in row["ms"].items() if name != "full" and isinstance(ms, float)
        }
    out["headline"] = _headline(out, ctx.sizes["attn_lengths"], window)


def _headline(out: dict, lengths, window: int) -> str:
    rows = [(t, out[f"T={t}"]) for t in lengths if "speedup_vs_full" in (out.get(f"T={t}") or "")]
    if not rows:
        return "no length finished"
    length, row = rows[-1]
    speed = ", ".join(f"{name} {x:.2f}x" for name, x in row["speedup_vs_full"].items())
    ok = all(r["all_within_tolerance"] for _, r in rows)
    failed = sum(len(r["failures"]) for _, r in rows)
    missing = f"; missing: {', '.join(out['missing'])}" if out["missing"] else ""
    return (
        f"T={length} W={window} vs full: {speed}; within tolerance at {len(rows)} length(s): {ok}, "
        f"failed: {failed}{missing}"
    )


def dense_reference(q, k, v, window: int | None, dy):
    """Output and (dq, dk, dv) of causal attention with a window of ``window`` keys (None: all earlier keys), from
    explicit float64 scores under a (T, T) mask; K/V heads repeated for GQA."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    keys, values = (t.repeat_interleave(group, dim=1) for t in (k64, v64))
    T = q.shape[2]
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    visible = (j <= i) if window is None else (j <= i) & (j > i - window)  # (T, T)
    scores = (q64 @ keys.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    y = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ values
    y.backward(dy.double())
    return y.detach(), (q64.grad, k64.grad, v64.grad)


def _run(fn, q, k, v, dy):
    for t in (q, k, v):
        t.grad = None
    y = fn(q, k, v)
    y.backward(dy)
    return y.detach(), (q.grad, k.grad, v.grad)


def _check(paths: dict, T: int, window: int, dtype, device, first: bool) -> dict[str, float | str]:
    """Largest relative error (output or any gradient) of each path against :func:`dense_reference` for window W;
    at the ``first`` length also for window T (and of full causal attention) and with grouped K/V heads. A path
    that fails is recorded with its error (and its forward pass alone is checked), and the others are still
    checked."""
    errors: dict[str, float | str] = {}
    for kv_heads in (CHECK_HEADS, CHECK_HEADS // 2) if first else (CHECK_HEADS,):
        gen = torch.Generator().manual_seed(T + kv_heads)
        q = torch.randn(1, CHECK_HEADS, T, HEAD_SIZE, generator=gen).to(device, dtype).requires_grad_()
        k, v = (torch.randn(1, kv_heads, T, HEAD_SIZE, generator=gen).to(device, dtype).requires_grad_() for _ in "kv")
        dy = torch.randn(q.shape, generator=gen).to(device, dtype)
        tag = "" if kv_heads == CHECK_HEADS else f" gqa {CHECK_HEADS}/{kv_heads}"
        for w, label in [(window, f"W={window}")] + ([(T, "W=T")] if first else []):
            want = dense_reference(q, k, v, w, dy)  # W = T: every earlier key, the causal mask
            cases = {f"{name} {label}": partial(_windowed, fn, w) for name, fn in paths.items()}
            if w == T:
                cases["causal_attention"] = sliding_window.causal_attention
            for name, fn in cases.items():
                errors[name + tag] = _error(fn, q, k, v, dy, want)
                if isinstance(errors[name + tag], str):  # its forward alone (FlexAttention has no backward on a CPU)
                    errors[f"{name}{tag} forward only"] = _forward_error(fn, q, k, v, want[0])
    return errors


def _forward_error(fn, q, k, v, want) -> float | str:
    try:
        with torch.no_grad():
            return relative_error(fn(q.detach(), k.detach(), v.detach()), want)
    except Exception as error:
        return _failure(error)


def _called(fn, q, k, v):  # a contender already bound to its inputs
    return fn()


def _windowed(fn, window: int, q, k, v):
    return fn(q, k, v, window)


def _error(fn, q, k, v, dy, want) -> float | str:
    try:
        got, grads = _run(fn, q, k, v, dy)
    except Exception as error:  # recorded; the other paths are still checked
        return _failure(error)
    return max(relative_error(got, want[0]), *map(relative_error, grads, want[1]))


def _failure(error: Exception) -> str:
    return f"error: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def _times(paths: dict, T: int, window: int, dtype, ctx: Context) -> dict[str, float | str]:
    """Median milliseconds of forward + backward at (attn_batch, 12 heads, T, 64): full causal and each path
    (a path that fails: its error)."""
    batch = ctx.sizes["attn_batch"]
    gen = torch.Generator().manual_seed(T)
    shape = (batch, HEADS, T, HEAD_SIZE)
    q, k, v = (torch.randn(shape, generator=gen).to(ctx.device, dtype).requires_grad_() for _ in "qkv")
    dy = torch.randn(q.shape, generator=gen).to(ctx.device, dtype)
    contenders = {"full": lambda: sliding_window.causal_attention(q, k, v)}
    contenders |= {name: partial(_windowed, fn, window, q, k, v) for name, fn in paths.items()}
    ms: dict[str, float | str] = {}
    for name, fn in contenders.items():
        try:
            ms[name] = _median_ms(partial(_called, fn), q, k, v, dy, ctx)
        except Exception as error:
            ms[name] = _failure(error)
    return ms


def _median_ms(call, q, k, v, dy, ctx: Context) -> float:
    for _ in range(3):  # compiles (flex), autotunes, allocates
        _run(call, q, k, v, dy)
    times = []
    for _ in range(ctx.sizes["attn_repeats"]):
        sync(ctx.device)
        start = time.perf_counter()
        _run(call, q, k, v, dy)
        sync(ctx.device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)
