"""A tiny variant study end to end (probe, extrapolation and uptraining included), and the pieces it is
built from checked against hand computations: t quantiles and intervals, n-gram losses, the passkey
probe's window boundary, sliding-context evaluation, first-head K/V conversion."""

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2lab.checkpoints.convert import pool_kv_heads
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.study.extrapolation import sliding
from gpt2lab.study.probe import PROBE_VOCAB, key_visible
from gpt2lab.study.report import RESULT_COLUMNS, num
from gpt2lab.study.run import _claim_folder, run_study
from gpt2lab.study.runs import Runs, eval_tokens, fingerprint_tokens, run_isolated, train_and_measure
from gpt2lab.study.stats import paired_difference, t_quantile
from gpt2lab.study.suite import load_suite, receptive_reach

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
max_iters = 4
batch_size = 4
lr = 3e-3
warmup_iters = 1
eval_interval = 2
eval_iters = 1
ckpt_interval = 4
dtype = "float32"

[eval]
max_tokens = 1024

[uptrain]
n_kv_heads = [2]
fractions = [0, 0.5]
first_head_fraction = 0

[probe]
variants = ["baseline", "window"]
steps = 3
batch_size = 4
samples = 8
context = 32

[extrapolation]
max_tokens = 256

[cost]
benchmarks = "no-such-benchmark.csv"

[[variants]]
name = "baseline"

[[variants]]
name = "rope"
pos_encoding = "rope"

