"""nanoGPT's own CPU recipe for character-level Tiny Shakespeare, run by nanoGPT and by gpt2lab side by side.

nanoGPT's README trains a small model on a CPU ("I only have a macbook"):

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

gpt2lab's equivalent is configs/nanogpt-shakespeare-char-cpu.toml (same shape, learned positions, full
attention, exact GELU, same schedule, optimizer, batch, evaluation and seed). This script prepares the same
characters for both (nanoGPT's own data/shakespeare_char/prepare.py, and ``gpt2lab prepare`` with the split
at the same character, checked byte for byte), then runs the two in separate processes, alternating, for
``--rounds`` rounds, and reports for each run: wall time of the whole process, the median time of a step
(iterations with an evaluation or checkpoint left out: nanoGPT's printed times, gpt2lab's logged ``dt``),
steps/s, the final validation loss as the run itself estimates it (20 random batches in nanoGPT, 20 fixed
ones in gpt2lab) and on the whole validation split (every 64-character window, one protocol for both
models), with ratios gpt2lab / nanoGPT, the CPU (lscpu model and flags) and the load average.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt          # the reference, run as it is
    python benchmarks/nanogpt_cpu.py --nanogpt /tmp/nanogpt --text tinyshakespeare.txt --rounds 3
    python benchmarks/nanogpt_cpu.py --nanogpt /tmp/nanogpt --text tinyshakespeare.txt --iters 50 --rounds 1
    python benchmarks/nanogpt_cpu.py --nanogpt /tmp/nanogpt --text tinyshakespeare.txt --profile

``--iters N`` shortens both runs (a smoke check: evaluation every min(250, N) steps). ``--profile`` runs no
training: it profiles gpt2lab's step (torch.profiler: operators per step, time shares of batch, forward and
loss, backward, optimizer, logging, metrics writing, progress bar, evaluation, checkpoint) and nanoGPT's step
(its model and optimizer, as its train.py steps them) and prints operator counts side by side.
Only timings from a quiet machine mean anything; operator counts do not depend on the load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2lab.cli.kernel_report import cpu_description
from gpt2lab.files import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "nanogpt-shakespeare-char-cpu.toml"
RECIPE = [
    "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
    "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0",
]  # fmt: skip
BLOCK = 64  # the recipe's context: the windows of the whole-split evaluation


# ---------------------------------------------------------------------------------------- the machine


# ---------------------------------------------------------------------------------------- the data


def prepare_both(nanogpt: Path, text: Path, work: Path) -> Path:
    """nanoGPT's split by its own prepare.py; gpt2lab's by ``gpt2lab prepare`` cut at the same character.
    Returns gpt2lab's data folder; stops if the token files of the two differ in any byte."""
    folder = nanogpt / "data" / "shakespeare_char"
    shutil.copyfile(text, folder / "input.txt")
    script = folder / "prepare.py"
    if importlib.util.find_spec("requests") is None:  # prepare.py imports it to download a missing input.txt
        code = "import sys, types, runpy; sys.modules['requests'] = types.ModuleType('requests'); "
        subprocess.run(
            [sys.executable, "-c", code + f"runpy.run_path({str(script)!r}, run_name='__main__')"], check=True
        )
    else:
        subprocess.run([sys.executable, str(script)], check=True, capture_output=True)
    n = len(text.read_text(encoding="utf-8"))
    val_fraction = (n - int(n * 0.9)) / n  # nanoGPT: train = the first int(0.9 n) characters
    data = work / "gpt2lab-data"
    cmd = [sys.executable, "-m", "gpt2lab", "prepare", str(text), "--tokenizer", "char", "--out", str(data)]
    subprocess.run([*cmd, "--val-fraction", repr(val_fraction), "--overwrite"], check=True, capture_output=True)
    for split in ("train.bin", "val.bin"):
        if (folder / split).read_bytes() != (data / split).read_bytes():
            sys.exit(f"error: {split} differs between nanoGPT's prepare.py and gpt2lab prepare")
    return data


# ---------------------------------------------------------------------------------------- one run each


def run_nanogpt(nanogpt: Path, out: Path, iters: int, env: dict) -> dict:
    args = [*RECIPE, f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={min(250, iters)}"]
    # always_save_checkpoint: the final model is saved even where its validation estimate did not improve
    args += [f"--out_dir={out}", "--always_save_checkpoint=True"]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "train.py", "config/train_shakespeare_char.py", *args],
        cwd=nanogpt, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    every = min(250, iters)
    steps = {
        int(m[1]): float(m[2]) / 1000 for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", result.stdout)
    }
    vals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", result.stdout)
    # an iteration k with k % eval_interval == 0 also evaluated (and saved): its time is left out
    times = [t for k, t in steps.items() if k % every]
    return {"wall_s": wall, "step_s": statistics.median(times), "val_estimate": float(vals[-1][1])}


