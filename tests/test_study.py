"""A tiny variant study end to end: every file is written and the report's table is the CSV."""

import csv
import re

import pytest

from gpt2lab.config import GPT2LabError
from gpt2lab.study import run_study
from gpt2lab.study_report import TABLE_COLUMNS, fmt
from gpt2lab.study_suite import load_suite

SUITE = """
name = "tiny"
seeds = [1, 2]
parallel = 2

[model]
n_layer = 2
n_head = 4
n_embd = 32
block_size = 32

[train]
max_iters = 6
batch_size = 4
lr = 3e-3
warmup_iters = 2
eval_interval = 3
eval_iters = 2
ckpt_interval = 3
dtype = "float32"

[eval]
long_context = 64
decode_tokens = 4
sample_prompt = "To be"
sample_tokens = 8

[uptrain]
n_kv_head = 2
fraction = 0.5

[cost]
lengths = [64]
window = 16
n_head = 2
head_dim = 16
repeats = 1

[[variants]]
name = "baseline"

[[variants]]
name = "rope"
pos_encoding = "rope"
window = 8
"""


@pytest.mark.slow
def test_tiny_suite_end_to_end(tmp_path, shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:60_000]
    (tmp_path / "corpus.txt").write_text(text)
    (tmp_path / "tiny.toml").write_text(SUITE)
    suite = load_suite(tmp_path / "tiny.toml", data=str(tmp_path / "corpus.txt"))
    out = tmp_path / "study"
    report = run_study(suite, out, log=lambda *_: None)
    for name in (
        "results.csv",
        "runs.csv",
        "bands.csv",
        "cost.csv",
        "samples.csv",
        "report.md",
        "loss_curves.png",
        "loss_by_position.png",
        "quality_vs_kv.png",
        "cost_vs_length.png",
    ):
        assert (out / name).is_file(), name

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["baseline", "rope", "pooled-gqa2", "uptrain-gqa2"]
    table = [line for line in report.read_text().splitlines() if line.startswith("| ")][1:]
    assert len(table) == len(rows)
    for line, row in zip(table, rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [fmt(row, column) for column, *_ in TABLE_COLUMNS]
        assert cells[0] == row["variant"] and float(cells[9]) == pytest.approx(float(row["val_loss"]), abs=1e-4)
    # RoPE + window ran past the trained context; learned positions could not.
    with open(out / "bands.csv") as f:
        bands = {(b["variant"], b["band"]) for b in csv.DictReader(f)}
    assert ("rope", "beyond") in bands and ("baseline", "beyond") not in bands
    assert ("rope", "far") in bands and "  Receptive field of rope: positions" in report.read_text()

    # A second call finds every run finished and only rewrites the report.
    mtime = (out / "runs" / "baseline-s1" / "result.json").stat().st_mtime
    run_study(suite, out, log=lambda *_: None)
    assert (out / "runs" / "baseline-s1" / "result.json").stat().st_mtime == mtime


def test_set_overrides_the_suite_tables(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SUITE)
    suite = load_suite(path, overrides=["train.max_iters=10", "seeds=[3]", 'model.window=[8, "full"]', "eval.x=y"])
    assert (suite.train["max_iters"], suite.train["batch_size"], suite.seeds) == (10, 4, [3])
    assert suite.variant_config(suite.variants[0]).window == [8, None]
    assert suite.variant_config(suite.variants[1]).window == 8  # the variant's own key still wins
    assert suite.eval["x"] == "y" and suite.eval["decode_tokens"] == 4


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.max_iter=10", "unknown [train] key 'max_iter' (did you mean 'max_iters'?)"),
        ("sedes=[1]", "unknown key 'sedes' (did you mean 'seeds'?)"),
        ("variants.name=x", "name a key of one of the suite's tables"),
        ("train=3", "name a key of one of the suite's tables"),
        ("model.n_head=5", "n_embd (32) must be divisible by n_head (5)"),
        ("train.max_iters", "--set expects key=value"),
    ],
)
def test_set_errors_are_one_line(tmp_path, item, message):
    path = tmp_path / "tiny.toml"
    path.write_text(SUITE)
    with pytest.raises(GPT2LabError, match=re.escape(message)):
        load_suite(path, overrides=[item])
