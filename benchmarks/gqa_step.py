"""Why GQA trains slower than multi-head attention on a CPU: SDPA forward + backward at the study's shape,
timed in alternating rounds (fair under load), for

* ``mha``: n_kv_head = n_head, the fused CPU kernel;
* ``gqa-enable``: n_kv_head < n_head through ``enable_gqa=True`` (what attention.py does);
* ``gqa-repeat``: K/V repeated to n_head heads with ``repeat_interleave`` first, then the MHA call;
* ``gqa-math``: the math (unfused) SDPA backend forced, for comparison.

``--model`` times a whole training step instead (forward + backward of the study's 4 x 8 x 128 RoPE
GPT on 16 x 256 characters), MHA against GQA (2 K/V heads) and MQA.

Prints each variant's median time per step and its ratio to ``mha`` in the same round.

    OMP_NUM_THREADS=1 python benchmarks/gqa_step.py --rounds 15
    OMP_NUM_THREADS=1 python benchmarks/gqa_step.py --rounds 8 --model
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt2lab.config import GPTConfig
from gpt2lab.kernels.lm_head_loss import LanguageModelLoss
from gpt2lab.model import GPT


def make_inputs(batch: int, heads: int, kv_heads: int, length: int, head_dim: int, layout: str):
    """q (B, nh, T, hs), k and v (B, nkv, T, hs): contiguous, or (``layout="model"``) strided views of one
    fused projection output (B, T, (nh + 2 nkv) hs), split and transposed exactly as attention.py does."""
    gen = torch.Generator().manual_seed(0)
    if layout == "model":
        fused = torch.randn(batch, length, (heads + 2 * kv_heads) * head_dim, generator=gen, requires_grad=True)
        q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=2)
        return (
            q.view(batch, length, heads, head_dim).transpose(1, 2),
            k.view(batch, length, kv_heads, head_dim).transpose(1, 2),
            v.view(batch, length, kv_heads, head_dim).transpose(1, 2),
        )
    q = torch.randn(batch, heads, length, head_dim, generator=gen, requires_grad=True)  # (B, nh, T, hs)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen, requires_grad=True)  # (B, nkv, T, hs)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen, requires_grad=True)
    return q, k, v


def step(kind: str, q, k, v) -> None:
    """One forward and backward pass of causal attention in the given way."""
    group = q.shape[1] // k.shape[1]
    if kind == "gqa-enable":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif kind == "gqa-repeat":
        keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    elif kind == "gqa-math":
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.sum().backward()


def model_steps(args) -> dict:
    """kind -> a function running one forward + backward training step of that variant's GPT."""
    x = torch.randint(0, 65, (args.batch, args.length))  # (B, T)
    y = torch.randint(0, 65, (args.batch, args.length))
    steps = {}
    for kind, n_kv in (("mha", args.heads), ("gqa", args.kv_heads), ("mqa", 1)):
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=65, n_layer=4, n_head=args.heads, n_embd=args.heads * args.head_dim,
                           block_size=args.length, pos_encoding="rope", n_kv_head=n_kv)  # fmt: skip
        loss_fn = LanguageModelLoss(GPT(config))  # the chunked head loss, without logits

        def step(loss_fn=loss_fn) -> None:
            loss_fn(x, y).backward()  # as the training loop calls it

        steps[kind] = step
    return steps


def time_rounds(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each step, in alternating rounds (load on the machine hits every variant alike)."""
    for step_fn in steps.values():  # warm-up
        step_fn()
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(rounds):
        for kind, step_fn in steps.items():
            start = time.perf_counter()
            step_fn()
            times[kind].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--layout", choices=["contiguous", "model"], default="model")
    parser.add_argument("--model", action="store_true", help="time whole training steps of the study's GPT")
    args = parser.parse_args()
    shape = (args.batch, args.heads, args.length, args.head_dim)
    if args.model:
        times = time_rounds(model_steps(args), args.rounds)
    else:
        kv_heads = {
            "mha": args.heads,
            "gqa-enable": args.kv_heads,
            "gqa-repeat": args.kv_heads,
            "gqa-math": args.kv_heads,
        }
        inputs = {
            kind: make_inputs(args.batch, args.heads, n_kv, args.length, args.head_dim, args.layout)
            for kind, n_kv in kv_heads.items()
        }
        times = time_rounds({kind: (lambda kind=kind: step(kind, *inputs[kind])) for kind in inputs}, args.rounds)
    print(
        f"shape (B, nh, T, hs) = {shape}, n_kv_head = {args.kv_heads}, "
        + ("whole training steps, " if args.model else f"SDPA only, layout {args.layout}, ")
        + f"threads = {torch.get_num_threads()}"
    )
    for kind, values in times.items():
        ratios = [t / m for t, m in zip(values, times["mha"], strict=True)]
        print(
            f"{kind:>11}: median {1e3 * statistics.median(values):7.2f} ms, "
            f"ratio to mha {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f}, {max(ratios):.2f}] over {args.rounds} rounds"
        )


if __name__ == "__main__":
    main()
