"""The GPU check (run by scripts/gpu-check.sh; the device command is in scripts/device-gpu-check.md): what the
CPU test suite cannot show, in under 8 minutes on one H100/H200, compilation included.

Sections, in this order, each under its own time budget (``BUDGETS``) and the total (``--budget``):

  environment  GPU, torch, CUDA, driver, the peak FLOP/s that MFU divides by, a measured bf16 matmul rate
  parity       gpt2lab's GPT-2 against transformers' on the same weights: logits in fp32 (TF32 off) and
               bf16, 32 greedy tokens
  decoding     124M greedy decoding in fp32 at B=1 and B=64: eager, compiled, compiled + CUDA graphs;
               tokens/s, tokens equal, the mode each decoder ended in
  training     124M at T=1024, bf16, compiled, B=64 then B=16, through gpt2lab.train.loop.train: tokens/s,
               MFU, peak memory against `gpt2lab plan` (two compilations of about a minute and a half each,
               evaluation's included)
  attention    sliding window vs full causal at T=1024/4096/8192, forward + backward in bf16, every path
               checked against a dense-mask reference (gpu_check_attention.py)
  tiny_loss    one tiny character-level run (same config, seed, data) on the CPU and on the GPU: the losses
  distributed  the tiny run under DDP and FSDP2 on a one-process group, against the bare run

The order is the issue's goals first (MFU and memory, decoding, windows), the checks without a goal last: the
budgets add up to more than the total, so the total cuts the last sections short, and a rerun of just those
(``--sections tiny_loss,distributed``) fits in a few minutes. The fp32 sections come before training: the
trainer switches TF32 on for the whole process, and this check never sets it itself (setting it through two
APIs in one process breaks Inductor in recent PyTorch); the sections after training run in bf16 or through the
trainer, which sets TF32 itself.

The JSON (``--out``) and its Markdown table (same name, ``.md``) are rewritten, atomically, after every
section. A section that fails records its error and the next one runs; one that runs past its budget is
stopped (SIGALRM) with the figures it had; SIGTERM (the shell's outer timeout) stops the check with
everything finished so far on disk. ``--smoke`` runs every section at tiny sizes, on a CPU too (what needs
CUDA is recorded as skipped): the tests run it. Sizes and sections: gpu_check_sections.py. The commit recorded is
git's, or ``GPT2LAB_COMMIT`` in a checkout without .git (a working tree copied to a GPU machine).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_sections as sections  # noqa: E402
from gpu_check_attention import attention  # noqa: E402
from gpu_check_sections import Context, Stopped  # noqa: E402

from gpt2lab.files import write_json, write_text  # noqa: E402
from gpt2lab.train.plan import peak_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMIT_VARIABLE = "GPT2LAB_COMMIT"  # the commit, where the checkout has no .git (see git_commit)
# Seconds per section on one H100/H200 (estimates: the 124M training step compiles in about a minute, the decoding
# step and the flex kernels in tens of seconds). They add up to more than the total on purpose: most sections end
# well inside theirs, and the total cuts the last ones short rather than the first.
BUDGETS = {"environment": 30, "parity": 60, "decoding": 90, "training": 200, "attention": 90, "tiny_loss": 45,
           "distributed": 60}  # fmt: skip
SMOKE_BUDGETS = dict.fromkeys(BUDGETS, 45)
TOTAL_BUDGET, SMOKE_TOTAL_BUDGET = 420, 150  # seconds; scripts/gpu-check.sh's timeout comes 40 s after
MIN_SECTION_SECONDS = 10  # a section is skipped rather than started with less than this left


class SectionTimeout(BaseException):
    """A section ran past its budget (raised from SIGALRM). Not an Exception: nothing inside may swallow it."""


def _raise(kind: type[BaseException]):
    def handler(signum, frame):
        raise kind()

    return handler


def environment(ctx: Context, out: dict) -> None:
    out |= {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": ctx.device.type, "commit": git_commit()}  # fmt: skip
    # Triton builds its kernel launchers with a C compiler when it first compiles: without one, every
    # torch.compile on the GPU fails (and the compiled sections fall back or record the error)
    out["c_compiler"] = next((path for cc in ("cc", "gcc", "clang") if (path := shutil.which(cc))), "missing")
    for package in ("transformers", "triton"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "missing"
    if not ctx.cuda:
        out["headline"] = f"no CUDA: {platform.processor() or platform.machine()}, torch {torch.__version__}"
        return
    props = torch.cuda.get_device_properties(ctx.device)
    out |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count, "driver": _driver()}  # fmt: skip
    peak = peak_flops(ctx.device, torch.bfloat16)
    out["peak_bf16_flops"] = peak  # None: the GPU is not in gpt2lab.train.plan.PEAK_FLOPS, and no MFU is computed
    out["peak_source"] = "gpt2lab.train.plan.PEAK_FLOPS: datasheet, dense bf16" if peak else "GPU not listed: no MFU"
    out["matmul_bf16_tflops"] = sections.matmul_tflops(ctx.device)
    out["headline"] = (
        f"{props.name}, driver {out['driver']}, torch {torch.__version__} CUDA {torch.version.cuda}; "
        f"bf16 matmul {out['matmul_bf16_tflops']:.0f} TFLOP/s measured, peak used for MFU "
        f"{peak / 1e12 if peak else float('nan'):.0f}"
    )


def _driver() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_commit(root: Path = ROOT) -> str:
    """The commit checked: git's, else ``$GPT2LAB_COMMIT``, else "unknown". A lent GPU machine gets the working tree
    without .git, so git cannot tell there; the device command passes the commit (scripts/device-gpu-check.md)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = head.stdout.strip() if head.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):  # no git installed, or it hung
        commit = ""
    return commit or os.environ.get(COMMIT_VARIABLE, "").strip() or "unknown"


