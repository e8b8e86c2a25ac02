"""gpt2lab vs transformers.GPT2LMHeadModel on the same random GPT-2 124M weights, CPU, 2 threads.

Measures, alternating the contenders round by round (see common.py for why):

* forward latency (all-position logits, no cache) at B=1, T=1024 and B=8, T=128;
* greedy generation throughput (prompt 16, 128 new tokens, KV cache) at B=1 and B=8, with gpt2lab
  in fp32, bf16 and int8 weights, always against the fp32 reference; ``--compile``: gpt2lab decodes
  as ``generate --compile`` does (gpt2lab.kernels.compiled_decoding: compiled or eager steps, whichever its first
  step measures faster; compiled and measured in the warm-up round, the choice printed with the kernels);
* each gpt2lab dtype's fraction of the memory-bandwidth floor of decoding: a step must read every weight
  once, so tokens/s cannot exceed B x (read bandwidth / weight bytes); the read bandwidth is measured
  here (the best of several sums over a 512 MiB tensor, far beyond the caches), at the start and again
  after each generation row, keeping the best: a shared host's bandwidth can halve for minutes, and a
  floor from a bad minute would flatter every fraction;
* peak resident memory of each workload, each in a fresh process (see common.py).

Records the CPU model, its instruction-set flags that matter for products, and the kernels gpt2lab
measured and picked in this run (gpt2lab.kernels.choice).

Prints medians and ratios (reference time / gpt2lab time: above 1 means gpt2lab is faster).
Default run: about 5 minutes on an idle machine. ``--quick`` for a smoke run.

    python benchmarks/inference.py [--repeats 5] [--gen-repeats 3] [--dtype int8] [--no-memory] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from gpt2lab import quantize
from gpt2lab.cli.kernel_report import cpu_description
from gpt2lab.kernels.choice import decisions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    alternate,
    load_average,
    load_gpt2lab,
    load_reference,
    measure_in_subprocess,
    median,
    report_memory,
    save_random_reference,
    setup,
)

FORWARD_SHAPES = [(1, 1024), (8, 128)]
GEN_BATCHES = [1, 8]
PROMPT = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": None}  # int8: quantized after loading
# Bytes a decoding step reads per weight of the linear layers: the bf16 product reads its fp16-packed copy
# or the bf16 weights (both 2 bytes), int8 its int8 weights (plus one fp32 scale per row: negligible).
WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
BANDWIDTH_BYTES = 512 * 2**20


def tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(batch * 7 + length))


# ---------------------------------------------------------------------------------------- workloads
# Each returns a zero-argument callable, so that timing and memory measurement run the same code.


def forward_fn(impl: str, model, batch: int, length: int):
    idx = tokens(batch, length)
    if impl == "reference":
        return lambda: model(idx, use_cache=False).logits  # no KV cache to build: logits only, like gpt2lab
    return lambda: model(idx)


def generate_fn(impl: str, model, batch: int, new_tokens: int, compile: bool = False):
    prompt = tokens(batch, PROMPT)
    if impl == "reference":
        return lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return lambda: model.generate(prompt, new_tokens, temperature=0, compile=compile)


def load(directory: Path, impl: str, dtype: str):
    if impl == "reference":
        return load_reference(directory)
    if dtype == "int8":
        return quantize(load_gpt2lab(directory), "int8")
    return load_gpt2lab(directory, DTYPES[dtype])


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second the cores read from memory: the best of ``repeats`` sums over a 512 MiB tensor."""
    data = torch.ones(BANDWIDTH_BYTES // 4)
    best = min(alternate({"sum": data.sum}, repeats)["sum"])
    return BANDWIDTH_BYTES / best


def decode_weights(reference) -> int:
    """Weights one decoding step reads: every matrix of the reference (its Conv1D blocks and the tied token
    embedding, which is the LM head), except the position embedding, of which it reads one row."""
    return sum(p.numel() for name, p in reference.named_parameters() if p.dim() == 2 and "wpe" not in name)


# ---------------------------------------------------------------------------------------- main


def memory_child(spec: str, directory: Path, new_tokens: int, threads: int) -> None:
    """``impl:dtype:forward:B:T`` or ``impl:dtype:generate:B``: one workload under a fresh peak-RSS mark."""
    setup(threads)
    impl, dtype, kind, *shape = spec.split(":")
    model = load(directory, impl, dtype)
    if kind == "forward":
        fn = forward_fn(impl, model, int(shape[0]), int(shape[1]))
    else:
        fn = generate_fn(impl, model, int(shape[0]), new_tokens)
    with torch.no_grad():
        report_memory(fn)


def contenders(dtypes: list[str]) -> list[tuple[str, str]]:
    """(impl, dtype) pairs: the fp32 reference first, then gpt2lab in each requested dtype."""
    return [("reference", "float32")] + [("gpt2lab", d) for d in dtypes]


def label(impl: str, dtype: str) -> str:
    return f"{impl} {dtype}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per forward shape")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed rounds per generation batch size")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--dtype", action="append", choices=sorted(DTYPES), help="gpt2lab weight dtype (repeatable; default both)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--compile", action="store_true", help="gpt2lab decodes as generate --compile does (implies --no-memory)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 16 new tokens")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.dir, args.new_tokens, args.threads)
    if args.quick:
        args.repeats, args.gen_repeats, args.new_tokens = 1, 1, 16
    args.no_memory = args.no_memory or args.compile  # the compiler's own memory would swamp the workloads'
    dtypes = args.dtype or list(DTYPES)
    setup(args.threads)
    cpu = cpu_description()
    print(f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags'])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average at start: {load_average()}")
    bandwidth = read_bandwidth()
    print(f"memory read bandwidth (sum over {BANDWIDTH_BYTES >> 20} MiB, best of 5): {bandwidth / 1e9:.1f} GB/s")

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        save_random_reference(directory)
        pairs = contenders(dtypes)
        models = {pair: load(directory, *pair) for pair in pairs}
        ref = models[pairs[0]]
        n_weights = decode_weights(ref)
        check = tokens(2, 64)
        with torch.no_grad():
            diff = (ref(check).logits - models[("gpt2lab", "float32")](check)).abs().max() if "float32" in dtypes else 0
        print(
            f"attention implementation of the reference: {ref.config._attn_implementation}; "
            f"max |logit difference| fp32: {float(diff):.1e}\n"
        )

        rows = []
        with torch.no_grad():
            for batch, length in FORWARD_SHAPES:
                fns = {label(*p): forward_fn(p[0], models[p], batch, length) for p in pairs}
                times = alternate(fns, args.repeats)
                rows.append(dict(name=f"forward B={batch} T={length}", shape=f"forward:{batch}:{length}", times=times))
                print_row(rows[-1])
            for batch in GEN_BATCHES:
                # A full-length warm-up round would double the cost of this, the slowest part: 8 tokens do,
                # except that a compiled step must be compiled for the timed rounds' cache size.
                warmup = args.new_tokens if args.compile else 8
                alternate({label(*p): generate_fn(p[0], models[p], batch, warmup, args.compile) for p in pairs}, 0)
                fns = {label(*p): generate_fn(p[0], models[p], batch, args.new_tokens, args.compile) for p in pairs}
                times = alternate(fns, args.gen_repeats, warmup=0)
                # A shared host's bandwidth moves by 2x from minute to minute: the floor takes the best seen so far
                bandwidth = max(bandwidth, read_bandwidth())
                print(f"  (read bandwidth for this row's floor: {bandwidth / 1e9:.1f} GB/s, the best measured so far)")
                floor = {label(*p): batch * bandwidth / (n_weights * WEIGHT_BYTES[p[1]]) for p in pairs[1:]}
                rows.append(
                    dict(
                        name=f"generate B={batch}",
                        shape=f"generate:{batch}",
                        times=times,
                        tokens=batch * args.new_tokens,
                        floor=floor,
                    )
                )
                print_row(rows[-1])
            agreement(models, pairs, args.new_tokens)
        print_kernel_choices()

        if not args.no_memory:
            print(
                "\npeak resident memory, one fresh process per cell: peak during the workload (MiB) "
                "[increase over the loaded model]"
            )
            for row in rows:
                cells = []
                for impl, dtype in pairs:
                    spec = f"{impl}:{dtype}:{row['shape']}"
                    m = measure_in_subprocess(
                        __file__,
                        [
                            *("--memory-child", spec, "--dir", str(directory)),
                            *("--new-tokens", str(args.new_tokens), "--threads", str(args.threads)),
                        ],
                    )
                    cells.append(f"{label(impl, dtype)} {m['peak'] / 2**20:,.0f} [+{m['increase'] / 2**20:,.0f}]")
                print(f"  {row['name']:<22} " + " | ".join(cells))
    print(f"\nload average at end: {load_average()}")


def print_row(row: dict) -> None:
    """Median per contender (ms, or generated tokens/s) and its speed-up over the reference (first)."""
    times = row["times"]
    ref_label = next(iter(times))
    ref = median(times[ref_label])
    cells = []
    for lab, ts in times.items():
        m = median(ts)
        speed = f"{row['tokens'] / m:,.1f} tok/s" if "tokens" in row else f"{m * 1000:,.0f} ms"
        ratio = "" if lab == ref_label else f" ({ref / m:.2f}x)"
        if lab in row.get("floor", {}):  # measured tokens/s over the bandwidth floor's
            ratio += f" [{row['tokens'] / m / row['floor'][lab]:.0%} of the bandwidth floor]"
        cells.append(f"{lab}: {speed}{ratio}")
    print(f"  {row['name']:<22} " + " | ".join(cells))


def print_kernel_choices() -> None:
    """The kernels gpt2lab measured and picked in this run (what `gpt2lab info --kernels` shows)."""
    print("\nkernels gpt2lab picked (ms per call of each candidate):")
    for d in decisions():
        times = " | ".join(f"{n} {t * 1e3:.3f}" for n, t in sorted(d.times.items(), key=lambda item: item[1]))
        print(f"  {d.operation:<12} {d.shape:<30} {d.picked:<12} {d.how:<9} {times}")


def agreement(models, pairs, new_tokens) -> None:
    """Greedy tokens of each gpt2lab model vs the reference (fp32 should agree; bf16 drifts after a while)."""
    prompt = tokens(1, PROMPT)
    ref = models[pairs[0]].generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    for pair in pairs[1:]:
        ours = models[pair].generate(prompt, new_tokens, temperature=0)
        same = (ours[0, PROMPT:] == ref[0, PROMPT:]).tolist()
        first = same.index(False) if False in same else len(same)
        print(f"  greedy agreement, {label(*pair)} vs reference: first {first} of {len(same)} tokens identical")


if __name__ == "__main__":
    main()