[[variants]]
name = "window"
pos_encoding = "rope"
window = 8
compare_to = "rope"
"""


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_suite_end_to_end(tmp_path, shared_data):
    (tmp_path / "corpus.txt").write_text((shared_data / "tinyshakespeare.txt").read_text()[:60_000])
    (tmp_path / "tiny.toml").write_text(SUITE)
    suite = load_suite(tmp_path / "tiny.toml", data=str(tmp_path / "corpus.txt"))
    out = tmp_path / "study"
    report = run_study(suite, out, log=lambda *_: None).read_text()
    for name in (
        "results",
        "runs",
        "comparisons",
        "bands",
        "references",
        "uptrain",
        "probe",
        "extrapolation",
        "context_use",
    ):
        assert (out / f"{name}.csv").is_file(), name
    for name in (
        "loss_curves",
        "loss_by_position",
        "quality_vs_kv",
        "comparisons",
        "probe",
        "extrapolation",
        "uptrain",
        "context_use",
    ):
        assert (out / f"{name}.png").is_file(), name

    # Every run is scored on the same tokens: the study's evaluation span, recomputed here.
    runs = _rows(out / "runs.csv")
    expected = eval_tokens(str(out / "data"), 32, 1024)
    assert {(r["eval_sha"], int(r["eval_tokens"])) for r in runs} == {(fingerprint_tokens(expected), len(expected) - 1)}

    # The report's results table is results.csv, cell by cell; the command reproducing it names the suite file.
    rows = _rows(out / "results.csv")
    for row in rows:
        assert "| " + " | ".join(num(row[c], p) for c, _, p in RESULT_COLUMNS) + " |" in report.splitlines()
    assert f"gpt2lab study --suite {tmp_path / 'tiny.toml'} --data" in report
    assert "the other variants set `rope` pos_encoding = rope; `window` pos_encoding = rope, window = 8." in report

    # Paired differences: the window variant against rope, seed by seed, as the runs say.
    loss = {(r["variant"], int(r["seed"])): float(r["val_loss"]) for r in runs}
    window = next(r for r in _rows(out / "comparisons.csv") if r["variant"] == "window")
    assert window["reference"] == "rope"
    diffs = [loss[("window", s)] - loss[("rope", s)] for s in (1, 2)]
    assert float(window["mean_diff"]) == pytest.approx(np.mean(diffs), abs=2e-4)  # CSVs keep 6 digits

    # The probe sees the key exactly within reach 2 * (8 - 1) = 14; full attention everywhere.
    probe = _rows(out / "probe.csv")
    for r in probe:
        expect = r["variant"] != "window" or int(r["distance"]) <= 14
        assert r["key_visible"] == str(expect), r
    assert {14, 15} <= {int(r["distance"]) for r in probe} and {r["variant"] for r in probe} == {"baseline", "window"}

    # RoPE runs at 1x/2x/4x; learned positions at 1x and with the sliding comparator only.
    methods = {(r["variant"], r["method"]) for r in _rows(out / "extrapolation.csv")}
    assert {("rope", "4x"), ("baseline", "1x"), ("baseline", "sliding-4x")} <= methods
    assert ("baseline", "4x") not in methods

    # Uptraining: the control at fraction 0 is the baseline itself; converted cells have a paired row.
    up = _rows(out / "uptrain.csv")
    zero = {int(r["seed"]): float(r["val_loss"]) for r in up if r["method"] == "control" and float(r["fraction"]) == 0}
    assert zero == {s: pytest.approx(loss[("baseline", s)], abs=2e-4) for s in (1, 2)}
    pairs = _rows(out / "uptrain_pairs.csv")
    assert {r["method"] for r in pairs} == {"mean", "first"}
    assert {r["versus"] for r in pairs if r["method"] == "mean"} == {"continued MHA", "from scratch, same total steps"}
    scratch = {int(r["steps"]) for r in up if r["method"] == "scratch"}
    assert scratch == {2}  # the converted shape from scratch for the baseline's 4 steps + the largest fraction's 2

    # Context use: every run measured on the same targets; the report names each variant's effective context.
    cuts = _rows(out / "context_use.csv")
    assert {r["variant"] for r in cuts} == {"baseline", "rope", "window"} and "## Context use" in report

    # A second call keeps every finished run; another suite into the same folder is refused.
    kept = [out / "runs" / "baseline-s1" / "result.json", out / "runs" / "probe-window-s1.json"]
    mtimes = [p.stat().st_mtime for p in kept]
    run_study(suite, out, log=lambda *_: None)
    assert [p.stat().st_mtime for p in kept] == mtimes
    other = load_suite(tmp_path / "tiny.toml", data=str(tmp_path / "corpus.txt"), overrides=["train.max_iters=5"])
    with pytest.raises(GPT2LabError, match="holds a study of other settings"):
        run_study(other, out, log=lambda *_: None)


@pytest.mark.parametrize(
    ("p", "df", "expected"),  # textbook values of Student's t
    [
        (0.975, 1, 12.7062),
        (0.975, 2, 4.3027),
        (0.975, 4, 2.7764),
        (0.975, 10, 2.2281),
        (0.975, 30, 2.0423),
        (0.8, 2, 1.0607),
        (0.025, 5, -2.5706),
    ],  # fmt: skip
)
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-4)


def test_paired_interval_by_hand():
    # differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1, half width t(0.975, 2) * 0.1 / sqrt(3) = 0.24842
    got = paired_difference({1: 1.1, 2: 1.3, 3: 1.2, 4: 9.0}, {1: 1.0, 2: 1.0, 3: 1.0})
    assert got["seeds"] == 3 and got["mean_diff"] == pytest.approx(0.2)
    assert (got["low"], got["high"]) == (pytest.approx(0.2 - 0.24842, abs=1e-4), pytest.approx(0.2 + 0.24842, abs=1e-4))
    assert got["verdict"] == "no difference shown"
    assert got["detection_limit"] == pytest.approx((4.3027 + 1.0607) * 0.1 / math.sqrt(3), abs=1e-3)
    lower = paired_difference({1: 0.5, 2: 0.6, 3: 0.55}, {1: 1.0, 2: 1.0, 3: 1.0})
    assert lower["verdict"] == "lower" and lower["high"] < 0


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_probe_key_visible_exactly_within_reach(pos_encoding):
    config = GPTConfig(
        vocab_size=PROBE_VOCAB, n_layer=3, n_head=2, n_embd=16, block_size=32, window=4, pos_encoding=pos_encoding
    )
    assert receptive_reach(config) == 9
    model = GPT(config).eval()
    assert [key_visible(model, 32, d) for d in (1, 8, 9, 10, 20)] == [True, True, True, False, False]
    full = GPT(config.replace(window=None)).eval()
    assert receptive_reach(full.config) is None and key_visible(full, 32, 31)


def test_sliding_context_equals_token_by_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8)).eval()
    span = np.random.default_rng(0).integers(0, 50, 2 * 20 + 1)
    got = sliding(model, span, context=8, length=20, stride=1)
    expected = np.zeros(20)
    with torch.no_grad():
        for w in range(2):
            x = torch.from_numpy(span[w * 20 : w * 20 + 21])
            for t in range(20):  # target t+1 predicted from at most 8 tokens ending at t
                seen = x[max(0, t - 7) : t + 1][None]
                expected[t] += F.cross_entropy(model(seen)[0, -1], x[t + 1]).item() / 2
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_first_head_conversion_keeps_each_groups_first_head():
    config = GPTConfig(vocab_size=10, n_layer=1, n_head=4, n_embd=16, block_size=8)
    state = GPT(config).state_dict()
    new_config, new = pool_kv_heads(config, state, 2, init="first")
    hs, w = 4, state["transformer.h.0.attn.c_attn.weight"]
    k_old, v_old = w[16:32], w[32:48]
    w_new = new["transformer.h.0.attn.c_attn.weight"]
    assert new_config.n_kv_head == 2 and torch.equal(w_new[:16], w[:16])
    assert torch.equal(w_new[16:24], torch.cat([k_old[0:hs], k_old[2 * hs : 3 * hs]]))
    assert torch.equal(w_new[24:32], torch.cat([v_old[0:hs], v_old[2 * hs : 3 * hs]]))
    with pytest.raises(GPT2LabError, match="'mean' or 'first'"):
        pool_kv_heads(config, state, 2, init="last")


def test_set_overrides_the_suite_tables(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SUITE)
    suite = load_suite(path, overrides=["train.max_iters=10", "seeds=[3]", 'model.window=[8, "full"]', "eval.x=y"])
    assert (suite.train["max_iters"], suite.train["batch_size"], suite.seeds) == (10, 4, [3])
    assert suite.variant_config(suite.variants[0]).window == [8, None]
    assert suite.variant_config(suite.variants[2]).window == 8  # the variant's own key still wins
    assert suite.eval["x"] == "y" and suite.eval["max_tokens"] == 1024
    assert suite.reference_of(suite.variants[2]) == "rope" and suite.reference_of(suite.variants[1]) == "baseline"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.max_iter=10", "unknown [train] key 'max_iter' (did you mean 'max_iters'?)"),
        ("sedes=[1]", "unknown key 'sedes' (did you mean 'seeds'?)"),
        ("variants.name=x", "name a key of one of the suite's tables"),
        ("train=3", "name a key of one of the suite's tables"),
        ("model.n_head=5", "n_embd (32) must be divisible by n_head (5)"),
        ("train.max_iters", "--set expects key=value"),
        ("tokenizer=words", "tokenizer must be 'gpt2' or 'char'"),
        ('probe.variants=["rope", "wndow"]', "[probe] variants ['wndow'] are not variants of the suite"),
    ],
)
def test_set_errors_are_one_line(tmp_path, item, message):
    path = tmp_path / "tiny.toml"
    path.write_text(SUITE)
    with pytest.raises(GPT2LabError, match=re.escape(message)):
        load_suite(path, overrides=[item])


def test_a_study_written_with_the_old_block_size_still_reads(tmp_path, capsys):
    """Before seq_len had its name, [train] block_size was the training length: a suite file, a study
    folder's suite.json and a finished run's result.json that spell it so are read as seq_len."""
    path = tmp_path / "old.toml"
    path.write_text(SUITE.replace("[train]\n", "[train]\nblock_size = 16\n"))
    suite = load_suite(path)
    assert suite.train["seq_len"] == 16 and "block_size" not in suite.train
    assert capsys.readouterr().err.count("block_size is now called seq_len") == 1

    out = tmp_path / "study"
    _claim_folder(out, suite)
    saved = json.loads((out / "suite.json").read_text())
    saved["train"]["block_size"] = saved["train"].pop("seq_len")  # as the old layout wrote it
    (out / "suite.json").write_text(json.dumps(saved))
    _claim_folder(out, suite)  # the same study: accepted
    saved["train"]["block_size"] = 8
    (out / "suite.json").write_text(json.dumps(saved))
    with pytest.raises(GPT2LabError, match="holds a study of other settings"):
        _claim_folder(out, suite)

    runs = Runs(out / "runs", {"seq_len": 16, "data_dir": "d"}, {}, 1, log=lambda line: None)
    finished = out / "runs" / "baseline-s1"
    finished.mkdir(parents=True)
    old_fields = {"block_size": 16, "data_dir": "d", "seed": 1, "out_dir": str(finished)}
    (finished / "result.json").write_text(json.dumps({"fields": old_fields, "val_loss": 1.5}))
    assert runs.run("baseline", 1, {})["val_loss"] == 1.5  # kept, not trained again
    runs.close()


def test_compare_to_must_name_a_variant(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SUITE.replace('compare_to = "rope"', 'compare_to = "ropee"'))
    with pytest.raises(GPT2LabError, match="compares to 'ropee', which is no variant"):
        load_suite(path)


@pytest.mark.parametrize("name", ["default", "cpu", "gpu"])
def test_suites_can_tell_the_variants_apart(name):
    """Issue 12's regime: characters, context >= 256, >= 3 seeds, one window binding well inside the
    context and one whose stacked reach passes it, every probed window within the probe's context."""
    from pathlib import Path

    suite = load_suite(Path(__file__).resolve().parents[2] / "configs" / "study" / f"{name}.toml")
    context = suite.model["block_size"]
    assert suite.tokenizer == "char" and context >= 128 and len(suite.seeds) >= (3 if name == "default" else 5)
    configs = {v["name"]: suite.variant_config(v, 65) for v in suite.variants}
    reaches = [r for r in map(receptive_reach, configs.values()) if r is not None]
    assert min(reaches) <= context // 2 and max(reaches) > (context if name != "cpu" else 40)
    combined = configs["rope-gqa-window"]  # RoPE + GQA + window, in every suite
    assert combined.pos_encoding == "rope" and combined.n_kv_head < combined.n_head and combined.window
    for name in suite.probe["variants"]:
        assert (configs[name].window or 0) <= suite.probe["context"]
    # every variant changes exactly one thing of the reference it is compared with
    for variant in suite.variants[1:]:
        mine, ref = configs[variant["name"]].to_dict(), configs[suite.reference_of(variant)].to_dict()
        assert len([k for k in mine if mine[k] != ref[k]]) == 1, variant["name"]


