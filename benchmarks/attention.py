"""Attention variants on CPU (2 threads): what sliding windows and shared K/V heads buy.

Part 1, the kernel: forward + backward of one attention call, B=1, 12 heads of 64, fp32, for
full causal SDPA (PyTorch's flash CPU kernel) and gpt2lab's banded sliding window (W=256, 512).
Time (median of interleaved rounds) and peak resident memory (fresh process per cell, see
common.py) for T = 1k, 2k, 4k, 8k, 16k.

Part 2, prefill: the forward pass alone, without gradients (a prompt's prefill, evaluation), for
full causal SDPA, the banded window and FlexAttention's window (compiled; the one place a CPU can run
it, forward only), W=256. The first call of each compiles flex and is not timed; where flex cannot
compile its column says why.

Part 3, decoding: tokens/s of one decoding step and KV-cache bytes vs context length, for the
GPT-2 124M shape (12 layers, 12 heads of 64, RoPE so that contexts may exceed 1024) with MHA,
GQA (groups of 4: 3 K/V heads), MQA (1 K/V head) and a 256-token window. The cache is filled
through ``KVCache.update`` with random keys and values: the cost of a step does not depend on
their values, and a real prefill of 4k tokens per variant would dominate the run.

Writes PNG plots into ``--plots`` and prints Markdown tables. Default run: about 5 minutes on an
idle machine, 10-15 when the cores are shared; ``--lengths 1024,2048,4096,8192`` saves most of it.
``--smoke`` runs tiny sizes (T 512 and 1024, kernels and prefill, one round, no memory, no plots): it
checks the script, its figures mean nothing.

    python benchmarks/attention.py [--lengths 1024,2048,4096,8192,16384] [--repeats 3]
        [--contexts 256,1024,2048,4096,8192] [--steps 8] [--skip kernels|prefill|decode] [--plots docs/img]
        [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, load_average, measure_in_subprocess, median, report_memory, setup  # noqa: E402

from gpt2lab import GPT, GPTConfig, apply_inference_kernels  # noqa: E402
from gpt2lab.sliding_window import (  # noqa: E402
    banded_sliding_window_attention,
    flex_sliding_window_attention,
    sliding_window_attention,
)

HEADS, HEAD_DIM = 12, 64
KERNELS = ["full causal", "window 256", "window 512"]
PREFILL_WINDOW = 256
PREFILL_KERNELS = ["full causal", "banded 256", "flex 256"]
DECODE_VARIANTS = {
    "MHA": dict(),
    "GQA-4 (3 kv heads)": dict(n_kv_head=3),
    "MQA": dict(n_kv_head=1),
    "window 256": dict(window=256),
}


# ---------------------------------------------------------------------------------------- kernels


def qkv(length: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(length)
    return [torch.randn(1, HEADS, length, HEAD_DIM, generator=g).requires_grad_() for _ in range(3)]


def kernel_step(kernel: str, q, k, v, grad):
    """One forward + backward: the unit a training step pays per layer."""

    def run():
        if kernel == "full causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = sliding_window_attention(q, k, v, int(kernel.split()[1]))
        out.backward(grad)
        for t in (q, k, v):
            t.grad = None

    return run


def kernel_memory_child(spec: str) -> None:
    setup()
    kernel, length = spec.rsplit(":", 1)
    q, k, v = qkv(int(length))
    report_memory(kernel_step(kernel, q, k, v, torch.ones_like(q)))


def bench_kernels(lengths: list[int], repeats: int, memory: bool) -> dict:
    results = {}
    for length in lengths:
        q, k, v = qkv(length)
        grad = torch.ones_like(q)
        times = alternate({name: kernel_step(name, q, k, v, grad) for name in KERNELS}, repeats)
        results[length] = {name: {"seconds": median(ts)} for name, ts in times.items()}
        for name in KERNELS:
            if memory:
                m = measure_in_subprocess(__file__, ["--memory-child", f"{name}:{length}"])
                results[length][name]["peak_increase"] = m["increase"]
        cells = [f"{n} {r['seconds'] * 1000:,.0f} ms" for n, r in results[length].items()]
        print(f"  T={length:>6}: " + " | ".join(cells), flush=True)
    return results


# ---------------------------------------------------------------------------------------- prefill


def prefill_step(kernel: str, q, k, v):
    """One forward pass without gradients."""
    attend = {
        "full causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "banded 256": lambda: banded_sliding_window_attention(q, k, v, PREFILL_WINDOW),
        "flex 256": lambda: flex_sliding_window_attention(q, k, v, PREFILL_WINDOW),
    }[kernel]

    def run():
        with torch.no_grad():
            attend()

    return run


def bench_prefill(lengths: list[int], repeats: int) -> dict:
    results = {}
    for length in lengths:
        q, k, v = qkv(length)
        fns = {name: prefill_step(name, q, k, v) for name in PREFILL_KERNELS}
        unavailable = None
        try:
            fns["flex 256"]()  # compiles for this shape, outside the timed rounds
        except Exception as error:  # no C++ compiler, a torch without flex, ...
            unavailable = (str(error).strip().splitlines() or [type(error).__name__])[0]
            del fns["flex 256"]
        times = alternate(fns, repeats)
        results[length] = {name: {"seconds": median(ts)} for name, ts in times.items()}
        if unavailable:
            results[length]["flex 256"] = {"unavailable": unavailable}
        cells = [f"{n} {r['seconds'] * 1000:,.1f} ms" if "seconds" in r else f"{n}: {r['unavailable']}"
                 for n, r in results[length].items()]  # fmt: skip
        print(f"  T={length:>6}: " + " | ".join(cells), flush=True)
    return results


# ---------------------------------------------------------------------------------------- decoding


def decode_model(variant: str) -> GPT:
    # RoPE has no position table, so contexts past block_size are fine; weights stay random.
    # as generate loads a model: the measured CPU kernels swapped in (gpt2lab.kernels.inference)
    return apply_inference_kernels(GPT(GPTConfig(pos_encoding="rope", **DECODE_VARIANTS[variant])))


@torch.no_grad()
def filled_cache(model: GPT, context: int, capacity: int):
    """A cache of ``capacity`` slots holding ``context`` random tokens (see the module docstring)."""
    c = model.config
    cache = model.new_cache(1, capacity)
    g = torch.Generator().manual_seed(context)
    for layer in cache:
        k, v = (torch.randn(1, c.n_kv_head, context, c.head_dim, generator=g) for _ in range(2))
        layer.update(k, v, None)
    return cache


def decode_steps(model: GPT, cache, steps: int):
    """``steps`` one-token forward passes continuing ``cache`` (each call adds ``steps`` tokens to it)."""
    token = torch.zeros(1, 1, dtype=torch.long)

    def run():
        with torch.no_grad():
            for _ in range(steps):
                model(token, cache=cache, last_only=True)

    return run


def bench_decode(contexts: list[int], repeats: int, steps: int) -> dict:
    models = {name: decode_model(name) for name in DECODE_VARIANTS}
    extra = steps * (repeats + 1)  # the timed calls grow the context by at most this much
    results = {}
    for context in contexts:
        fns, kv = {}, {}
        for name, model in models.items():
            fns[name] = decode_steps(model, filled_cache(model, context, context + extra), steps)
            kv[name] = sum(layer.nbytes() for layer in filled_cache(model, context, context))
        times = alternate(fns, repeats)
        results[context] = {
            name: {"tokens_per_s": steps / median(ts), "kv_bytes": kv[name]} for name, ts in times.items()
        }
        cells = [
            f"{n} {r['tokens_per_s']:.1f} tok/s {r['kv_bytes'] / 2**20:.0f} MiB" for n, r in results[context].items()
        ]
        print(f"  context {context:>6}: " + " | ".join(cells), flush=True)
        del fns  # the caches of this context
    return results


# ---------------------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def kernel_table(results: dict) -> str:
    """Times with the speed-up over full causal; ideal = T/2W, the ratio of query-key pairs."""
    memory = "peak_increase" in next(iter(results.values()))["full causal"]
    header = ["T", *KERNELS] + ([f"peak MiB {n}" for n in KERNELS] if memory else [])
    rows = []
    for length, r in results.items():
        full = r["full causal"]["seconds"]
        row = [f"{length:,}", f"{full * 1000:,.0f} ms"]
        for name in KERNELS[1:]:
            seconds, window = r[name]["seconds"], int(name.split()[1])
            row.append(f"{seconds * 1000:,.0f} ms ({full / seconds:.1f}x, ideal {length / (2 * window):.0f}x)")
        if memory:
            row += [mib(r[name]["peak_increase"]) for name in KERNELS]
        rows.append(row)
    return markdown(header, rows)


def prefill_table(results: dict) -> str:
    """Forward times with the speed-up over full causal."""
    rows = []
    for length, r in results.items():
        full = r["full causal"]["seconds"]
        row = [f"{length:,}", f"{full * 1000:,.1f} ms"]
        for name in PREFILL_KERNELS[1:]:
            seconds = r[name].get("seconds")
            row.append(f"{seconds * 1000:,.1f} ms ({full / seconds:.1f}x)" if seconds else r[name]["unavailable"])
        rows.append(row)
    return markdown(["T", *PREFILL_KERNELS], rows)


def decode_table(results: dict) -> str:
    """Tokens/s and KV MiB per variant; KV also as a fraction of MHA's."""
    rows = []
    for context, r in results.items():
        mha = r["MHA"]["kv_bytes"]
        row = [f"{context:,}"]
        for name in DECODE_VARIANTS:
            kv = r[name]["kv_bytes"]
            row.append(f"{r[name]['tokens_per_s']:.1f} tok/s, {mib(kv)} MiB ({kv / mha:.3g})")
        rows.append(row)
    return markdown(["context", *DECODE_VARIANTS], rows)


