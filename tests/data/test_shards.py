"""prepare at scale: parquet / jsonl / arrow files the test writes -> token shards + manifest, read back as
one split by TokenData and training; parallel equals serial; a kill -9 mid-prepare resumes to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from training_helpers import tiny_config

from gpt2lab.cli.main import main
from gpt2lab.data.shards import prepare_shards
from gpt2lab.data.sources import SourceOptions
from gpt2lab.data.tokens import ShardedTokens, TokenData
from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import load_tokenizer
from gpt2lab.train.loop import train

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = [f"Document {i}: " + "naïve words, here and there. " * (i % 7 + 1) for i in range(400)]
TEXTS[5] = "   "  # an empty document is skipped, as prepare does for text files


def _expected_tokens(texts) -> np.ndarray:
    enc = load_tokenizer()
    return np.array([t for text in texts if text.strip() for t in enc.encode_ordinary(text) + [enc.eot_token]])


def _all_tokens(folder: Path) -> np.ndarray:
    data = TokenData.open(folder)
    return np.concatenate([np.asarray(data.val), np.asarray(data.train)])


@pytest.fixture
def corpus_files(tmp_path):
    pq.write_table(pa.table({"id": range(400), "text": TEXTS}), tmp_path / "c.parquet", row_group_size=64)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    table = pa.table({"text": TEXTS})
    with pa.ipc.new_stream(tmp_path / "c.arrow", table.schema) as writer:  # the format datasets caches in
        writer.write_table(table, max_chunksize=50)
    return tmp_path


@pytest.mark.parametrize("name, column", [("c.parquet", "text"), ("c.jsonl", "body"), ("c.arrow", "text")])
def test_table_files_become_shards(corpus_files, name, column):
    out = corpus_files / f"out-{name}"
    meta = prepare_shards([corpus_files / name], out, SourceOptions(column), 1500, 400, workers=1, chunk_docs=16)
    expected = _expected_tokens(TEXTS)
    assert np.array_equal(_all_tokens(out), expected)  # val holds the first documents, train the rest
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and meta["documents"] == 399 and meta["tokens"] == len(expected)
    shards = manifest["shards"]
    assert shards[0]["split"] == "val" and 400 <= shards[0]["tokens"] and len(meta["shards"]["train"]) >= 5
    assert all(s["tokens"] >= 1500 for s in shards[1:-1])
    ends = np.cumsum([s["tokens"] for s in shards])
    assert all(expected[e - 1] == load_tokenizer().eot_token for e in ends)  # shards end at document ends
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(t.encode()) for t in TEXTS if t.strip())


def test_parallel_equals_serial_and_training_reads_shards(corpus_files, tmp_path):
    serial = prepare_shards([corpus_files / "c.parquet"], tmp_path / "s", None, 1500, 400, workers=1, chunk_docs=8)
    parallel = prepare_shards([corpus_files / "c.parquet"], tmp_path / "p", None, 1500, 400, workers=2, chunk_docs=8)
    assert serial == parallel
    for f in serial["shards"]["train"]:
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "p" / f).read_bytes()
    # training on shards resumes exactly: the sampler's state is the data position
    straight = train(tiny_config(tmp_path / "p", tmp_path / "a", "max_iters=4"))
    train(tiny_config(tmp_path / "p", tmp_path / "b", "max_iters=2"))
    resumed = train(tiny_config(tmp_path / "p", tmp_path / "b", "max_iters=4"), resume=True)
    assert resumed["losses"] == straight["losses"][2:] and np.isfinite(straight["val_loss"])


def test_sharded_slices_equal_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 50257, n).astype(np.uint16) for n in (5, 1, 17, 3)]
    whole, sharded = np.concatenate(parts), ShardedTokens(parts)
    assert len(sharded) == len(whole)
    for _ in range(300):
        a, b = sorted(rng.integers(0, len(whole) + 1, 2))
        assert np.array_equal(sharded[a:b], whole[a:b])
    assert np.array_equal(np.asarray(sharded), whole)


def test_bad_inputs_are_one_line(corpus_files):
    with pytest.raises(GPT2LabError, match="no column 'body'.*--text-column"):
        prepare_shards([corpus_files / "c.parquet"], corpus_files / "o1", SourceOptions("body"), workers=1)
    with pytest.raises(GPT2LabError, match="holds int64, not text"):
        prepare_shards([corpus_files / "c.parquet"], corpus_files / "o1", SourceOptions("id"), workers=1)
    assert not (corpus_files / "o1").exists()  # a failed first prepare leaves no folder behind
    with pytest.raises(GPT2LabError, match="line 1: no 'text' field"):
        prepare_shards([corpus_files / "c.jsonl"], corpus_files / "o2", workers=1)
    with pytest.raises(GPT2LabError, match="all of them in the validation shard"):
        prepare_shards([corpus_files / "c.jsonl"], corpus_files / "o3", SourceOptions("body"), 100, 10**9, workers=1)
    assert (
        main(["prepare", str(corpus_files / "c.jsonl"), "--out", str(corpus_files / "o4"), "--val-fraction", "0.2"])
        == 2
    )


SLOW_PREPARE = """
import sys, time
from gpt2lab.data import shards
close = shards.ShardWriter.close_shard
def slow_close(self):
    close(self)
    time.sleep(0.2)  # a shard every 0.2 s at least: the test's kill lands in the middle
