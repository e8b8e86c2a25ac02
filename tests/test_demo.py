"""gpt2lab demo: trains on the embedded corpus, reports validation loss, samples; fine-tunes a given
checkpoint (with a transformers parity check for hub-layout ones); offline hub names fall back."""

from __future__ import annotations

import re

import pytest
from training_helpers import tiny_config

from gpt2lab.cli import main
from gpt2lab.config import GPT2LabError, GPTConfig
from gpt2lab.model import GPT


@pytest.fixture
def small_demo(corpus, monkeypatch):
    """The demo's flow with a tiny model (its real settings are configs/demo.toml, checked elsewhere)."""

    def config(out_dir, data_dir):
        cfg = tiny_config(corpus, out_dir, "model.block_size=128")
        cfg.data_dir = data_dir
        return cfg

    monkeypatch.setattr("gpt2lab.demo.TrainConfig", config)


def test_demo_trains_reports_and_samples(corpus, tmp_path, capsys, small_demo):
    assert main(["demo", "--out", str(tmp_path), "--data", str(corpus), "--max-iters", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"validation loss \d+\.\d+", out) and "sample (prompt 'The for statement')" in out


def test_demo_prepares_data_on_first_use(tmp_path, capsys, monkeypatch):
    def stop(cfg, **options):
        raise GPT2LabError("only the preparation is tested here")

    monkeypatch.setattr("gpt2lab.demo.train", stop)
    assert main(["demo", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data")]) == 2
    assert (tmp_path / "data" / "meta.json").is_file()


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