def test_a_run_stopped_by_a_signal_is_not_recorded_as_finished(tmp_path, corpus, monkeypatch):
    """Ctrl-C reaches the study's training children too: each saves its checkpoint and returns "stopped".
    Scoring that half-trained model as the run's result would let a re-run keep it as finished."""
    import gpt2lab.study.runs

    names = []

    def stopped_training(cfg, resume, run_name=None):
        names.append(run_name)
        return {"stopped": True, "signal": 2, "step": 3}

    monkeypatch.setattr(gpt2lab.study.runs, "train", stopped_training)
    fields = {"data_dir": str(corpus), "out_dir": str(tmp_path / "run"), "preset": None, "seq_len": 32}
    fields["model"] = {"n_layer": 1, "n_head": 2, "n_embd": 16}
    with pytest.raises(GPT2LabError, match="stopped at step 3 by a signal: run the study again to resume"):
        train_and_measure(fields, {"max_tokens": 64}, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "result.json").exists()
    assert names == ["run"]  # trackers name each run after its folder (VARIANT-sSEED in a study)


def test_a_run_process_that_dies_without_a_result_is_an_error_not_a_hang():
    with pytest.raises(GPT2LabError, match=r"_exit failed: its process ended \(exit code 3\) without a result"):
        run_isolated(os._exit, 3, threads=1)