def run_gpt2lab(data: Path, out: Path, iters: int, env: dict) -> dict:
    sets = [f"data.dir={data}", f"max_iters={iters}", f"lr_decay_iters={iters}", f"eval_interval={min(250, iters)}"]
    cmd = [sys.executable, "-m", "gpt2lab", "train", "--config", str(CONFIG), "--out", str(out), "--overwrite"]
    start = time.perf_counter()
    subprocess.run(
        [*cmd, *(a for s in sets for a in ("--set", s))], env=env, capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # dt: the mean step time since the previous logged step, evaluations and checkpoints left out
    times = [r["dt"] for r in rows if "dt" in r]
    return {"wall_s": wall, "step_s": statistics.median(times), "val_estimate": rows[-1]["val_loss"]}


# ---------------------------------------------------------------------------------------- the whole split

NANOGPT_EVAL = """
import json, sys, numpy as np, torch
sys.path.insert(0, {nanogpt!r})
from model import GPT, GPTConfig
ckpt = torch.load({ckpt!r}, map_location="cpu", weights_only=True)
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({{k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}})
model.eval()
val = np.fromfile({val!r}, dtype=np.uint16).astype(np.int64)
n = (len(val) - 1) // {block}
x = torch.from_numpy(val[: n * {block}]).view(n, {block})
y = torch.from_numpy(val[1 : n * {block} + 1]).view(n, {block})
total = 0.0
with torch.no_grad():
    for i in range(0, n, 256):
        _, loss = model(x[i : i + 256], y[i : i + 256])
        total += loss.item() * len(x[i : i + 256])
print(json.dumps({{"val_full": total / n, "iter": ckpt["iter_num"]}}))
"""


def windows(val_file: Path):
    """Every non-overlapping BLOCK-character window of the validation split and its next-character targets."""
    import numpy as np
    import torch

    val = np.fromfile(val_file, dtype=np.uint16).astype(np.int64)
    n = (len(val) - 1) // BLOCK
    return torch.from_numpy(val[: n * BLOCK]).view(n, BLOCK), torch.from_numpy(val[1 : n * BLOCK + 1]).view(n, BLOCK)


def full_val_gpt2lab(run: Path, val_file: Path) -> float:
    import torch
    import torch.nn.functional as F

    from gpt2lab.loading import load_model

    model, (x, y), total = load_model(run).eval(), windows(val_file), 0.0
    with torch.no_grad():
        for i in range(0, len(x), 256):
            logits = model(x[i : i + 256])
            total += F.cross_entropy(logits.flatten(0, 1), y[i : i + 256].flatten()).item() * len(logits)
    return total / len(x)


def full_val_nanogpt(nanogpt: Path, run: Path, val_file: Path) -> float:
    code = NANOGPT_EVAL.format(nanogpt=str(nanogpt), ckpt=str(run / "ckpt.pt"), val=str(val_file), block=BLOCK)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["val_full"]


# ---------------------------------------------------------------------------------------- profile

# gpt2lab's step in parts: label -> (owner, attribute) wrapped in a profiler range while profiling
PARTS = {
    "batch": ("gpt2lab.data.loader:BatchLoader", "next_step"),
    "backward": ("torch:Tensor", "backward"),
    "clip+check+update": ("gpt2lab.train.guards:StepGuard", "apply"),
    "logging": ("gpt2lab.train.loop:Trainer", "_log_step"),
    "metrics writing": ("gpt2lab.train.loop", "append_metrics"),
    "progress bar": ("tqdm.std:tqdm", "update"),
    "evaluation": ("gpt2lab.train.loop:Trainer", "evaluate"),
    "checkpoint": ("gpt2lab.train.loop:Trainer", "checkpoint"),
}


def _owner(spec: str):
    module, _, name = spec.partition(":")
    owner = importlib.import_module(module)
    return getattr(owner, name) if name else owner


def _labelled(label: str, fn):
    from torch.profiler import record_function

    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapped


def _ancestors(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
        yield event.name


def _op_counts(events, steps: int, leave_out: set[str]) -> dict:
    """aten operators per step: all that were dispatched, and those called from Python (no aten parent)."""
    ops = [e for e in events if e.name.startswith("aten::") and not set(_ancestors(e)) & leave_out]
    top = [e for e in ops if not any(name.startswith("aten::") for name in _ancestors(e))]
    return {"aten_ops_per_step": len(ops) / steps, "aten_calls_from_python_per_step": len(top) / steps}


def _label_ms(events, labels, leave_out: set[str]) -> dict[str, float]:
    """Milliseconds inside each labelled range, ranges nested in ``leave_out`` ranges not counted (the
    forward passes of an evaluation are not the training step's)."""
    totals = dict.fromkeys(labels, 0.0)
    for e in events:
        if e.name in totals and (e.name in leave_out or not set(_ancestors(e)) & leave_out):
            totals[e.name] += e.cpu_time_total / 1e3
    return totals


def profile_gpt2lab(data: Path, work: Path, steps: int, warmup: int = 5) -> dict:
    """Profile ``steps`` training steps of the recipe after ``warmup``, with one evaluation and one checkpoint
    in the middle of the window (their cost is reported per occurrence, not per step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from gpt2lab.train.config import load_config
    from gpt2lab.train.distributed import Dist
    from gpt2lab.train.loop import Trainer

    middle = warmup + steps // 2
    sets = [f"data.dir={data}", f"max_iters={warmup + steps + 1}", f"eval_interval={middle}", f"ckpt_interval={middle}"]
    cfg = load_config(CONFIG, [*sets, f"out_dir={work / 'profile-run'}"])
    trainer = Trainer(cfg, Dist(0, 1, torch.device("cpu")))
    trainer.loss_fn = _labelled("forward+loss", trainer.loss_fn)
    trainer.optimizer.step = _labelled("optimizer", trainer.optimizer.step)
    originals = [(_owner(spec), attr, getattr(_owner(spec), attr)) for spec, attr in PARTS.values()]
    for (owner, attr, fn), label in zip(originals, PARTS, strict=True):
        setattr(owner, attr, _labelled(label, fn))
    starts, step = [], trainer.train_step
    window_schedule = schedule(wait=0, warmup=warmup, active=steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=window_schedule) as prof:

        def timed_step():
            starts.append(time.perf_counter())
            loss = step()
            prof.step()
            return loss

        trainer.train_step = timed_step
        try:
            trainer.run()
        finally:
            for owner, attr, fn in originals:
                setattr(owner, attr, fn)
    occasional = {"evaluation", "checkpoint"}
    events = prof.events()
    totals = _label_ms(events, [*PARTS, "forward+loss", "optimizer"], leave_out=occasional)
    window = (starts[warmup + steps] - starts[warmup]) * 1e3  # ms of the profiled iterations, all included
    step_ms = (window - sum(totals[label] for label in occasional)) / steps
    shares = {label: round(ms / steps / step_ms, 4) for label, ms in totals.items() if label not in occasional}
    per_occurrence = {label: round(totals[label], 2) for label in occasional}
    counts = _op_counts(events, steps, leave_out=occasional)
    return {"step_ms": round(step_ms, 3), "shares_of_a_step": shares, "ms_each": per_occurrence, **counts}


NANOGPT_PROFILE = """
import json, sys, time, numpy as np, torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule
sys.path.insert(0, {nanogpt!r})
from model import GPT, GPTConfig
torch.manual_seed(1337)
model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False, vocab_size=65, dropout=0.0))
optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
tokens = np.fromfile({train!r}, dtype=np.uint16).astype(np.int64)
def batch():
    starts = torch.randint(len(tokens) - 64, (12,)).tolist()
    rows = torch.from_numpy(np.stack([tokens[s : s + 65] for s in starts]))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # nanoGPT stacks x and y separately
