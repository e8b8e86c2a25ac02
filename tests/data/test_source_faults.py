"""Sources are never silently skipped, and corrupt inputs of accepted formats are one line (issue 23, items 3-4):
a folder mixing text and jsonl files reads both; a file prepare cannot read is refused by name; a .parquet that
is none, invalid UTF-8 in jsonl, a weight file that is no pickle: one line, exit 2; a killed prepare's temp files
go at the next prepare in that folder."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from gpt2lab.cli.main import main
from gpt2lab.data.shards import prepare_shards, worker_pool
from gpt2lab.data.tokens import TokenData, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import gpt2_bpe


def one_line_exit_2(args: list, capsys, named: str) -> None:
    status = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "doc/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert named in err, err


def test_a_folder_of_text_and_jsonl_files_reads_every_file(tmp_path):
    """Issue case 5: the .txt files of a folder holding .jsonl files were dropped."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps({"text": "alpha beta"}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    (src / "b.txt").write_text("the text file's words")
    meta = prepare_shards([src], tmp_path / "out", val_tokens=3, workers=1)
    assert meta["documents"] == 3  # two rows and the text file
    enc = gpt2_bpe()
    expected = sum(len(enc.encode_ordinary(t)) + 1 for t in ("alpha beta", "gamma", "the text file's words"))
    assert meta["tokens"] == expected
    data = TokenData.open(tmp_path / "out")
    stream = np.concatenate([np.asarray(data.val), np.asarray(data.train)])
    assert enc.decode(stream.tolist()).count("the text file's words") == 1


@pytest.mark.parametrize("with_table", [False, True])
def test_a_file_prepare_cannot_read_is_refused_by_name(tmp_path, capsys, with_table):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some text")
    (src / "scores.csv").write_text("a,b\n1,2\n")
    if with_table:
        (src / "rows.jsonl").write_text(json.dumps({"text": "row"}) + "\n")
    one_line_exit_2(["prepare", src, "--out", tmp_path / "out"], capsys, "scores.csv")
    assert not (tmp_path / "out").exists()


def test_a_parquet_file_that_is_not_one_is_one_line(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    (tmp_path / "corpus.parquet").write_text("just text, not parquet")
    one_line_exit_2(["prepare", tmp_path / "corpus.parquet", "--out", tmp_path / "out"], capsys, "corpus.parquet")


def test_invalid_utf8_in_jsonl_names_the_line(tmp_path, capsys):
    good = json.dumps({"text": "fine"}).encode()
    (tmp_path / "c.jsonl").write_bytes(good + b"\n" + b'{"text": "caf\xe9"}\n')
    one_line_exit_2(["prepare", tmp_path / "c.jsonl", "--out", tmp_path / "out"], capsys, "line 2: not UTF-8")


def test_a_weight_file_that_is_not_a_pickle_is_one_line(tmp_path, capsys):
    from gpt2lab import GPT, GPTConfig

    GPT(GPTConfig.from_preset("tiny")).export_hf(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"this is not a pickle at all" * 10)
    one_line_exit_2(["generate", "--model", tmp_path / "m", "--prompt", "Hi"], capsys, "pytorch_model.bin")


def test_stale_temp_files_of_a_killed_prepare_go_at_the_next_prepare(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".tokens.k1ll3d.tmp", out / ".train.bin.x9.tmp"]  # what kill -9 mid-prepare leaves
    for file in stale:
        file.write_bytes(b"\0" * 1000)
    (tmp_path / "t.txt").write_text("hello world " * 50)
    prepare(tmp_path / "t.txt", out)
    assert not any(f.exists() for f in stale) and not list(out.glob(".*.tmp"))


def test_pool_workers_leave_ctrl_c_to_the_main_process():
    """A Ctrl-C during a sharded prepare printed every worker's KeyboardInterrupt traceback."""
    with worker_pool(2) as pool:
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN


def test_a_missing_named_file_in_a_table_folder_is_never_read_past(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "rows.jsonl").write_text("not json\n")
    with pytest.raises(GPT2LabError, match="rows.jsonl line 1: not JSON"):
        prepare_shards([src], tmp_path / "out", val_tokens=3, workers=1)
    assert not Path(tmp_path / "out").exists()
