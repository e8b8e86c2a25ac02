"""Every folder gpt2lab writes is guarded by one rule (gpt2lab.outputs.guard_output): new or empty; the same
kind with --overwrite; never another kind of output, files the user made, or a folder a live training holds.
A refusal is one line, exit status 2, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.cli.main import main
from gpt2lab.data.tokens import TokenData, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.outputs import DATA, EVAL, MODEL, RUN, STUDY, folder_kind, guard_output
from gpt2lab.tokenizer import load_tokenizer
from gpt2lab.train.run import RunLock

TINY_RUN = [
    "--set",
    "window=full",
    "--set",
    "pos_encoding=learned",
    "--set",
    "n_layer=1",
    "--set",
    "n_embd=32",
    "--set",
    "n_head=2",
    "--set",
    "model.block_size=32",
]
TINY_RUN += ["--set", "block_size=16", "--set", "batch_size=2", "--set", "eval_iters=1", "--set", "max_iters=2"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes (hidden ones included): a refusal must leave them all as they were."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One folder of each kind: a finished character-level run, its data, a model, a folder of user files."""
    root = tmp_path_factory.mktemp("guard")
    (root / "text.txt").write_text("To be, or not to be, that is the question. " * 100)
    prepare(root / "text.txt", root / "data", num_threads=1, tokenizer="char")
    args = ["train", *TINY_RUN, "--set", f"data.dir={root / 'data'}", "--out", str(root / "run")]
    assert main(args) == 0
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=64)).save_pretrained(root / "model")
    (root / "mine").mkdir()
    (root / "mine" / "config.json").write_text('{"my": "settings"}')
    (root / "mine" / "notes.txt").write_text("my notes")
    return {name: root / name for name in ("data", "run", "model", "mine")} | {"root": root}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    status = main([str(a) for a in args])
    err = capsys.readouterr().err
    return status, err


def assert_one_line_refusal(status: int, err: str, named: str) -> None:
    assert status == 2, err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert named in err, err


def test_each_folder_is_told_by_its_files(folders):
    assert folder_kind(folders["run"])[0] == RUN
    assert folder_kind(folders["data"])[0] == DATA
    assert folder_kind(folders["model"])[0] == MODEL
    assert folder_kind(folders["mine"]) == (None, ["config.json", "notes.txt"])


def test_train_overwrite_into_a_character_data_folder_is_refused_and_its_vocabulary_kept(folders, capsys):
    """Issue case 2: `train --overwrite --out DATA` deleted the vocabulary and wrote a GPT-2 marker."""
    data, before = folders["data"], snapshot(folders["data"])
    args = ["train", *TINY_RUN, "--set", f"data.dir={data}", "--out", data, "--overwrite"]
    status, err = run_cli(args, capsys)
    assert_one_line_refusal(status, err, "holds prepared data, not a run")
    assert snapshot(data) == before
    text = (folders["root"] / "text.txt").read_text()
    assert load_tokenizer(data).name == "char" and TokenData.open(data).tokenizer.n_vocab == len(set(text))


# every writer against every other kind of folder (prepare into data is the same kind: the --overwrite test)
OTHER_KINDS = [
    (c, t) for c in ("export", "convert", "prepare") for t in ("run", "mine", "data") if (c, t) != ("prepare", "data")
]


@pytest.mark.parametrize("command, target", OTHER_KINDS)
def test_export_convert_and_prepare_refuse_another_kind_of_folder_even_with_overwrite(folders, target, command, capsys):
    """Issue case 3: these wrote into a finished run, a folder of the user's files, any folder."""
    out, before = folders[target], snapshot(folders[target])
    args = {
        "export": ["export", "--model", folders["model"], "--out", out],
        "convert": ["convert", "--model", folders["model"], "--n-kv-head", "1", "--out", out],
        "prepare": ["prepare", folders["root"] / "text.txt", "--out", out],
    }[command]
    for extra in ([], ["--overwrite"]):
        status, err = run_cli([*args, *extra], capsys)
        named = "did not write" if target == "mine" else "not even with --overwrite"
        assert_one_line_refusal(status, err, named)
        assert snapshot(out) == before