def step():  # what nanoGPT's train.py does in an iteration on a CPU (its GradScaler is disabled there)
    with record_function("batch"):
        x, y = batch()
    with record_function("forward+loss"):
        _, loss = model(x, y)
    with record_function("backward"):
        loss.backward()
    with record_function("clip"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with record_function("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with record_function("logging"):
        print(f"loss {{loss.item():.4f}}", file=sys.stderr)
warmup, steps = 5, {steps}
active = schedule(wait=0, warmup=warmup, active=steps, repeat=1)
with profile(activities=[ProfilerActivity.CPU], schedule=active) as prof:
    for i in range(warmup + steps + 1):
        if i == warmup:
            start = time.perf_counter()
        if i == warmup + steps:
            window = time.perf_counter() - start
        step()
        prof.step()
def ancestors(e):
    while e.cpu_parent is not None:
        e = e.cpu_parent
        yield e.name
ops = [e for e in prof.events() if e.name.startswith("aten::")]
top = [e for e in ops if not any(n.startswith("aten::") for n in ancestors(e))]
step_ms = window * 1e3 / steps
totals = {{e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}}
labels = ("batch", "forward+loss", "backward", "clip", "optimizer", "logging")
shares = {{k: round(totals.get(k, 0.0) / steps / step_ms, 4) for k in labels}}
print(json.dumps({{"step_ms": round(step_ms, 3), "shares_of_a_step": shares,
                  "aten_ops_per_step": len(ops) / steps, "aten_calls_from_python_per_step": len(top) / steps}}))
"""


def profile_nanogpt(nanogpt: Path, train_file: Path, steps: int) -> dict:
    code = NANOGPT_PROFILE.format(nanogpt=str(nanogpt), train=str(train_file), steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- main


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "n/a"


def benchmark(args, data: Path, work: Path, env: dict) -> None:
    val_file = data / "val.bin"
    runs: dict[str, list[dict]] = {"nanogpt": [], "gpt2lab": []}
    for r in range(args.rounds):
        order = ["nanogpt", "gpt2lab"] if r % 2 == 0 else ["gpt2lab", "nanogpt"]  # each side first in turn
        for side in order:
            out, load = work / f"{side}-{r}", load_average()
            if side == "nanogpt":
                result = run_nanogpt(args.nanogpt, out, args.iters, env)
                result["val_full"] = full_val_nanogpt(args.nanogpt, out, val_file)
            else:
                result = run_gpt2lab(data, out, args.iters, env)
                result["val_full"] = full_val_gpt2lab(out, val_file)
            result |= {"round": r, "load_before": load, "load_after": load_average()}
            runs[side].append(result)
            print(
                f"round {r} {side:8s} wall {result['wall_s']:7.1f} s  step {result['step_s'] * 1e3:7.2f} ms "
                f"({1 / result['step_s']:6.1f} steps/s)  val {result['val_estimate']:.4f} (run's estimate) "
                f"{result['val_full']:.4f} (whole split)  load {load} -> {result['load_after']}",
                flush=True,
            )
    keys = ("wall_s", "step_s", "val_estimate", "val_full")
    med = {side: {k: statistics.median(r[k] for r in rs) for k in keys} for side, rs in runs.items()}
    n, g = med["nanogpt"], med["gpt2lab"]
    print(f"\nmedians over {args.rounds} rounds:")
    for side, m in med.items():
        print(
            f"  {side:8s} wall {m['wall_s']:.1f} s, step {m['step_s'] * 1e3:.2f} ms ({1 / m['step_s']:.1f} steps/s), "
            f"val {m['val_estimate']:.4f} (estimate) {m['val_full']:.4f} (whole split)"
        )
    print(
        f"  gpt2lab / nanoGPT: wall time {ratio(g['wall_s'], n['wall_s'])}, steps/s {ratio(n['step_s'], g['step_s'])}"
    )
    if args.json:
        write_json(args.json, {"cpu": cpu_description(), "iters": args.iters, "runs": runs})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--text", type=Path, required=True, help="Tiny Shakespeare (nanoGPT's input.txt)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating (default 3)")
    parser.add_argument("--iters", type=int, default=2000, help="training steps (the recipe: 2000)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: torch's)")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    parser.add_argument("--profile", action="store_true", help="profile one step of each instead of training")
    parser.add_argument("--profile-steps", type=int, default=20)
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        sys.exit(f"error: {args.nanogpt} is not a nanoGPT checkout (no train.py)")
    env = {**os.environ} | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the profile runs in this process
    work = args.work or Path(tempfile.mkdtemp(prefix="nanogpt-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_description()
    print(f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags'])}", flush=True)
    print(f"load average: {load_average()}\nwork folder: {work}", flush=True)
    data = prepare_both(args.nanogpt, args.text, work)
    if args.profile:
        ours = profile_gpt2lab(data, work, args.profile_steps)
        theirs = profile_nanogpt(args.nanogpt, data / "train.bin", args.profile_steps)
        print(json.dumps({"gpt2lab": ours, "nanogpt": theirs}, indent=1))
        return
    benchmark(args, data, work, env)


if __name__ == "__main__":
    main()
