"""Two CPU processes under torchrun (gloo): DDP and FSDP2 reproduce the single-process loss sequence
on the same global batch, and checkpoints move freely between one process and two."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from training_helpers import logged_losses, tiny_args, tiny_config

from gpt2lab.checkpoints.train_state import load_checkpoint
from gpt2lab.train.loop import train


def _torchrun(corpus, out, *overrides, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "gpt2lab", "train", *tiny_args(corpus, out, *overrides), *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Six steps in one process (grad_accum=2: the global batch is two micro-batches of two sequences)."""
    out = tmp_path_factory.mktemp("single")
    train(tiny_config(corpus, out, "max_iters=6", "ckpt_interval=3"))
    return out


def _close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step


def test_ddp_resumes_a_single_process_checkpoint(corpus, reference, tmp_path):
    """One process trains 3 steps; DDP on 2 processes (one micro-batch each) continues to 6."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, "max_iters=3"))
    result = _torchrun(corpus, out, "max_iters=6", resume=True)
    _close(logged_losses(out), logged_losses(reference), range(1, 7))
    assert result.stdout.count("step 6: val loss") == 1  # only rank 0 reports


def test_fsdp_matches_and_its_checkpoint_resumes_in_one_process(corpus, reference, tmp_path):
    out = tmp_path / "run"
    _torchrun(corpus, out, "max_iters=3", "strategy=fsdp")
    _close(logged_losses(out), logged_losses(reference), range(1, 4))
    ckpt = load_checkpoint(out / "ckpt.pt")  # full (unsharded) tensors, the single-process format
    single = load_checkpoint(reference / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["model"].keys() == single["model"].keys()
    assert all(ckpt["model"][k].shape == single["model"][k].shape for k in single["model"])
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    train(tiny_config(corpus, copy, "max_iters=6"), resume=True)
    _close(logged_losses(copy), logged_losses(reference), range(1, 7))


def test_fsdp_bf16_mixed_precision_on_two_processes(corpus, tmp_path):
    """FSDP2's bf16 policy over a real reduction (two ranks): bf16 autocast's losses in one process to bf16
    rounding, and a checkpoint of fp32 tensors (the shards AdamW updates, not the bf16 gathered copies)."""
    bf16 = "dtype='bfloat16'"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "bfloat16 autocast on this cpu")  # a CPU without native bf16
        train(tiny_config(corpus, tmp_path / "single", "max_iters=3", bf16))
    out = tmp_path / "run"
    _torchrun(corpus, out, "max_iters=3", "strategy=fsdp", bf16)
    losses, single = logged_losses(out), logged_losses(tmp_path / "single")
    assert [losses[s] for s in range(1, 4)] == pytest.approx([single[s] for s in range(1, 4)], abs=5e-3)
    assert {t.dtype for t in load_checkpoint(out / "ckpt.pt")["model"].values()} == {torch.float32}
