"""Shared pieces of the training/eval/distributed/demo tests: a tiny run config and its logged losses.
The prepared corpus they train on is conftest's session fixture ``corpus``."""

from __future__ import annotations

import json
from pathlib import Path

from gpt2lab.train_config import TrainConfig, load_config

# A model small enough that a step takes milliseconds; the vocabulary (50257) still dominates.
TINY = [
    "n_layer=1",
    "n_head=2",
    "n_embd=32",
    "model.block_size=32",
    "block_size=16",
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
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
