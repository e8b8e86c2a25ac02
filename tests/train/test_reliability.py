"""No run is ever lost and no file is left half-written: kills at random moments, two trainings in one
folder, failed writes, torn logs, divergence, changed settings on resume, stale exported models."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import logged_losses, start_training, tiny_args, tiny_config, wait_for_step

from gpt2lab.checkpoints.train_state import load_checkpoint
from gpt2lab.cli.main import main
from gpt2lab.data.tokens import TokenData, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.loading import load_model
from gpt2lab.train.loop import train
from gpt2lab.train.run import holds_run, read_metrics


def reference_losses(corpus: Path, out: Path, *overrides: str) -> dict[int, float]:
    """An uninterrupted run on one thread, as the subprocess trainings run."""
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        train(tiny_config(corpus, out, *overrides))
    return logged_losses(out)


def strict_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN or Infinity would raise."""

    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------- kill -9


def test_kill_9_at_random_moments_ten_times_then_the_run_ends_as_an_uninterrupted_one(corpus, tmp_path):
    settings = ("max_iters=150", "ckpt_interval=7")
    expected = reference_losses(corpus, tmp_path / "ref", *settings)
    out, rng, resumed = tmp_path / "run", random.Random(0), 0
    for attempt in range(10):
        resumed += holds_run(out)  # a kill before any file was written leaves nothing to resume
        proc = start_training(corpus, out, *settings, resume=holds_run(out))
        if attempt % 2:  # mid-step, mid-checkpoint or mid-log: soon after the run logs a new step
            logged = logged_losses(out) if (out / "metrics.jsonl").is_file() else {}
            wait_for_step(proc, out, max(logged, default=0) + 1)
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # interpreter start, imports, reading the checkpoint back (startup time varies with load)
            time.sleep(rng.uniform(0.3, 3.0))
        proc.kill()
        proc.communicate(timeout=30)
    assert resumed >= 5, "too few kills landed after the run started: the test proved little"
    last = start_training(corpus, out, *settings, resume=True)
    _, err = last.communicate(timeout=600)
    assert last.returncode == 0, err[-2000:]
    steps = [row["step"] for row in strict_rows(out) if "loss" in row]
    assert steps == sorted(set(steps)) == list(range(1, 151))  # no step lost, none logged twice
    assert logged_losses(out) == expected
    assert no_temp_files(out)


def test_a_second_training_into_the_same_folder_is_refused_and_the_first_finishes_unharmed(corpus, tmp_path):
    settings = ("max_iters=60", "ckpt_interval=20")
    expected = reference_losses(corpus, tmp_path / "ref", *settings)
    out = tmp_path / "run"
    first = start_training(corpus, out, *settings)
    wait_for_step(first, out, 3)
    for resume in (False, True):
        with pytest.raises(GPT2LabError, match=r"in use by another training \(pid \d+\)|already holds a run"):
            train(tiny_config(corpus, out, *settings), resume=resume)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert logged_losses(out) == expected
    assert load_checkpoint(out / "ckpt.pt")["step"] == 60