def finish(fig, axes, ticks: list[int], tick_labels: list[str], title: str, path: Path) -> Path:
    """Shared styling of both figures (ticks at the measured sizes, legend, grid), then save."""
    for ax in axes:
        ax.minorticks_off()
        ax.set_xticks(ticks, tick_labels)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot(kernels: dict, decode: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    if kernels:
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        lengths = list(kernels)
        for name in KERNELS:
            ax_t.plot(lengths, [kernels[t][name]["seconds"] for t in lengths], "o-", label=name)
            if "peak_increase" in kernels[lengths[0]][name]:
                ax_m.plot(lengths, [kernels[t][name]["peak_increase"] / 2**20 for t in lengths], "o-", label=name)
        ax_t.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="seconds", title="attention forward+backward")
        ax_m.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="MiB", title="peak RSS increase, fwd+bwd")
        ticks = [f"{t // 1024}k" for t in lengths]
        title = "B=1, 12 heads of 64, fp32, CPU 2 threads"
        paths.append(finish(fig, (ax_t, ax_m), lengths, ticks, title, directory / "attention_kernels.png"))
    if decode:
        fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        contexts = list(decode)
        for name in DECODE_VARIANTS:
            ax_s.plot(contexts, [decode[c][name]["tokens_per_s"] for c in contexts], "o-", label=name)
            ax_m.plot(contexts, [decode[c][name]["kv_bytes"] / 2**20 for c in contexts], "o-", label=name)
        ax_s.set(xscale="log", xlabel="context (tokens)", ylabel="tokens/s", title="decoding speed, B=1")
        ax_m.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB", title="KV cache, fp32")
        title = "GPT-2 124M shape with RoPE (12 layers, 12 heads of 64), CPU 2 threads"
        paths.append(
            finish(fig, (ax_s, ax_m), contexts, [str(c) for c in contexts], title, directory / "attention_decode.png")
        )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="kernel sequence lengths")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per size")
    parser.add_argument("--contexts", default="256,1024,2048,4096,8192", help="decoding context lengths")
    parser.add_argument("--steps", type=int, default=8, help="decoding steps per timed call")
    parser.add_argument("--skip", choices=["kernels", "prefill", "decode"], action="append", default=[],
                        help="leave a part out (repeatable)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the script only")
    parser.add_argument("--no-memory", action="store_true", help="skip the kernel peak-memory subprocesses")
    parser.add_argument("--plots", type=Path, default=Path("docs/img"), help="folder for the PNG plots")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return kernel_memory_child(args.memory_child)
    if args.smoke:
        args.lengths, args.repeats, args.no_memory, args.plots = "512,1024", 1, True, None
        args.skip = [*args.skip, "decode"]
    setup()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average at start: {load_average()}")
    start = time.perf_counter()
    kernels, prefill, decode = {}, {}, {}
    lengths = [int(t) for t in args.lengths.split(",")]
    if "kernels" not in args.skip:
        print("attention forward+backward, B=1, 12 heads of 64, fp32:")
        kernels = bench_kernels(lengths, args.repeats, memory=not args.no_memory)
    if "prefill" not in args.skip:
        print(f"attention forward without gradients (prefill), window {PREFILL_WINDOW}, B=1, 12 heads of 64, fp32:")
        prefill = bench_prefill(lengths, args.repeats)
    if "decode" not in args.skip:
        print("decoding, GPT-2 124M shape with RoPE, B=1, fp32:")
        decode = bench_decode([int(c) for c in args.contexts.split(",")], args.repeats, args.steps)
    if kernels:
        print("\n" + kernel_table(kernels))
    if prefill:
        print("\n" + prefill_table(prefill))
    if decode:
        print("\n" + decode_table(decode))
    for path in plot(kernels, decode, args.plots) if args.plots else []:
        print(f"wrote {path}")
    print(f"\n{time.perf_counter() - start:.0f} s; load average at end: {load_average()}")


if __name__ == "__main__":
    main()
