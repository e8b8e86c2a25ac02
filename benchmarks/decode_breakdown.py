"""Where an int8 decoding step of GPT-2 124M spends its time, against the memory-bandwidth floor.

For 1 and 2 threads: the read bandwidth (best sum over a 512 MiB tensor), the floor it implies (int8 weight
bytes read per token / bandwidth), the 49 int8 products of one token alone (each layer once, so weights
stream from memory as in decoding), and the median whole decode step (B=1, prompt 16, KV cache). The gap
between the last two is the work outside the products. Random weights; about a minute.

    python benchmarks/decode_breakdown.py [--steps 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from gpt2lab.config import GPTConfig
from gpt2lab.kernel_report import cpu_description
from gpt2lab.model import GPT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate  # noqa: E402
from inference import BANDWIDTH_BYTES, read_bandwidth  # noqa: E402


@torch.no_grad()
def decode_step_median(model: GPT, steps: int) -> float:
    cache = model.new_cache(1, 16 + steps)
    logits = model(torch.randint(0, model.config.vocab_size, (1, 16)), cache=cache, last_only=True)
    times = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        logits = model(token, cache=cache, last_only=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per thread count")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)).eval()
    weight_bytes = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n)
    model.quantize("int8")
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
        step = decode_step_median(model, args.steps)
        print(
            f"threads {threads}: read bandwidth {bandwidth / 1e9:.1f} GB/s ({BANDWIDTH_BYTES >> 20} MiB sum), "
            f"floor {floor * 1e3:.2f} ms | products alone {products * 1e3:.2f} ms ({floor / products:.0%} of the "
            f"floor) | decode step {step * 1e3:.2f} ms ({floor / step:.0%}) | outside the products "
            f"{(step - products) * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