SECTIONS: dict[str, Callable[[Context, dict], None]] = {
    "environment": environment,
    "parity": sections.parity,
    "decoding": sections.decoding,
    "training": sections.training,
    "attention": attention,
    "tiny_loss": sections.tiny_loss,
    "distributed": sections.distributed,
}


# ---------------------------------------------------------------------------------------- the runner


def run_sections(
    chosen: dict[str, Callable[[Context, dict], None]],
    budgets: dict[str, float],
    total: float,
    ctx: Context,
    results: dict,
    out: Path,
    min_seconds: float = MIN_SECTION_SECONDS,
) -> None:
    """Run each section under min(its budget, what is left of ``total``; skipped under ``min_seconds``); after each,
    rewrite ``out``. Raises :class:`Stopped` on SIGTERM, after writing what was finished."""
    start = time.monotonic()
    handlers = {signal.SIGALRM: signal.signal(signal.SIGALRM, _raise(SectionTimeout)),
                signal.SIGTERM: signal.signal(signal.SIGTERM, _raise(Stopped))}  # fmt: skip
    try:
        for name, section in chosen.items():
            figures = results["sections"].setdefault(name, {})
            seconds = min(budgets[name], total - (time.monotonic() - start))
            try:
                if seconds < min_seconds:
                    figures["status"] = f"skipped: {max(seconds, 0):.0f} s of the total budget left"
                else:
                    _run_one(section, seconds, ctx, figures)
            finally:  # after every section, SIGTERM included
                write_results(results, out)
                print(headline(name, figures), flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _run_one(section, seconds: float, ctx: Context, figures: dict) -> None:
    """One section under an alarm: its figures, and its status ("ok", "timeout ...", "error") in ``figures``."""
    began = time.monotonic()
    ctx.deadline = began + seconds
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        section(ctx, figures)
        signal.setitimer(signal.ITIMER_REAL, 0)
        figures.setdefault("status", "ok")
    except SectionTimeout:
        figures["status"] = f"timeout: stopped at the end of its {seconds:.0f} s, with the figures measured by then"
    except Stopped:
        signal.setitimer(signal.ITIMER_REAL, 0)
        figures["status"] = "stopped by SIGTERM (the outer timeout)"
        raise
    except Exception as error:  # the next section runs all the same
        signal.setitimer(signal.ITIMER_REAL, 0)
        figures["status"] = "error"
        figures["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"[:300]
        figures["traceback"] = traceback.format_exc().strip().splitlines()[-12:]
    finally:
        figures["seconds"] = round(time.monotonic() - began, 1)
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()


def headline(name: str, figures: dict) -> str:
    """The line printed for a section: its state, its time, its headline figures (or what stopped it)."""
    state, _, why = figures.get("status", "?").partition(": ")
    detail = " ".join(part for part in (figures.get("headline"), figures.get("error"), why) if part)
    return f"{name:<12} {state:<8} {figures.get('seconds', 0):6.1f} s  {detail}"


def write_results(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    write_text(out.with_suffix(".md"), markdown(results))


def markdown(results: dict) -> str:
    """Every section as a two-column table (nested figures flattened to dotted names), for docs/benchmarks.md."""
    commit = results.get("commit", "unknown")
    lines = [f"# GPU check: {results['device']} ({results['date']}, torch {results['torch']}, commit {commit})", ""]
    for section, figures in results["sections"].items():
        lines += [f"## {section}", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {key} | {_shown(value)} |" for key, value in _flatten(figures) if key != "traceback"]
        lines.append("")
    return "\n".join(lines)


def _flatten(figures: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in figures.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 6:
        return f"{len(value)} values: {_shown(value[0])} … {_shown(value[-1])}"
    text = json.dumps(value) if isinstance(value, list) else str(value)
    return text.replace("|", "\\|")


def default_out(device_name: str, smoke: bool) -> Path:
    """benchmarks/results/gpu-check-<gpu>-<date>.json, the GPU named as in lower case with dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    return ROOT / "benchmarks" / "results" / f"gpu-check-{'smoke-' if smoke else ''}{slug}-{date}.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="a GPT-2 folder (hub layout); default: random")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (the .md goes beside it)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: checks the script itself")
    parser.add_argument("--budget", type=float, default=None, help="total seconds (default 420; smoke 150)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("error: no CUDA device: the GPU check needs one (--smoke runs tiny sizes on CPU)", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = args.out or default_out(name, args.smoke)
    chosen = {s: SECTIONS[s] for s in SECTIONS if s in args.sections.split(",")}
    total = args.budget or (SMOKE_TOTAL_BUDGET if args.smoke else TOTAL_BUDGET)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    # the commit at the top too, so that a rerun of some sections (without environment) names it as well
    results = {"device": name, "date": date, "torch": torch.__version__, "commit": git_commit(), "smoke": args.smoke,
               "budget_s": total, "sections": {}}  # fmt: skip
    print(f"GPU check on {name}: {', '.join(chosen)} within {total:.0f} s; results in {out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(device, args.smoke, Path(tmp), args.weights)
        try:
            run_sections(chosen, SMOKE_BUDGETS if args.smoke else BUDGETS, total, ctx, results, out)
        except Stopped:
            print(f"stopped by SIGTERM; finished sections are in {out}", flush=True)
            return 143
    print("\n".join(["", "summary:", *(headline(n, f) for n, f in results["sections"].items()), f"results: {out}"]))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