def test_the_report_explains_a_control_that_first_gets_worse(tmp_path):
    from gpt2lab.study.sections import _control_jolt

    (tmp_path / "tiny.toml").write_text(SUITE)
    suite = load_suite(tmp_path / "tiny.toml", data="shakespeare")

    def control(losses):
        return [{"method": "control", "steps": s, "val_loss": v} for s, v in losses] + [
            {"method": "mean", "steps": 9, "val_loss": 9.0}  # other methods do not count
        ]

    text = _control_jolt(control([(0, 2.0), (0, 2.2), (9, 2.5), (9, 2.5), (18, 1.0)]), suite)
    assert "rises, from 2.100 to 2.500 after 9 steps" in text and "(0.003)" in text
    assert _control_jolt(control([(0, 2.0), (9, 1.9), (18, 3.0)]), suite) == ""


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, then the parent's pid); None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has ended; only its exit status is left


def _children(pid: int) -> list[int]:
    """Running processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for path in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(path.name))
        if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(path.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_run_process_stops_when_the_study_process_is_killed():
    """Killing `gpt2lab study` must not leave its training children running on, orphaned."""
    study = "import time; from gpt2lab.study.runs import run_isolated; run_isolated(time.sleep, 120)"
    parent = subprocess.Popen([sys.executable, "-c", study])
    try:
        deadline = time.monotonic() + 60
        while len(_children(parent.pid)) < 2 and time.monotonic() < deadline:  # the run and its resource tracker
            time.sleep(0.2)
        children = _children(parent.pid)
        assert children, "the run process never started"
        # kill the study once the run is under way (torch loaded, the request to stop with it in place)
        while not any("libtorch" in _maps(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in children if _running(pid)]
    assert not alive, f"orphaned processes still running: {alive}"


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def test_holm_by_hand():
    from gpt2lab.study.stats import holm

    rows = holm([{"p_value": p} for p in (0.01, 0.04, 0.03, 0.2)] + [{"p_value": ""}])
    # sorted 0.01, 0.03, 0.04, 0.2 against 0.05/4, 0.05/3, 0.05/2, 0.05/1: adjusted 0.04, 0.09, 0.09, 0.2
    assert [r["p_holm"] for r in rows[:4]] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert [r["holm_significant"] for r in rows[:4]] == [True, False, False, False]
    assert rows[4]["p_holm"] == ""


def test_unpaired_interval_and_seed_correlation():
    mine, ref = {1: 1.0, 2: 1.2, 3: 1.1, 4: 1.4}, {1: 0.9, 2: 1.0, 3: 1.05, 4: 1.2}
    row = paired_difference(mine, ref)
    a, b = np.array(list(mine.values())), np.array(list(ref.values()))
    assert row["seed_correlation"] == pytest.approx(np.corrcoef(a, b)[0, 1])
    se = math.sqrt(a.var(ddof=1) / 4 + b.var(ddof=1) / 4)
    df = se**4 / ((a.var(ddof=1) / 4) ** 2 / 3 + (b.var(ddof=1) / 4) ** 2 / 3)
    half = t_quantile(0.975, int(df)) * se
    assert row["unpaired_low"] == pytest.approx(a.mean() - b.mean() - half)
    assert row["unpaired_high"] - row["unpaired_low"] > row["high"] - row["low"]  # r > 0: pairing narrows it
    # the paired p-value: two-sided t test of the differences
    d = a - b
    t = d.mean() / (d.std(ddof=1) / 2)
    from gpt2lab.study.stats import t_cdf

    assert row["p_value"] == pytest.approx(2 * (1 - t_cdf(t, 3)))


def test_loss_by_cut_reads_exactly_the_last_c_tokens():
    from gpt2lab.study.context_use import effective_context, loss_by_cut

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=16, pos_encoding="rope")).eval()
    tokens = np.random.default_rng(0).integers(0, 11, 200)
    measured = loss_by_cut(model, tokens, context=16, targets=5, batch_size=2)
    assert measured["lengths"][0] == 1 and measured["lengths"][-1] == 16 and measured["targets"] == 5
    at = np.arange(16, 200, (200 - 16) // 5)[:5]
    for c, loss in zip(measured["lengths"], measured["loss"], strict=True):
        with torch.no_grad():
            expected = np.mean(
                [
                    F.cross_entropy(model(torch.tensor(tokens[i - c : i])[None])[0, -1], torch.tensor(tokens[i])).item()
                    for i in at
                ]  # fmt: skip
            )
        assert loss == pytest.approx(expected, abs=1e-5), c
    # the smallest c from which every longer cut costs < 0.01 nats
    assert effective_context([1, 2, 4, 8], [2.5, 2.1, 2.005, 2.0]) == 4
    assert effective_context([1, 2, 4, 8], [2.5, 2.0, 2.05, 2.0]) == 8  # a later cut that costs: not yet
    assert effective_context([1, 2, 4, 8], [2.0, 2.0, 2.0, 2.0]) == 1


def test_a_continuation_starts_from_the_final_state_with_pooled_moments(tmp_path, corpus):
    """Uptraining resumes the baseline's last checkpoint: its step, its AdamW moments (K/V pooled like the
    weights) and its data order, with the learning rate flat at min_lr past the baseline's schedule."""
    from gpt2lab.checkpoints.train_state import load_checkpoint
    from gpt2lab.study.continuation import continuation_fields, seed_continuation
    from gpt2lab.train.config import TrainConfig
    from gpt2lab.train.loop import train
    from gpt2lab.train.setup import lr_at

    model = {"n_layer": 1, "n_head": 4, "n_embd": 16, "block_size": 16, "pos_encoding": "rope"}
    base = {"data_dir": str(corpus), "seq_len": 16, "batch_size": 2, "max_iters": 4, "lr": 1e-2, "min_lr": 1e-3,
            "warmup_iters": 1, "eval_interval": 4, "eval_iters": 1, "ckpt_interval": 4, "dtype": "float32"}  # fmt: skip
    train(TrainConfig(**base, preset=None, model=model, out_dir=str(tmp_path / "base")))
    config = GPTConfig.from_dict({**model, "vocab_size": 50257})
    fields = {**base, **continuation_fields(base, config, 3, 2), "out_dir": str(tmp_path / "up")}
    cfg = TrainConfig(**fields)
    assert [lr_at(s, cfg) for s in (4, 5, 6)] == [1e-3] * 3  # no re-warm-up: flat at the final rate
    seed_continuation(str(tmp_path / "base"), str(tmp_path / "up"), cfg.to_dict(), 2, "mean")
    before, after = load_checkpoint(tmp_path / "base" / "ckpt.pt"), load_checkpoint(tmp_path / "up" / "ckpt.pt")
    assert after["step"] == before["step"] == 4 and _same(after["rng"], before["rng"])
    name = "transformer.h.0.attn.c_attn.weight"
    for key in ("exp_avg", "exp_avg_sq"):
        moment = before["optimizer"]["state"][name][key]  # rows q (16) | k (4 heads x 4) | v (4 heads x 4)
        pooled = after["optimizer"]["state"][name][key]  # q (16) | k (2 heads x 4) | v (2 heads x 4)
        assert torch.equal(pooled[:16], moment[:16])
        for new, old in ((pooled[16:24], moment[16:32]), (pooled[24:32], moment[32:48])):
            assert torch.allclose(new, old.reshape(2, 2, 4, 16).mean(dim=1).reshape(8, 16))
    assert after["model"][name].shape == (32, 16) and after["model_config"]["n_kv_head"] == 2
    summary = train(cfg, resume=True)
    assert summary["step"] == 7


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_out_of_time_stops_a_run_and_reports_it():
    from gpt2lab.study.runs import OutOfTime

    start = time.monotonic()
    with pytest.raises(OutOfTime):
        run_isolated(time.sleep, 60, threads=1, deadline=time.monotonic() + 1)
    assert time.monotonic() - start < 30


