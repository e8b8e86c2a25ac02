"""Shared pieces of the training/eval/distributed/demo tests: a tiny run config and its logged losses.
The prepared corpus they train on is conftest's session fixture ``corpus``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2lab.train.config import TrainConfig, load_config
from gpt2lab.train.run import read_metrics

# A model small enough that a step takes milliseconds; the vocabulary (50257) still dominates.
TINY = [
    "pos_encoding='learned'",  # GPT-2's model, whatever the defaults (the demo's) choose
    "window='full'",
    "n_layer=1",
    "n_head=2",
    "n_embd=32",
    "model.block_size=32",
    "seq_len=16",
    "batch_size=2",
    "grad_accum=2",
    "eval_iters=2",
    "eval_interval=1000",
    "ckpt_interval=1000",
    "dtype='float32'",
    "warmup_iters=2",
    "lr=1e-2",
    "lr_decay_iters=1000",  # the schedule must not depend on max_iters, which the tests vary
]


def tiny_config(corpus: Path, out: Path, *overrides: str) -> TrainConfig:
    return load_config(None, [*TINY, f"data.dir='{corpus}'", f"out_dir='{out}'", *overrides])


def tiny_args(corpus: Path, out: Path, *overrides: str) -> list[str]:
    """The same config as command-line ``--set`` arguments."""
    sets = [*TINY, f"data.dir={corpus}", *overrides]
    return [arg for s in sets for arg in ("--set", s)] + ["--out", str(out)]


def logged_losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss from the run's metrics (a row being written right now is left out)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def start_training(corpus: Path, out: Path, *overrides: str, resume: bool = False) -> subprocess.Popen:
    """``gpt2lab train`` of the tiny config in a subprocess on one thread, running until stopped."""
    cmd = [sys.executable, "-m", "gpt2lab", "train", *tiny_args(corpus, out, "max_iters=100000", *overrides)]
    cmd += ["--resume"] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 600) -> None:
    """Until ``out``'s metrics log a training step >= ``step``; fails if the training exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read()[-2000:]}")
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and max(logged_losses(out), default=0) >= step:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("training did not reach the step in time")
