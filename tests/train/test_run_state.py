"""The run-state files: the checkpoint format (checksum header over torch.save's own bytes, streamed
through a unique temporary file), the metrics log, and load_model on every kind of run path."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch

from gpt2lab.checkpoints.train_state import load_checkpoint, save_checkpoint
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.loading import load_model
from gpt2lab.model import GPT
from gpt2lab.train.run import read_metrics, start_metrics


def test_checkpoint_is_a_checksum_line_then_torch_save_bytes(tmp_path):
    payload = {"step": 3, "model": {"w": torch.randn(64, 64)}, "python": (3, [1, 2], None)}
    save_checkpoint(tmp_path / "ckpt.pt", payload)
    header, _, data = (tmp_path / "ckpt.pt").read_bytes().partition(b"\n")
    assert header == b"GPT2LAB-TRAIN-CKPT v1 sha256=" + hashlib.sha256(data).hexdigest().encode()
    reference = io.BytesIO()
    torch.save(payload, reference)
    assert data == reference.getvalue()
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], payload["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        save_checkpoint(tmp_path / "ckpt.pt", {"step": 2, "model": torch.zeros(1000), "bad": _Unpicklable()})
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_metrics_restart_keeps_rows_up_to_the_checkpoint(tmp_path):
    rows = [{"step": 0, "val_loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    start_metrics(tmp_path, keep_until=1)
    assert read_metrics(tmp_path) == rows[:2]
    start_metrics(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_load_model_reads_checkpoints_run_folders_and_exported_models(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, window=[4]))
    state = {"model_config": model.config.to_dict(), "model": model.state_dict()}
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "ckpt.pt", state)
    idx = torch.randint(0, 50257, (1, 8))
    expected = model(idx)
    for path in (run / "ckpt.pt", run):  # the file, and a run folder with no exported model yet
        torch.testing.assert_close(load_model(path)(idx), expected)
    assert load_model(run, dtype="bf16").transformer.wte.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "exported")
    torch.testing.assert_close(load_model(tmp_path / "exported")(idx), expected)
    with pytest.raises(GPT2LabError):
        load_model(tmp_path / "nothing-here")
