"""Experiment tracking: TensorBoard (read back with TensorBoard's EventAccumulator), W&B offline (the run's
.wandb file read with W&B's own protobuf records) and CSV hold the numbers of metrics.jsonl under the same
steps, and a run resumed from an older checkpoint continues the same curves without duplicate steps."""

import csv
import math
import shutil
import struct

import numpy as np
import pytest
from training_helpers import tiny_args, tiny_config

from gpt2lab.cli.main import main
from gpt2lab.errors import GPT2LabError
from gpt2lab.train import tracking
from gpt2lab.train.loop import train
from gpt2lab.train.run import read_metrics

TRACKED = ["log_to=['tensorboard', 'wandb', 'csv']", "eval_interval=2"]
DETERMINISTIC = ("loss", "lr", "grad_norm", "train_loss", "val_loss", "val_ppl")  # not timings


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B as a user without W&B settings has it: offline; its caches in the test's folder, not $HOME."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _expected(rows: list[dict]) -> dict[tuple[int, str], float]:
    """(step, metric) -> value of every finite number in metrics.jsonl; each pair must occur once."""
    out = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and value is not None and math.isfinite(value):
                assert (row["step"], key) not in out, f"step {row['step']} logged {key} twice"
                out[row["step"], key] = value
    return out


def _tensorboard(log_dir) -> tuple[dict[tuple[int, str], float], dict]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    points = {}
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag} has duplicate steps {steps}"
        points |= {(e.step, tag): e.value for e in acc.Scalars(tag)}
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return points, hparams


