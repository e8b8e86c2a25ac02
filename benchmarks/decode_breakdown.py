"""Where an int8 decoding step of GPT-2 124M spends its time, against the memory-bandwidth floor.

For 1 and 2 threads: the read bandwidth (best sum over a 512 MiB tensor), the floor it implies (int8 weight
bytes read per token / bandwidth), the 49 int8 products of one token alone (each layer once, so weights
stream from memory as in decoding), and the median whole decode step (B=1, prompt 16, KV cache), eager and
compiled (gpt2lab.kernels.compiled_decoding; compiled once before timing). The gap between the products and a
step is the work outside the products. Each step figure is the best of ``--rounds`` medians, eager and
compiled alternating. Random weights; about three minutes.

    python benchmarks/decode_breakdown.py [--steps 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from gpt2lab import quantize
from gpt2lab.cli.kernel_report import cpu_description
from gpt2lab.config import GPTConfig
from gpt2lab.kernels.compiled_decoding import CompiledDecoder, cache_capacity
from gpt2lab.model import GPT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate  # noqa: E402
from inference import BANDWIDTH_BYTES, read_bandwidth  # noqa: E402


@torch.no_grad()
def decode_step_median(model: GPT, steps: int, compiled: bool) -> float:
    cache = model.new_cache(1, cache_capacity(16 + steps))
    logits = model(torch.randint(0, model.config.vocab_size, (1, 16)), cache=cache, last_only=True)
    step = CompiledDecoder(model, cache, mode="compiled" if compiled else "eager")
    times = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        logits = step(token)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="decode steps per timed generation")
    parser.add_argument("--rounds", type=int, default=3, help="eager and compiled generations, alternating")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)).eval()
    weight_bytes = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n)
    quantize(model, "int8")
    decode_step_median(model, args.steps, compiled=True)  # compile outside the timed rows
    layers = [m for m in model.modules() if isinstance(m, DynamicInt8Linear)]
    rows = {layer.in_features: torch.randn(1, layer.in_features) for layer in layers}
    cpu = cpu_description()
    print(f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags'])}; torch {torch.__version__}")
    print(f"{len(layers)} int8 products, {weight_bytes / 1e6:.1f} MB of int8 weights per token")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        bandwidth = read_bandwidth()
        floor = weight_bytes / bandwidth
        with torch.no_grad():
            times = alternate({"products": lambda: [layer(rows[layer.in_features]) for layer in layers]}, 10)
        products = min(times["products"])
        print(
            f"threads {threads}: read bandwidth {bandwidth / 1e9:.1f} GB/s ({BANDWIDTH_BYTES >> 20} MiB sum), "
            f"floor {floor * 1e3:.2f} ms | products alone {products * 1e3:.2f} ms ({floor / products:.0%} of the floor)"
        )
        steps = {False: [], True: []}
        for _ in range(args.rounds):  # alternating: this host's speed drifts over minutes
            for compiled in steps:
                steps[compiled].append(decode_step_median(model, args.steps, compiled))
        for compiled, medians in steps.items():
            step = min(medians)
            print(
                f"  {'compiled' if compiled else 'eager'} decode step {step * 1e3:.2f} ms ({floor / step:.0%} of the "
                f"floor) | outside the products {(step - products) * 1e3:.2f} ms"
            )


if __name__ == "__main__":
    main()
