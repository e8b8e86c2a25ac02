"""The model as an outside user builds it, against transformers, one process per measurement.

Contenders, all with the same random GPT-2 124M weights (saved once in the hub layout):

  plain         ``GPT.from_pretrained(dir)`` = ``GPT(config)`` + weights, eval, no_grad: nn.Linear everywhere
  swapped       the same after ``kernels.cpu_linear.swap_linear_layers``: every product on the CPU kernel
                measured fastest in that process (what every gpt2lab model ran before the kernels moved out)
  inference     the same after ``kernels.apply_inference_kernels(model, dtype)``: what generate/eval load
                (for float32 this is the plain model; for bfloat16 the packed FBGEMM layer)
  transformers  ``GPT2LMHeadModel.from_pretrained(dir)``

Workloads: ``forward``, logits of B=1 x T=1024 tokens; ``decode``, greedy decoding of 32 tokens after an 8-token
prompt with the KV cache (seconds per token).

Every (round, contender, workload) runs in a fresh interpreter, contenders alternating within a round: a
choice made once per process (kernel timing, allocator state) then shows as spread across rounds instead of
hiding inside one process. Each process warms up once and reports the median of ``--repeats`` calls. The
summary gives, per contender, the median over rounds, the range, and the ratio of transformers' median to
its own (above 1: faster than transformers).

    python benchmarks/outside_user.py --rounds 5
    python benchmarks/outside_user.py --rounds 3 --workloads decode --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, load_reference, save_random_reference  # noqa: E402

from gpt2lab import GPT, apply_inference_kernels  # noqa: E402
from gpt2lab.cli.kernel_report import cpu_description  # noqa: E402
from gpt2lab.config import parse_dtype  # noqa: E402
from gpt2lab.files import write_json  # noqa: E402
from gpt2lab.kernels.cpu_linear import swap_linear_layers  # noqa: E402

CONTENDERS = ("plain", "swapped", "inference", "transformers")
WORKLOADS = ("forward", "decode")
FORWARD_TOKENS, PROMPT_TOKENS, DECODE_TOKENS = 1024, 8, 32


def cpu_model() -> str:
    """The CPU as ``lscpu`` names it (the /proc/cpuinfo model name where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    return names[0] if names else cpu_description()["model"]


# ---------------------------------------------------------------------------------------- one process


def build(contender: str, directory: Path, dtype: torch.dtype):
    if contender == "transformers":
        return load_reference(directory, dtype)
    model = GPT.from_pretrained(directory).to(dtype).eval()
    if contender == "swapped":
        swap_linear_layers(model)
    elif contender == "inference":
        apply_inference_kernels(model, dtype)
    return model


def workload(contender: str, model, name: str):
    """(a call, how many units it produces): the forward pass is one unit, a decode one unit per token."""
    generator = torch.Generator().manual_seed(0)
    if name == "forward":
        idx = torch.randint(0, 50257, (1, FORWARD_TOKENS), generator=generator)
        return (lambda: model(idx).logits) if contender == "transformers" else (lambda: model(idx)), 1
    prompt = torch.randint(0, 50257, (1, PROMPT_TOKENS), generator=generator)
    if contender == "transformers":
        options = dict(max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False)
        return (lambda: model.generate(prompt, **options)), DECODE_TOKENS
    return (lambda: model.generate(prompt, DECODE_TOKENS, temperature=0)), DECODE_TOKENS


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = build(args.contender, Path(args.weights), parse_dtype(args.dtype))
    run, units = workload(args.contender, model, args.workload)
    times = []
    with torch.no_grad():
        for i in range(1 + args.repeats):  # the first call warms up (and makes any per-process choice)
            start = time.perf_counter()
            run()
            if i:
                times.append((time.perf_counter() - start) / units)
    print(json.dumps({"seconds": statistics.median(times)}))


# ---------------------------------------------------------------------------------------- the driver


def measure(args: argparse.Namespace, weights: Path) -> dict[str, dict[str, list[float]]]:
    """Seconds per unit: results[workload][contender] has one median per round (one process each)."""
    results = {w: {c: [] for c in args.contenders} for w in args.workloads}
    for round_ in range(args.rounds):
        order = args.contenders if round_ % 2 == 0 else args.contenders[::-1]
        for name in args.workloads:
            for contender in order:
                cmd = [sys.executable, __file__, "--worker", "--contender", contender, "--workload", name]
                cmd += ["--weights", str(weights), "--dtype", args.dtype, "--threads", str(args.threads)]
                cmd += ["--repeats", str(args.repeats)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=args.timeout).stdout
                results[name][contender].append(json.loads(out.strip().splitlines()[-1])["seconds"])
    return results


def summary(results: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = []
    for name, by_contender in results.items():
        unit = "s per forward (B=1, T=1024)" if name == "forward" else "s per decoded token"
        reference = statistics.median(by_contender["transformers"]) if "transformers" in by_contender else None
        lines.append(f"{name}: median over processes, {unit}")
        for contender, times in by_contender.items():
            mid = statistics.median(times)
            ratio = f"  {reference / mid:.2f}x transformers" if reference else ""
            lines.append(f"  {contender:<13} {mid:.4f}  (range {min(times):.4f}-{max(times):.4f}){ratio}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="processes per contender and workload")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process (after one warm-up)")
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS))
    parser.add_argument("--contenders", type=lambda s: s.split(","), default=list(CONTENDERS))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed to one process")
    parser.add_argument("--json", type=Path, help="also write the raw times here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} threads, {args.dtype}")
    print(f"load average before: {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        save_random_reference(Path(tmp))
        results = measure(args, Path(tmp))
    print(f"load average after: {load_average()}")
    print("\n".join(summary(results)))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
