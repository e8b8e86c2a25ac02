"""gpt2lab eval: loss, perplexity and bits per byte on known values; loss by position past the trained
context for RoPE (and a clear error for learned positions); the CLI on run folders and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from training_helpers import tiny_config

from gpt2lab.cli.main import main
from gpt2lab.config import GPTConfig
from gpt2lab.data.tokens import token_byte_lengths
from gpt2lab.errors import GPT2LabError
from gpt2lab.eval.loss import evaluate, load_tokens, write_by_position
from gpt2lab.model import GPT
from gpt2lab.train.loop import train

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _uniform_model(**kw) -> GPT:
    """All weights zero: every logit is 0, so the loss is exactly ln(vocab) at every position."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_uniform_model_known_values(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    tokens, n_bytes, _ = load_tokens(path)
    assert n_bytes == len(TEXT.encode())
    result = evaluate(_uniform_model(), tokens, context=16)
    assert result.loss == pytest.approx(math.log(50257), rel=1e-6)
    assert result.perplexity == pytest.approx(50257, rel=1e-4)
    n = (len(tokens) - 1) // 16 * 16
    assert result.tokens == n
    assert result.bytes == int(token_byte_lengths()[tokens[1 : n + 1]].sum())  # bytes the targets cover
    assert result.bits_per_byte == pytest.approx(math.log2(50257) * n / result.bytes, rel=1e-6)
    assert np.allclose(result.by_position, math.log(50257), rtol=1e-6)


def test_rope_evaluates_past_trained_context_learned_cannot(tmp_path):
    tokens = np.arange(1000) % 5000
    result = evaluate(_uniform_model(pos_encoding="rope"), tokens, context=64)
    assert len(result.by_position) == 64
    csv_path, png_path = write_by_position(result, tmp_path, trained_context=32)
    assert csv_path.read_text().splitlines()[0] == "position,loss" and len(csv_path.read_text().splitlines()) == 65
    assert png_path.stat().st_size > 0
    with pytest.raises(GPT2LabError, match="longer than the context .32. of a model with learned positions"):
        evaluate(_uniform_model(), tokens, context=64)


def test_too_little_data():
    with pytest.raises(GPT2LabError, match="needs at least 33 tokens"):
        evaluate(_uniform_model(), np.arange(10), context=32)


def test_cli_on_a_run(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(corpus, run, "max_iters=1"))
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--data", str(corpus), "--max-tokens", "256", "--by-position"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "val.bin" in out and (run / "loss_by_position.png").is_file()
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["eval", "--model", str(run / "ckpt.pt"), "--data", str(text), "--context", "16"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", "--model", str(run), "--data", str(text), "--context", "64"]) == 2
    assert "learned positions" in capsys.readouterr().err