shards.ShardWriter.close_shard = slow_close
shards.prepare_shards([sys.argv[1]], sys.argv[2], None, 300, 200, workers=2, chunk_docs=8)
"""


def test_resume_after_kill(corpus_files, tmp_path):
    reference = prepare_shards([corpus_files / "c.parquet"], tmp_path / "ref", None, 300, 200, workers=1)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    cmd = [sys.executable, "-c", SLOW_PREPARE, str(corpus_files / "c.parquet"), str(out)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        manifest = out / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the prepare ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # the prepare and its workers, mid-shard
    proc.wait()
    done = json.loads((out / "manifest.json").read_text())
    assert not done["complete"] and not (out / "meta.json").exists()
    resumed = prepare_shards([corpus_files / "c.parquet"], out, None, 300, 200, workers=1)
    assert resumed == reference
    assert np.array_equal(_all_tokens(out), _all_tokens(tmp_path / "ref"))
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(GPT2LabError, match="other sources or settings"):
        prepare_shards([corpus_files / "c.parquet"], out, None, 301, 200, workers=1)


def test_hf_source_streams_a_local_dataset(corpus_files, tmp_path):
    """``hf:`` goes through datasets.load_dataset(streaming=True); a local folder of parquet stands in for the hub."""
    pytest.importorskip("datasets")
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "train.parquet").write_bytes((corpus_files / "c.parquet").read_bytes())
    meta = prepare_shards([f"hf:{folder}"], tmp_path / "o", None, 1500, 400, workers=1)
    assert np.array_equal(_all_tokens(tmp_path / "o"), _expected_tokens(TEXTS)) and meta["documents"] == 399


def test_prepare_cli_routes_tables_to_shards(corpus_files, capsys):
    out = corpus_files / "cli"
    args = ["prepare", str(corpus_files / "c.parquet"), "--out", str(out), "--shard-tokens", "1500"]
    assert main([*args, "--val-tokens", "400", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "399 documents" in printed and "train shard(s) + 1 val" in printed
    assert np.array_equal(_all_tokens(out), _expected_tokens(TEXTS))
    assert main([*args, "--val-tokens", "400", "--threads", "1"]) == 0  # already complete: nothing redone


def test_lone_surrogates_are_replaced_not_fatal(tmp_path):
    """JSON may escape a lone surrogate (\\ud800), which no UTF-8 text holds: it becomes '?'."""
    lines = ['{"text": "broken \\ud800 here ' + "and more words " * 20 + '"}'] * 3
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    meta = prepare_shards([tmp_path / "s.jsonl"], tmp_path / "o", None, 10, 10, workers=1)
    text = load_tokenizer().decode(np.asarray(TokenData.open(tmp_path / "o").val).tolist())
    assert meta["documents"] == 3 and text.startswith("broken ? here")
