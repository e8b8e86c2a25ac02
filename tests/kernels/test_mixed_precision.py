"""float16 training with dynamic loss scaling: it follows float32 training, skips and counts the steps whose
scaled gradients overflow (routine, not divergence), and resumes exactly with the scaler's state."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from training_helpers import logged_losses, tiny_config

from gpt2lab import GPT2LabError
from gpt2lab.checkpoints.train_state import load_checkpoint
from gpt2lab.kernels import precision
from gpt2lab.kernels.lm_head_loss import LMHeadLoss
from gpt2lab.train.loop import train
from gpt2lab.train.setup import resolve_dtype


def train_fp16(cfg, **options) -> dict:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "float16 autocast on this cpu")  # an AVX2 CI machine
        return train(cfg, **options)


def step_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "loss_scale", "overflow_steps")} for r in rows if "loss" in r]


@pytest.mark.slow  # fp16 on a CPU without AMX-FP16: ~2 s a step for the tiny model
def test_float16_training_follows_float32_training(corpus, tmp_path):
    fp32 = train(tiny_config(corpus, tmp_path / "fp32", "max_iters=12"))["losses"]
    fp16 = train_fp16(tiny_config(corpus, tmp_path / "fp16", "max_iters=12", "dtype='float16'"))["losses"]
    losses = [loss for _, loss in fp16]
    assert np.mean(losses[-3:]) < losses[0] - 1.0  # it learns
    assert max(abs(a - b) for (_, a), (_, b) in zip(fp16, fp32, strict=True)) < 0.02
    rows = step_rows(tmp_path / "fp16")
    assert {(r["loss_scale"], r["overflow_steps"]) for r in rows} == {(2.0**16, 0)}
    assert load_checkpoint(tmp_path / "fp16" / "ckpt.pt")["scaler"]["scale"] == 2.0**16


@pytest.mark.slow  # fp16 on a CPU without AMX-FP16: ~2 s a step for the tiny model
def test_overflowing_steps_are_skipped_counted_and_resume_exactly(corpus, tmp_path, monkeypatch):
    # A first scale far too high: the scaled gradients of the first steps overflow fp16 (max 65504).
    monkeypatch.setattr(precision, "FP16_INIT_SCALE", 2.0**20)
    straight = train_fp16(tiny_config(corpus, tmp_path / "a", "max_iters=6", "dtype='float16'"))
    rows = step_rows(tmp_path / "a")
    overflows = [r["overflow_steps"] for r in rows]
    assert overflows[0] == 1 and 1 <= overflows[-1] < 6  # skipped without stopping the run, then it trains
    assert all(r["loss_scale"] == 2.0**20 / 2 ** r["overflow_steps"] for r in rows)  # halved on each
    assert np.isfinite([loss for _, loss in straight["losses"]]).all()

    train_fp16(tiny_config(corpus, tmp_path / "b", "max_iters=2", "dtype='float16'"))
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt")["scaler"]["scale"] < 2.0**20  # restoring it matters
    resumed = train_fp16(tiny_config(corpus, tmp_path / "b", "max_iters=6", "dtype='float16'"), resume=True)
    assert resumed["losses"] == straight["losses"][2:]  # bit-exact on CPU
    assert step_rows(tmp_path / "b") == rows and logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")
    a, b = (load_checkpoint(tmp_path / d / "ckpt.pt") for d in "ab")
    assert a["scaler"] == b["scaler"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("native", [True, False])
def test_slow_float16_warns(native, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert [str(w.message).split(" has ")[0] for w in caught] == ([] if native else ["float16 autocast on this cpu"])


def test_lm_head_loss_gradient_survives_fp16_at_any_loss_scale():
    """The fused head's gradient under fp16 autocast equals float32 autograd's, for a loss scale of 1 and
    of 2**16. Softmax / count is ~3e-8 here, below fp16's range: the 1/count of the mean must be applied
    with the scale, after the fp16 products (applied before them, the error is ~8e-3)."""
    torch.manual_seed(0)
    hidden = torch.randn(4096, 32, requires_grad=True)
    weight = (0.5 * torch.randn(8000, 32)).requires_grad_()
    targets = torch.randint(0, 8000, (4096,))
    torch.nn.functional.cross_entropy(hidden @ weight.T, targets).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    for scale in (1.0, 2.0**16):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.float16):
            (LMHeadLoss.apply(hidden, weight, targets) * scale).backward()
        for got, want in zip((hidden.grad, weight.grad), expected, strict=True):
            torch.testing.assert_close(got / scale, want, atol=3e-3 * want.abs().max().item(), rtol=0)


@pytest.mark.slow  # fp16 on a CPU without AMX-FP16: ~2 s a step for the tiny model
def test_a_non_finite_loss_in_float16_is_still_divergence(corpus, tmp_path):
    """Loss scaling only explains overflowing gradients; a loss that is itself non-finite stops the run."""
    cfg = tiny_config(corpus, tmp_path, "max_iters=8", "lr=1e6", "warmup_iters=1", "dtype='float16'")
    with pytest.raises(GPT2LabError, match="training diverged at step"):
        train_fp16(cfg)
    assert not (tmp_path / "model.safetensors").exists()