def test_a_killed_run_leaves_no_lock_behind(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start_training(corpus, out, "ckpt_interval=2")
    wait_for_step(proc, out, 3)
    proc.kill()
    proc.communicate(timeout=30)
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert train(tiny_config(corpus, out, f"max_iters={step + 1}"), resume=True)["step"] == step + 1


# ---------------------------------------------------------------------------------------- the run folder


def test_a_fresh_run_never_replaces_a_run_silently(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, "max_iters=2"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", *tiny_args(corpus, out, "max_iters=3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing written
    assert main(["train", *tiny_args(corpus, out, "max_iters=3"), "--overwrite"]) == 0
    assert max(logged_losses(out)) == 3 and min(logged_losses(out)) == 1


def test_resume_refuses_changes_that_alter_the_result(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, "max_iters=2"))
    capsys.readouterr()
    assert main(["train", "--resume", *tiny_args(corpus, out, "max_iters=3", "lr=2e-2", "seed=7")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr 0.01 -> 0.02" in err and "seed 1337 -> 7" in err and "--allow-changes" in err
    other_data = tmp_path / "data"
    prepare("pydoc", other_data, val_fraction=0.2)
    with pytest.raises(GPT2LabError, match="the data in"):
        train(tiny_config(other_data, out, "max_iters=3"), resume=True)
    # What may change: the length of the run and how often it reports.
    train(tiny_config(corpus, out, "max_iters=3", "eval_interval=500", "log_interval=1"), resume=True)
    assert main(["train", "--resume", "--allow-changes", *tiny_args(corpus, out, "max_iters=4", "lr=2e-2")]) == 0
    assert max(logged_losses(out)) == 4


def test_a_torn_last_metrics_line_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    expected = reference_losses(corpus, tmp_path / "ref", "max_iters=4")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        train(tiny_config(corpus, out, "max_iters=2"))
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 3, "loss": 7.1')  # the row being written when the machine died
        assert [r["step"] for r in read_metrics(out)][-1] == 2
        train(tiny_config(corpus, out, "max_iters=4"), resume=True)
    assert logged_losses(out) == expected
    strict_rows(out)


def test_the_newest_weights_of_a_run_are_loaded(corpus, tmp_path):
    """Interrupted, resumed, then killed: ckpt.pt is newer than the exported model and is what loads."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, "max_iters=2"))
    stale = {name: (out / name).read_bytes() for name in ("config.json", "model.safetensors")}
    train(tiny_config(corpus, out, "max_iters=4"), resume=True)
    for name, data in stale.items():  # as if the run had been killed before exporting step 4
        (out / name).write_bytes(data)
        os.utime(out / name, ns=(1, 1))
    newest = load_checkpoint(out / "ckpt.pt")["model"]
    loaded = load_model(out).state_dict()
    assert all(torch.equal(loaded[k], newest[k]) for k in newest)


# ---------------------------------------------------------------------------------------- failures


def test_divergence_stops_cleanly_with_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(corpus, out, "max_iters=50", "lr=1e6", "warmup_iters=1", "ckpt_interval=1")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err  # the progress bar's line, then the error's
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: training diverged at step") and "skip_nonfinite" in last
    assert not (out / "model.safetensors").exists()  # no NaN model written
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    strict_rows(out)
    assert no_temp_files(out)


def test_skip_nonfinite_skips_and_counts_bad_steps(corpus, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(corpus, out, "max_iters=6", "lr=1e6", "warmup_iters=1", "skip_nonfinite=true"))
    assert summary["step"] == 6
    rows = strict_rows(out)
    assert rows[-2]["skipped_steps"] >= 1  # the last training row, before the final evaluation
    model = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_failed_write_keeps_the_previous_files_and_leaves_no_temp_file(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, "max_iters=2"))
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "model.safetensors", "config.json")}

    def disk_full(state, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(GPT2LabError, match="No space left on device"):
        train(tiny_config(corpus, out, "max_iters=3"), resume=True)
    assert (out / "model.safetensors").read_bytes() == before["model.safetensors"]
    assert (out / "config.json").read_bytes() == before["config.json"]
    assert load_checkpoint(out / "ckpt.pt")["step"] == 3  # written before the export failed, whole
    assert no_temp_files(out)


def test_prepare_into_a_folder_a_training_reads_does_not_pull_the_data_from_under_it(corpus, tmp_path):
    """The splits are replaced by renaming, never rewritten in place: an open memmap keeps its data
    (a truncation in place would kill the reader with SIGBUS). Run in a child so a crash cannot take pytest."""
    data = tmp_path / "data"
    prepare("pydoc", data)
    script = (
        "import numpy as np, sys\n"
        "from gpt2lab.data.tokens import TokenData, prepare\n"
        "d = TokenData.open(sys.argv[1]); before = int(np.asarray(d.train, dtype=np.int64).sum())\n"
        "open(sys.argv[2], 'w').write('tiny text ' * 10)\n"
        "prepare(sys.argv[2], sys.argv[1], overwrite=True)\n"
        "print(before == int(np.asarray(d.train, dtype=np.int64).sum()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(data), str(tmp_path / "small.txt")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("True")
    assert len(TokenData.open(data).train) < 100 and no_temp_files(data)


def test_every_token_id_of_a_dataset_is_checked_when_it_is_opened(tmp_path):
    folder = tmp_path / "data"
    prepare("pydoc", folder)
    tokens = np.fromfile(folder / "train.bin", dtype=np.uint16)
    tokens[-1] = 60000  # far past the first few million tokens a sample would read
    tokens.tofile(folder / "train.bin")
    with pytest.raises(GPT2LabError, match="token id 60000 >= vocab size 50257"):
        TokenData.open(folder)