def _wandb_records(path):
    """The records of a .wandb file: LevelDB-log blocks of 32 KiB after a 7-byte header, each record a
    7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last) and a W&B protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def _wandb_sessions(run_dir) -> list[tuple[str, dict, dict]]:
    """(run id, config, {(step, metric): value}) of each offline session of the run, oldest first."""
    import json

    sessions = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id, config, points = None, {}, {}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        points[step, key] = json.loads(item.value_json)
        sessions.append((run_id, config, points))
    return sessions


def test_trackers_hold_the_metrics_and_a_resumed_run_continues_their_curves(corpus, tmp_path, offline_wandb):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, *TRACKED, "max_iters=2"))
    shutil.copy(out / "ckpt.pt", tmp_path / "ckpt-step2.pt")
    train(tiny_config(corpus, out, *TRACKED, "max_iters=4"), resume=True)
    # a crash after step 4 whose last checkpoint was step 2: steps 3-4 are logged but lost
    shutil.copy(tmp_path / "ckpt-step2.pt", out / "ckpt.pt")
    train(tiny_config(corpus, out, *TRACKED, "max_iters=6"), resume=True)

    rows = read_metrics(out)
    expected = _expected(rows)  # also asserts that metrics.jsonl itself has no duplicate step
    assert sorted(s for s, k in expected if k == "loss") == [1, 2, 3, 4, 5, 6]
    assert sorted(s for s, k in expected if k == "val_loss") == [0, 2, 4, 6]
    assert {"grad_norm", "tokens_per_s", "lr", "train_loss"} <= {k for _, k in expected}

    points, hparams = _tensorboard(out / "tensorboard")
    assert points.keys() == expected.keys()
    for key, value in expected.items():
        assert points[key] == pytest.approx(np.float32(value), rel=1e-6), key  # TensorBoard stores float32
    assert hparams["lr"] == 0.01 and hparams["model.n_layer"] == 1 and hparams["batch_size"] == 2
    assert hparams["model.window"] == "null" and hparams["log_to"] == '["tensorboard", "wandb", "csv"]'

    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["step", "metric", "value"]
    assert len(table) - 1 == len(expected)  # no duplicate rows
    assert {(int(s), k): float(v) for s, k, v in table[1:]} == expected  # exactly: values written with repr

    sessions = _wandb_sessions(out)
    run_id = (out / "wandb_run_id").read_text().strip()
    assert len(sessions) == 3 and {s[0] for s in sessions} == {run_id}  # one W&B run, resumed twice
    assert sessions[0][1]["model"]["n_layer"] == 1 and sessions[0][1]["lr"] == 0.01
    last = sessions[-1][2]
    assert last == {k: v for k, v in expected.items() if k[0] > 2}  # the resumed session logs steps 3..6
    for _, _, logged in sessions:  # every session's deterministic numbers are metrics.jsonl's (exact resume)
        for (step, key), value in logged.items():
            if key in DETERMINISTIC:
                assert value == pytest.approx(expected[step, key], rel=1e-12), (step, key)


def test_overwrite_removes_the_trackers_files_with_the_run(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, "log_to=['tensorboard', 'csv']", "max_iters=2"))
    train(tiny_config(corpus, out, "log_to=['tensorboard', 'csv']", "max_iters=1"), overwrite=True)
    points, _ = _tensorboard(out / "tensorboard")
    assert sorted(s for s, k in points if k == "loss") == [1]
    assert max(int(r[0]) for r in list(csv.reader(open(out / "metrics.csv")))[1:]) == 1


def test_log_to_refusals_come_before_anything_is_written(corpus, tmp_path, monkeypatch):
    with pytest.raises(GPT2LabError, match=r"unknown tracker 'tensorbord' \(did you mean 'tensorboard'") as err:
        train(tiny_config(corpus, tmp_path / "a", "log_to=['tensorbord']"))
    assert "\n" not in str(err.value) and not (tmp_path / "a").exists()
    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n: None if n == "wandb" else real_find_spec(n))
    with pytest.raises(GPT2LabError, match=r"needs the wandb package: pip install 'gpt2lab\[wandb\]'"):
        train(tiny_config(corpus, tmp_path / "b", "log_to=['csv', 'wandb']"))
    assert not (tmp_path / "b").exists()
    with pytest.raises(GPT2LabError, match="log_to must be a list"):
        train(tiny_config(corpus, tmp_path / "c", "log_to='csv'"))


def test_cli_log_to_flag(corpus, tmp_path, capsys):
    assert main(["train", *tiny_args(corpus, tmp_path / "a", "max_iters=2"), "--log-to", "csv"]) == 0
    assert (tmp_path / "a" / "metrics.csv").is_file() and not (tmp_path / "a" / "tensorboard").exists()
    assert main(["train", *tiny_args(corpus, tmp_path / "b", "max_iters=2"), "--log-to", "csv,mlflow"]) == 2
    assert "unknown tracker 'mlflow'" in capsys.readouterr().err


def test_mfu_is_logged_against_the_gpus_peak(corpus, tmp_path, monkeypatch):
    """On a listed GPU each step row has mfu = training FLOPs per token x tokens/s / peak FLOP/s; faked here
    with a CPU that claims a peak of 1 TFLOP/s."""
    import gpt2lab.train.loop
    from gpt2lab.analysis import model_report

    monkeypatch.setattr(gpt2lab.train.loop, "peak_flops", lambda device, dtype: 1e12)
    cfg = tiny_config(corpus, tmp_path, "max_iters=2")
    train(cfg)
    steps = [r for r in read_metrics(tmp_path) if "loss" in r]
    model = _model_config_of(tmp_path)
    exported = model_report(model.unpadded(), cfg.seq_len)["flops_per_token"]["total"]
    forward = exported + 2 * model.n_embd * (50_304 - 50_257)  # the LM head multiplies by the padded rows too
    for row in steps:
        assert row["mfu"] == pytest.approx(3 * forward * row["tokens_per_s"] / 1e12, rel=1e-12)
        assert row["tokens_per_s"] == pytest.approx(2 * 2 * 16 / row["dt"], rel=1e-12)  # accum x batch x length


def _model_config_of(run_dir):
    """The model the run trained, as its checkpoint records it: its vocabulary padded (50,257 -> 50,304 rows),
    which the LM head multiplies by; the exported config.json holds the unpadded model."""
    from gpt2lab.checkpoints.train_state import load_checkpoint
    from gpt2lab.config import GPTConfig

    config = GPTConfig.from_dict(load_checkpoint(run_dir / "ckpt.pt")["model_config"])
    assert config.padded_vocab_size == 50_304
    return config


def test_peak_flops_of_listed_gpus_only(monkeypatch):
    import torch

    from gpt2lab.train.plan import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert peak_flops(cuda, torch.bfloat16) == 989e12 and peak_flops(cuda, torch.float32) == 494.5e12
    assert peak_flops(torch.device("cpu"), torch.float32) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert peak_flops(cuda, torch.bfloat16) is None
