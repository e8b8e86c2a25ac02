"""Kernel choice by measurement on the running machine, cached for the process.

Which of PyTorch's CPU kernels is fastest for a product depends on the CPU: on a 2-core AVX2 Zen 3,
oneDNN's inner product beats MKL for a few rows; on an AVX-512 Xeon the order is the opposite, and bf16
products may or may not beat fp32. So where gpt2lab has several ways to compute the same thing, it
times them on the first call of each (operation, shape) it meets: a few alternating rounds, the best
time of each candidate, a few milliseconds in all. The winner is remembered for the process.

``GPT2LAB_KERNEL=name[,name...]`` pins choices for reproducible runs: the first listed name that is a
candidate of an operation is used there without measuring; operations with none of the names still
measure. A pinned kernel this PyTorch build lacks falls back to the operation's plain kernel.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gpt2lab.errors import GPT2LabError, closest_hint
from gpt2lab.kernels.precision import has_native_bf16

ENV = "GPT2LAB_KERNEL"
MIN_ROUNDS, MAX_ROUNDS = 3, 10
MEASURE_SECONDS = 0.02  # rounds go on (up to MAX_ROUNDS) until the candidates have run this long

# Every candidate name of every operation, with what it runs, so that a mistyped pin is caught before anything
# runs. Each module that offers candidates names them here, once, through :func:`candidates`; importing
# gpt2lab.kernels imports all of them.
KNOWN: dict[str, str] = {}


def candidates(described: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """Record ``{name: (what runs, description)}`` in :data:`KNOWN`; return ``{name: what runs}``."""
    KNOWN.update({name: description for name, (_, description) in described.items()})
    return {name: kernel for name, (kernel, _) in described.items()}


@dataclass
class Decision:
    """One choice: what was picked for an operation and shape, and the times (seconds per call) that
    decided it. ``how`` is "measured", "pinned" (by the environment) or "fallback" (pinned but missing)."""

    operation: str
    shape: str
    picked: str
    how: str
    times: dict[str, float] = field(default_factory=dict)


_decisions: dict[tuple, Decision] = {}


def decisions() -> list[Decision]:
    """Every choice made so far in this process, in the order they were made."""
    return list(_decisions.values())


def forget() -> None:
    """Drop the cached choices (tests; a process that changes its thread count)."""
    _decisions.clear()


def pinned() -> list[str]:
    """The kernel names in ``GPT2LAB_KERNEL``, checked against the known names."""
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    for name in names:
        if name not in KNOWN:
            raise GPT2LabError(f"{ENV}: unknown kernel '{name}'{closest_hint(name, KNOWN)}")
    return names


def cached(key: tuple) -> str | None:
    """The choice already made for ``key`` in this process (at this thread count), or None."""
    decision = _decisions.get((*key, torch.get_num_threads()))
    return None if decision is None else decision.picked


def ranked(key: tuple) -> list[str]:
    """The measured candidates for ``key``, fastest first (empty when pinned or not yet chosen)."""
    decision = _decisions.get((*key, torch.get_num_threads()))
    return [] if decision is None else sorted(decision.times, key=decision.times.get)


def choose(
    key: tuple,
    operation: str,
    shape: str,
    candidates: dict[str, Callable[[], object] | None],
    fallback: str,
) -> str:
    """The name of the fastest available candidate for ``key``, measured on first use and then cached.

    ``candidates`` maps every candidate of the operation to a zero-argument call that runs it on a real
    input, or to None where this PyTorch build or these weights cannot run it. ``fallback`` is the plain
    kernel, always available, used when a pinned candidate is missing.
    """
    key = (*key, torch.get_num_threads())
    if key in _decisions:
        return _decisions[key].picked
    pins = [name for name in pinned() if name in candidates]
    if pins:
        picked, how, times = pins[0], "pinned", {}
        if candidates[picked] is None:
            warnings.warn(f"{ENV}={picked}: not available here, using {fallback}", stacklevel=3)
            picked, how = fallback, "fallback"
    else:
        times = measure({name: fn for name, fn in candidates.items() if fn is not None})
        picked, how = min(times, key=times.get), "measured"
    _decisions[key] = Decision(operation, shape, picked, how, times)
    return picked


def measure(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best seconds per call of each candidate over alternating rounds (A B C A B C ...): a load spike on
    the shared cores slows one call, not every call of one candidate. The first round warms up
    (oneDNN builds its primitive, FBGEMM its buffers) and only counts if it is the fastest."""
    best = dict.fromkeys(candidates, float("inf"))
    spent = 0.0
    for rounds in range(1, MAX_ROUNDS + 1):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            best[name] = min(best[name], elapsed)
            spent += elapsed
        if rounds >= MIN_ROUNDS and spent >= MEASURE_SECONDS:
            break
    return best


def rows_bucket(rows: int) -> int:
    """Rows rounded up to a power of two: prompts of 100 and 120 tokens share one measurement."""
    return 1 << max(0, rows - 1).bit_length()


def faster_training_dtype(device: torch.device) -> torch.dtype:
    """float32 or bfloat16 autocast, whichever trains faster here: a CPU times one forward and backward of a
    small linear layer each way (bf16 instructions do not make bf16 faster on every CPU: an AVX-512-BF16
    Xeon multiplies bf16 at half its fp32 rate). On CUDA, bf16 where the GPU supports it."""
    if device.type != "cpu":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    layer = torch.nn.Linear(512, 512)
    x = torch.randn(128, 512, requires_grad=True)
    trials = {name: functools.partial(_training_step, layer, x, dtype) for name, dtype in TRAINING_DTYPES.items()}
    picked = choose(("training dtype",), "training dtype", "128x512 @ 512x512, forward + backward", trials, "fp32")
    return TRAINING_DTYPES[picked]


def _training_step(layer: torch.nn.Linear, x: torch.Tensor, dtype: torch.dtype) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()


TRAINING_DTYPES = candidates(
    {
        "fp32": (torch.float32, "training in float32"),
        "bf16_autocast": (torch.bfloat16, "training under bfloat16 autocast"),
    }
)
