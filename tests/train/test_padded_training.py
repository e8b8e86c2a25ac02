"""Training with a padded vocabulary (``vocab_multiple``, 64 by default): the run trains the padded model and
changes no loss, its padded rows stay zero, it exports the unpadded model, and a resumed run keeps the shapes
of its checkpoint, including checkpoints written before padding existed."""

from __future__ import annotations

import pytest
import torch
from training_helpers import logged_losses, tiny_config

from gpt2lab.checkpoints import read_checkpoint
from gpt2lab.checkpoints.train_state import load_checkpoint, save_checkpoint
from gpt2lab.config import GPT2_VOCAB_SIZE, GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.loading import load_model
from gpt2lab.model import GPT
from gpt2lab.train.config import TrainConfig, load_config
from gpt2lab.train.loop import train
from gpt2lab.train.setup import build_model

PADDED = 50304  # GPT-2's 50,257 rounded up to a multiple of 64
WTE = "transformer.wte.weight"


def test_vocab_multiple_is_a_model_option_checked_on_load():
    assert TrainConfig().vocab_multiple == 64
    assert load_config(None, ["model.vocab_multiple=8"]).vocab_multiple == 8
    assert load_config(None, ["vocab_multiple=1"]).vocab_multiple == 1
    for bad in ("0", "-64", "2.5", "'64'"):
        with pytest.raises(GPT2LabError, match="config: vocab_multiple must be a positive integer"):
            load_config(None, [f"vocab_multiple={bad}"])


def test_build_model_pads_fresh_and_fine_tuned_models_and_an_explicit_size_wins(tmp_path):
    cfg = load_config(None, ["preset='tiny'", "pos_encoding='learned'", "window='full'"])
    assert build_model(cfg, vocab_size=65).config.padded_vocab_size == 128
    assert build_model(cfg, vocab_size=128).config.padded_vocab_size is None  # already a multiple
    cfg.vocab_multiple = 1
    assert build_model(cfg, vocab_size=65).config.padded_vocab_size is None
    cfg.model["padded_vocab_size"] = 96
    assert build_model(cfg, vocab_size=65).config.padded_vocab_size == 96
    base = GPT(GPTConfig.from_preset("tiny", vocab_size=65)).eval()
    base.save_pretrained(tmp_path / "base")
    tune = TrainConfig(init_from=str(tmp_path / "base"), preset=None, model={}, vocab_multiple=32)
    tuned = build_model(tune, vocab_size=65).eval()
    assert tuned.config == base.config.replace(padded_vocab_size=96)
    assert torch.equal(tuned.transformer.wte.weight[:65], base.transformer.wte.weight)
    assert not tuned.transformer.wte.weight[65:].any()
    idx = torch.randint(0, 65, (2, 9))
    torch.testing.assert_close(tuned(idx), base(idx), rtol=0, atol=1e-5)


def test_a_run_trains_padded_and_exports_the_unpadded_model(corpus, tmp_path):
    """The checkpoint holds the padded model (its padded rows still exactly zero: no gradient reaches them
    and weight decay keeps zero at zero); the exported model is its first 50,257 rows, with the same logits."""
    train(tiny_config(corpus, tmp_path, "max_iters=3"))
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    wte = ckpt["model"][WTE]
    assert ckpt["model_config"]["padded_vocab_size"] == PADDED and wte.shape == (PADDED, 32)
    assert not wte[GPT2_VOCAB_SIZE:].any()
    config, state = read_checkpoint(tmp_path)  # the export: config.json + model.safetensors
    assert config.padded_vocab_size is None and torch.equal(state[WTE], wte[:GPT2_VOCAB_SIZE])
    trained = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    trained.load_state_dict(ckpt["model"])
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 16))
    torch.testing.assert_close(load_model(tmp_path).eval()(idx), trained.eval()(idx), rtol=0, atol=1e-6)


def test_padding_changes_no_loss(corpus, tmp_path):
    """The same run unpadded and padded: the padded rows start at zero and take no random numbers, get no
    gradient and no update, so training and evaluation losses agree (to float rounding of the wider product)."""
    plain = train(tiny_config(corpus, tmp_path / "plain", "max_iters=4", "vocab_multiple=1"))
    padded = train(tiny_config(corpus, tmp_path / "padded", "max_iters=4"))
    assert load_checkpoint(tmp_path / "plain" / "ckpt.pt")["model"][WTE].shape[0] == GPT2_VOCAB_SIZE
    assert [s for s, _ in padded["losses"]] == [s for s, _ in plain["losses"]]
    assert [v for _, v in padded["losses"]] == pytest.approx([v for _, v in plain["losses"]], abs=1e-5)
    assert padded["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-5)


def test_a_checkpoint_written_before_padding_resumes_exactly_unpadded(corpus, tmp_path):
    """A checkpoint without padded_vocab_size (nor vocab_multiple) in its configs, as every checkpoint written
    before this option: --resume with the default vocab_multiple continues it unpadded, as exactly as any resume."""
    straight = tiny_config(corpus, tmp_path / "a", "max_iters=4", "vocab_multiple=1")
    train(straight)
    out = tmp_path / "b"
    train(tiny_config(corpus, out, "max_iters=2", "vocab_multiple=1"))
    state = load_checkpoint(out / "ckpt.pt")
    del state["model_config"]["padded_vocab_size"], state["train_config"]["vocab_multiple"]
    save_checkpoint(out / "ckpt.pt", state)
    train(tiny_config(corpus, out, "max_iters=4"), resume=True)
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["model_config"]["padded_vocab_size"] is None and ckpt["model"][WTE].shape[0] == GPT2_VOCAB_SIZE
    assert logged_losses(out) == logged_losses(tmp_path / "a")


def test_a_padded_run_resumes_padded_whatever_vocab_multiple_says(corpus, tmp_path):
    """The checkpoint's shapes win over a changed vocab_multiple, which is therefore no change to refuse."""
    train(tiny_config(corpus, tmp_path, "max_iters=2"))
    assert train(tiny_config(corpus, tmp_path, "max_iters=3", "vocab_multiple=1"), resume=True)["step"] == 3
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["model_config"]["padded_vocab_size"] == PADDED and ckpt["model"][WTE].shape[0] == PADDED