CHUNK_SUITE = """
name = "chunks"
tokenizer = "char"
seeds = [1, 2]
parallel = 2
[model]
n_layer = 1
n_head = 2
n_embd = 16
block_size = 32
[train]
max_iters = 3
batch_size = 2
seq_len = 32
warmup_iters = 1
eval_interval = 3
eval_iters = 1
ckpt_interval = 3
dtype = "float32"
[eval]
max_tokens = 512
context_targets = 16
[[variants]]
name = "baseline"
[[variants]]
name = "gqa"
n_kv_head = 1
"""


@pytest.mark.slow
def test_a_study_in_chunks_reports_what_is_present_and_names_what_is_missing(tmp_path, shared_data):
    (tmp_path / "corpus.txt").write_text((shared_data / "tinyshakespeare.txt").read_text()[:40_000])
    (tmp_path / "chunks.toml").write_text(CHUNK_SUITE)
    suite = load_suite(tmp_path / "chunks.toml", data=str(tmp_path / "corpus.txt"))
    out = tmp_path / "study"
    # a chunk with no time left trains nothing: the report says so and names every run
    first = run_study(suite, out, log=lambda *_: None, max_minutes=0).read_text()
    assert "No baseline run has finished" in first and "- baseline-s1" in first and "- gqa-s2" in first
    # a chunk with time trains them all: a complete report, nothing missing
    full = run_study(suite, out, log=lambda *_: None, max_minutes=30).read_text()
    assert "## Missing runs" not in full and (out / "missing.txt").read_text() == ""
    # one run lost (say its chunk ran out): the next report is built from the others and names it
    (out / "runs" / "gqa-s2" / "result.json").unlink()
    (out / "runs" / "gqa-s2" / "ckpt.pt").unlink()
    partial = run_study(suite, out, log=lambda *_: None, max_minutes=0).read_text()
    assert "## Missing runs" in partial and "`gqa-s2`" in partial
    gqa = next(r for r in _rows(out / "results.csv") if r["variant"] == "gqa")
    assert gqa["seeds"] == "1"
    # the first paragraph compares the reference with the best count model, from references.csv
    refs = {r["model"]: float(r["val_loss"]) for r in _rows(out / "references.csv")}
    assert set(refs) == {"1-gram", "2-gram", "3-gram", "4-gram", "5-gram"}
    assert partial.splitlines()[2].startswith("**The reference")
    assert f"{min(refs.values()):.4f}" in partial.splitlines()[2]


def test_a_variants_step_time_is_the_median_over_its_seeds(tmp_path):
    """One run slowed by a neighbour on a shared machine must not move its variant's measured cost."""
    from gpt2lab.study.run import _variant_row

    path = tmp_path / "tiny.toml"
    path.write_text(SUITE)
    suite = load_suite(path)
    times = {1: 10.0, 2: 11.0, 3: 40.0}  # seed 3 ran beside another job
    results = [
        {"variant": "baseline", "seed": seed, "val_loss": 2.0, "train_tok_s": 1e3 / ms, "step_ms": ms,
         "peak_mib": 100.0, "by_position": [2.0] * 16, "eval_tokens": 64, "eval_sha": "x"}
        for seed, ms in times.items()
    ]  # fmt: skip
    row = _variant_row(suite, suite.variants[0], 65, 16, results)
    assert row["step_ms"] == 11.0 and row["train_tok_s"] == pytest.approx(1e3 / 11.0)
