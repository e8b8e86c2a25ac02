"""Shared benchmark plumbing: interleaved timing, peak-memory measurement, the HF reference model.

Timing. The machine has 2 cores shared with other jobs, so absolute times drift by 2-3x within
minutes. Contenders therefore run alternately (A B A B ...) inside one process and are compared by
the ratio of their medians: a load spike slows both sides of the same round, not one contender.

Memory. PyTorch has no allocator statistics for CPU tensors, and tracemalloc does not see them.
What the operating system sees is the process's resident set, so a measurement runs in a fresh
process: load the model, run the workload once, return freed heap to the OS (``malloc_trim``), reset
the kernel's peak-RSS mark (``/proc/self/clear_refs``), run the workload again, then read the peak
(``VmHWM``). The report gives that peak — everything the process needed, weights included — and its
increase over the resident size just before the run: the working memory (activations, KV cache,
temporaries). Freed memory that glibc keeps for reuse counts as resident, for both contenders alike.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from memory import peak_memory, reset_peak_memory

THREADS = 2


def setup(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------- timing


def alternate(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each contender, measured in interleaved rounds (A B A B ...).

    ``warmup`` untimed rounds come first (allocator growth, lazy initialisation, page faults).
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def load_average() -> str:
    """The 1/5/15-minute load averages, recorded with every run: above ~2 the cores were shared."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------------------- memory


def measure_in_subprocess(script: str, args: list[str]) -> dict:
    """Run ``script args`` in a fresh interpreter; it prints one JSON line (its last line of output)."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report_memory(workload: Callable[[], object]) -> None:
    """Child side of :func:`measure_in_subprocess`: run ``workload`` once to warm up (lazy initialisation,
    first-call caches), then once more under a fresh peak mark."""
    workload()
    before = reset_peak_memory()
    workload()
    peak = peak_memory()
    print(json.dumps({"before": before, "peak": peak, "increase": peak - before}))


# ---------------------------------------------------------------------------------------- models


def save_random_reference(directory: Path, seed: int = 0) -> None:
    """A randomly initialised GPT-2 124M in the Hugging Face layout (both sides load these weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)


def load_reference(directory: Path, dtype: torch.dtype = torch.float32):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).eval()
    # Random weights would stop greedy decoding at the first <|endoftext|>; every run must decode
    # the same number of tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def load_gpt2lab(directory: Path, dtype: torch.dtype | str = torch.float32):
    """As gpt2lab's inference loading path does: the kernels that win for ``dtype`` (or ``"int8"``) swapped in."""
    from gpt2lab import GPT, apply_inference_kernels

    return apply_inference_kernels(GPT.from_pretrained(directory), dtype)
