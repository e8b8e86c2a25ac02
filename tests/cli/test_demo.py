"""gpt2lab demo: prepares the bundled Tiny Shakespeare as characters, trains, reports the validation loss
beside the unigram and bigram count models' on the same characters, samples characters; fine-tunes a
given checkpoint (with a transformers parity check for hub-layout ones); offline hub names fall back."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from training_helpers import tiny_config

from gpt2lab.cli.main import main
from gpt2lab.config import GPTConfig
from gpt2lab.data.count_models import bigram_loss, unigram_loss
from gpt2lab.data.tokens import TokenData, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.train.config import TrainConfig


@pytest.fixture(scope="module")
def shakespeare_chars(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare-char")
    prepare("shakespeare", out, tokenizer="char")
    return out


@pytest.fixture
def small_demo(corpus, monkeypatch):
    """The demo's flow with a tiny model (its real settings are configs/demo.toml, checked elsewhere)."""

    def config(out_dir, data_dir):
        cfg = tiny_config(corpus, out_dir, "model.block_size=128")
        cfg.data_dir = data_dir
        return cfg

    monkeypatch.setattr("gpt2lab.cli.demo.TrainConfig", config)


def test_demo_trains_reports_against_count_models_and_samples_characters(
    shakespeare_chars, tmp_path, capsys, small_demo
):
    assert main(["demo", "--out", str(tmp_path), "--data", str(shakespeare_chars), "--max-iters", "1"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"validation loss (\S+) nats per character .* on ([\d,]+) validation characters", out)
    model_loss, n = float(found.group(1)), int(found.group(2).replace(",", ""))
    data = TokenData.open(shakespeare_chars)
    scored = np.asarray(data.val[: n + 1])  # the demo's targets: scored[1:]
    unigram, bigram = unigram_loss(data.train, scored, 65), bigram_loss(data.train, scored, 65)
    assert f"cost {unigram:.4f} to a unigram model" in out and f"and {bigram:.4f} to a bigram model" in out
    assert 3.0 < unigram < 3.5 and bigram < unigram and model_loss > bigram  # one step: not yet a language model
    sample = out.split("sample (prompt 'ROMEO:\\n'):\n")[1].split("\n\nmore:")[0]
    assert sample.startswith("ROMEO:\n") and len(sample) > 100 and set(sample) <= set(data.tokenizer.chars)


def test_demo_prepares_tiny_shakespeare_as_characters_on_first_use(tmp_path, capsys, monkeypatch):
    def stop(cfg, **options):
        raise GPT2LabError("only the preparation is tested here")

    monkeypatch.setattr("gpt2lab.cli.demo.train", stop)
    assert main(["demo", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data")]) == 2
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["sources"]) == ("char", 65, ["shakespeare"])


def test_demo_defaults_are_a_character_model_of_tiny_shakespeare():
    cfg = TrainConfig()
    assert cfg.data_dir == "data/shakespeare-char" and "vocab_size" not in cfg.model  # the data's 65
    assert cfg.model["block_size"] == cfg.seq_len  # the sample fills the trained context


def test_demo_offline_hub_name_trains_from_scratch(corpus, tmp_path, capsys, monkeypatch, small_demo):
    load = GPT.from_pretrained

    def offline(name, **kw):
        if name == "gpt2":
            raise GPT2LabError("cannot reach the Hugging Face hub for 'gpt2' (offline)")
        return load(name, **kw)

    monkeypatch.setattr(GPT, "from_pretrained", staticmethod(offline))
    args = ["demo", "--pretrained", "gpt2", "--out", str(tmp_path), "--data", str(corpus), "--max-iters", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cannot load 'gpt2'" in out and "training from scratch instead" in out and "validation loss" in out


def test_demo_finetunes_a_hub_layout_checkpoint_with_parity_check(corpus, tmp_path, capsys):
    pytest.importorskip("transformers")
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128)).export_hf(tmp_path / "hf")
    args = ["demo", "--pretrained", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--data", str(corpus)]
    assert main([*args, "--max-iters", "1"]) == 0
    out = capsys.readouterr().out
    diff = float(re.search(r"max \|logit difference\| = (\S+)", out).group(1))
    assert diff < 1e-4 and f"fine-tuning {tmp_path / 'hf'}" in out