def test_a_folder_held_by_a_live_training_is_refused_for_every_writer(folders, tmp_path, capsys):
    """Issue case 3: the run lock was not checked by export, convert or prepare."""
    held = tmp_path / "held"
    lock = RunLock(held)  # this process holds it, as a training would
    try:
        before = snapshot(held)
        for args in (
            ["export", "--model", folders["model"], "--out", held, "--overwrite"],
            ["convert", "--model", folders["model"], "--n-kv-head", "1", "--out", held],
            ["prepare", folders["root"] / "text.txt", "--out", held],
            ["train", *TINY_RUN, "--set", f"data.dir={folders['data']}", "--out", held, "--overwrite"],
            [
                "eval",
                "--model",
                folders["model"],
                "--data",
                folders["root"] / "text.txt",
                "--by-position",
                "--out",
                held,
            ],
        ):
            status, err = run_cli(args, capsys)
            assert_one_line_refusal(status, err, "in use by another training")
        assert snapshot(held) == before
    finally:
        lock.release()
    guard_output(held, MODEL)  # released: only the hidden lock file is left, the folder counts as empty


def test_the_same_kind_is_replaced_only_with_overwrite(folders, tmp_path, capsys):
    out = tmp_path / "exported"
    assert run_cli(["export", "--model", folders["run"], "--out", out], capsys)[0] == 0
    first = snapshot(out)
    status, err = run_cli(["export", "--model", folders["run"], "--out", out], capsys)
    assert_one_line_refusal(status, err, "already holds a model: pass --overwrite")
    assert snapshot(out) == first
    assert (
        run_cli(["export", "--model", folders["run"], "--out", out, "--overwrite", "--dtype", "bfloat16"], capsys)[0]
        == 0
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    data = tmp_path / "data"
    source = folders["root"] / "text.txt"
    assert run_cli(["prepare", source, "--out", data], capsys)[0] == 0
    status, err = run_cli(["prepare", source, "--out", data, "--tokenizer", "char"], capsys)
    assert_one_line_refusal(status, err, "already holds prepared data")
    assert load_tokenizer(data).name == "gpt2"
    assert run_cli(["prepare", source, "--out", data, "--tokenizer", "char", "--overwrite"], capsys)[0] == 0
    assert load_tokenizer(data).name == "char"


def test_eval_by_position_files_are_replaced_only_with_overwrite(folders, tmp_path, capsys):
    args = ["eval", "--model", folders["run"], "--data", folders["data"], "--by-position", "--out", tmp_path]
    assert run_cli(args, capsys)[0] == 0
    first = snapshot(tmp_path)
    status, err = run_cli(args, capsys)
    assert_one_line_refusal(status, err, "already holds evaluation outputs")
    assert snapshot(tmp_path) == first
    assert run_cli([*args, "--overwrite"], capsys)[0] == 0
    status, err = run_cli([*args[:-1], folders["data"]], capsys)
    assert_one_line_refusal(status, err, "holds prepared data")


def test_a_study_never_takes_another_kind_of_folder(folders):
    for target in ("run", "data", "model", "mine"):
        with pytest.raises(GPT2LabError, match="not a study|did not write"):
            guard_output(folders[target], STUDY, resume=True)


def test_guard_api_new_empty_file_and_unknown_kind(tmp_path):
    guard_output(tmp_path / "new" / "deeper", RUN)  # new: fine, nothing created
    assert not (tmp_path / "new").exists()
    guard_output(tmp_path, DATA)  # empty
    (tmp_path / "f").write_text("x")
    with pytest.raises(GPT2LabError, match="is a file, not a folder"):
        guard_output(tmp_path / "f", EVAL)
    with pytest.raises(ValueError, match="unknown output kind"):
        guard_output(tmp_path, "gguf")
