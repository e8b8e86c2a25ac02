"""`--resume` resumes or refuses: a run whose checkpoint is gone, changed data with the same token counts, a
re-mapped character vocabulary, a max_iters below the run's step are refused with one line naming the cause;
harmless changes pass. Each case of issue 23 is reproduced here first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.checkpoints.train_state import load_checkpoint
from gpt2lab.cli.main import main
from gpt2lab.data.fingerprint import combine_digests, file_sha256
from gpt2lab.data.tokens import prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.outputs import TOKENIZER_FILE
from gpt2lab.train.config import load_config
from gpt2lab.train.loop import train
from gpt2lab.train.run import read_metrics

SMALL = [
    "pos_encoding='learned'", "window='full'", "n_layer=1", "n_head=2", "n_embd=32", "model.block_size=16",
    "block_size=16", "batch_size=2", "eval_iters=1", "eval_interval=2", "ckpt_interval=2", "dtype='float32'",
    "warmup_iters=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def chars(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chars")
    (root / "text.txt").write_text("First Citizen: we are accounted poor citizens, the patricians good.\n" * 40)
    prepare(root / "text.txt", root / "data", num_threads=1, tokenizer="char")
    return root / "data"


def config(data: Path, out: Path, *overrides: str):
    return load_config(None, [*SMALL, f"data.dir='{data}'", f"out_dir='{out}'", *overrides])


@pytest.fixture(scope="module")
def finished(chars, tmp_path_factory) -> Path:
    """A run of 4 steps, finished: checkpoint, metrics and exported model."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(chars, out, "max_iters=4"))
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def test_resume_without_checkpoint_refuses_with_the_choices_and_touches_nothing(chars, finished, tmp_path, capsys):
    """Issue case 1: a deleted ckpt.pt made --resume retrain from step 0, wipe metrics and replace the model."""
    out = copy_run(finished, tmp_path)
    (out / "ckpt.pt").unlink()
    before = files(out)
    sets = [a for s in [*SMALL, f"data.dir={chars}", "max_iters=6"] for a in ("--set", s)]
    status = main(["train", *sets, "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "ckpt.pt is gone" in err and "--overwrite" in err and "--from-saved-model" in err
    assert files(out) == before


def test_from_saved_model_continues_from_the_exported_weights(chars, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "ckpt.pt").unlink()
    saved = load_file(out / "model.safetensors")
    rows_before = read_metrics(out)
    # max_iters = the run's step: nothing is trained, the loaded weights are exported again as they were
    train(config(chars, out, "max_iters=4"), resume=True, from_saved_model=True)
    again = load_file(out / "model.safetensors")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    train(config(chars, out, "max_iters=6"), resume=True, from_saved_model=True)
    rows = read_metrics(out)
    assert rows[: len(rows_before)] == rows_before  # the log goes on: no step 0 again, nothing lost
    assert [r["step"] for r in rows[len(rows_before) :]][-1] == 6 and load_checkpoint(out / "ckpt.pt")["step"] == 6


def test_from_saved_model_needs_a_saved_model_and_no_checkpoint(chars, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    with pytest.raises(GPT2LabError, match="ckpt.pt exists"):
        train(config(chars, out, "max_iters=6"), resume=True, from_saved_model=True)
    for name in ("ckpt.pt", "model.safetensors"):
        (out / name).unlink()
    with pytest.raises(GPT2LabError, match="no saved model"):
        train(config(chars, out, "max_iters=6"), resume=True, from_saved_model=True)


def test_a_run_killed_before_its_first_checkpoint_still_starts_from_step_0(chars, tmp_path):
    out = tmp_path / "run"
    train(config(chars, out, "max_iters=1", "ckpt_interval=100"))
    for name in ("ckpt.pt", "model.safetensors", "config.json"):  # as if killed before anything was saved
        (out / name).unlink()
    summary = train(config(chars, out, "max_iters=1", "ckpt_interval=100"), resume=True)
    assert summary["step"] == 1


def _reshuffled_copy(chars: Path, tmp_path: Path, record_hash: bool) -> Path:
    """The same corpus re-prepared shuffled: the same counts and tokenizer, other content."""
    data = tmp_path / "data"
    shutil.copytree(chars, data)
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    np.random.default_rng(0).permutation(tokens).tofile(data / "train.bin")
    meta = json.loads((data / "meta.json").read_text())
    meta.pop("content_sha256")
    if record_hash:  # as a new prepare records it; without it, an older data folder, hashed on first use
        meta["content_sha256"] = combine_digests([(n, file_sha256(data / n)) for n in ("train.bin", "val.bin")])
    (data / "meta.json").write_text(json.dumps(meta))
    return data


@pytest.mark.parametrize("record_hash", [True, False])
def test_changed_data_with_the_same_counts_is_refused(chars, finished, tmp_path, record_hash):
    """Issue case 4: the fingerprint was tokenizer, vocabulary size and counts."""
    data = _reshuffled_copy(chars, tmp_path, record_hash)
    out = copy_run(finished, tmp_path)
    with pytest.raises(GPT2LabError, match=r"the data in .* \(content changed since the checkpoint\)"):
        train(config(data, out, "max_iters=6"), resume=True)
    assert load_checkpoint(out / "ckpt.pt")["step"] == 4


def test_a_remapped_character_vocabulary_is_refused_even_with_allow_changes(chars, finished, tmp_path):
    """Issue case 4: the run's character tokenizer was silently rewritten with the data's."""
    data = tmp_path / "data"
    shutil.copytree(chars, data)
    stored = json.loads((data / TOKENIZER_FILE).read_text())
    stored["chars"] = stored["chars"][:-2] + "~\x7f"  # the same size, two characters other ones
    (data / TOKENIZER_FILE).write_text(json.dumps(stored))
    out = copy_run(finished, tmp_path)
    tokenizer_before = (out / TOKENIZER_FILE).read_bytes()
    for allow in (False, True):
        with pytest.raises(GPT2LabError, match="tokenizer .* differs"):
            train(config(data, out, "max_iters=6"), resume=True, allow_changes=allow)
    assert (out / TOKENIZER_FILE).read_bytes() == tokenizer_before


def test_harmless_changes_pass_and_model_changes_name_the_field(chars, tmp_path):
    """lr_decay_iters set to the max_iters it stood for passes; dropout needs --allow-changes (it was refused
    even with it); a changed n_embd is refused naming it."""
    out = tmp_path / "run"
    train(config(chars, out, "max_iters=2"))
    assert train(config(chars, out, "max_iters=2", "lr_decay_iters=2"), resume=True)["step"] == 2
    with pytest.raises(GPT2LabError, match=r"dropout 0\.0 -> 0\.1"):
        train(config(chars, out, "max_iters=4", "dropout=0.1"), resume=True)
    assert train(config(chars, out, "max_iters=4", "dropout=0.1"), resume=True, allow_changes=True)["step"] == 4
    with pytest.raises(GPT2LabError, match="different model .*n_embd: 32 vs 64"):
        train(config(chars, out, "max_iters=6", "n_embd=64"), resume=True, allow_changes=True)


def test_resume_with_max_iters_below_the_step_is_refused(chars, finished, tmp_path):
    """Issue: `--resume` with a max_iters below the run's step did nothing and exited 0."""
    out = copy_run(finished, tmp_path)
    before = files(out)
    with pytest.raises(GPT2LabError, match="at step 4, past max_iters 2"):
        train(config(chars, out, "max_iters=2"), resume=True)
    assert files(out) == before


def test_prepare_records_the_content_hash_of_its_token_files(chars):
    meta = json.loads((chars / "meta.json").read_text())
    expected = combine_digests([(n, file_sha256(chars / n)) for n in ("train.bin", "val.bin")])
    assert meta["content_sha256"] == expected
