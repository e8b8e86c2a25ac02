"""Training throughput and memory: gpt2lab vs transformers' GPT2LMHeadModel, same weights and optimizer.

For each model size and setting (fp32 / bf16 autocast, eager / torch.compile) both models run a
training step (forward with targets, backward, fused AdamW with weight decay on matrices, zero_grad)
in alternating rounds, each the way its library trains: gpt2lab as ``gpt2lab train`` does (loss
without logits), the reference through ``labels=``; no dropout on either
side. The table gives tokens/s, the ratio gpt2lab / reference, MFU against the matmul peak measured
in the same run, and the peak resident memory of a training step, measured in a fresh
process per contender (see benchmarks/common.py).

    python benchmarks/training.py                    # small (6L 6H 384, ctx 256, B 8) and 124M (ctx 1024, B 1)
    python benchmarks/training.py --sizes small --repeats 5 --no-compile

bf16 autocast is measured by default only where the hardware multiplies bf16 natively (CUDA,
AVX-512-BF16, AMX): elsewhere PyTorch falls back to generic kernels, and a small model's step takes
minutes on both sides. ``--force-bf16`` measures it anyway (use ``--repeats 1``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import alternate, load_average, measure_in_subprocess, median, report_memory, setup

SIZES = {
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=8),
    "124M": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=1),
}


def save_reference(size: str, directory: Path) -> None:
    """Random GPT-2 weights of the given size in the Hugging Face layout; both contenders load them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    s = SIZES[size]
    torch.manual_seed(0)
    # No dropout on either side: gpt2lab's default, and the usual setting for fine-tuning GPT-2.
    no_dropout = dict(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    config = GPT2Config(
        n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"], n_positions=s["block_size"], **no_dropout
    )
    GPT2LMHeadModel(config).save_pretrained(directory)


def build(kind: str, directory: Path):
    """(model, optimizer, loss function) for one contender."""
    if kind == "gpt2lab":
        from gpt2lab import GPT
        from gpt2lab.kernels.lm_head_loss import LanguageModelLoss

        # What `gpt2lab train` steps (and compiles): the module whose forward is the loss. Compiling the GPT
        # alone would compile only its forward, not the hidden_states + loss that training calls.
        model = LanguageModelLoss(GPT.from_pretrained(directory))

        def loss_of(m, x):
            return m(x, x)
    else:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(directory)

        def loss_of(m, x):
            return m(input_ids=x, labels=x).loss

    model.train()
    # gpt2lab's optimizer for both: fused AdamW on CPU, as (torch >= 2.8) the Hugging Face Trainer also uses.
    from gpt2lab.train.config import TrainConfig
    from gpt2lab.train.setup import make_optimizer

    optimizer = make_optimizer(model, TrainConfig(lr=1e-4), torch.device("cpu"))
    return model, optimizer, loss_of


def make_step(model, optimizer, loss_of, x: torch.Tensor, bf16: bool, compiled: bool):
    forward = torch.compile(model) if compiled else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(forward, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def batch(size: str) -> torch.Tensor:
    s = SIZES[size]
    return torch.randint(0, 50257, (s["batch"], s["block_size"]), generator=torch.Generator().manual_seed(1))


def matmul_peak() -> float:
    """Measured fp32 GFLOP/s of a 2048^3 matmul: the ceiling MFU is quoted against."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / min(times) / 1e9


def train_flops_per_token(size: str) -> float:
    """Forward FLOPs per token from gpt2lab.analysis, times 3 (backward costs twice the forward)."""
    from gpt2lab import GPTConfig
    from gpt2lab.analysis import model_report

    s = SIZES[size]
    config = GPTConfig(n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"], block_size=s["block_size"])
    return 3 * model_report(config, s["block_size"])["flops_per_token"]["total"]


def child(args) -> None:
    """Memory of one contender's steady-state training step, in this fresh process."""
    setup()
    model, optimizer, loss_of = build(args.kind, Path(args.dir))
    step = make_step(model, optimizer, loss_of, batch(args.size), args.bf16, args.compiled)
    step()  # the first step allocates the optimizer state and (compiled) the graphs
    step()
    report_memory(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--force-bf16", action="store_true", help="bf16 rows without native bf16 hardware too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    setup()
    from gpt2lab.kernels.precision import has_native_bf16

    native_bf16 = has_native_bf16("cpu")  # bf16 autocast rows only where the CPU has bf16 instructions
    settings = [("fp32", False, False)]
    if not args.no_compile:
        settings.append(("fp32 + compile", False, True))
    if native_bf16 or args.force_bf16:
        settings += [("bf16", True, False)] + ([("bf16 + compile", True, True)] if not args.no_compile else [])
    else:
        print("bf16 autocast skipped: this CPU has no native bf16 matrix multiply (AVX-512-BF16/AMX)")
    peak = matmul_peak()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul peak {peak:.0f} GFLOP/s fp32, "
        f"load {load_average()}"
    )
    rows = []
    for size in args.sizes:
        s = SIZES[size]
        tokens = s["batch"] * s["block_size"]
        flops = train_flops_per_token(size)
        with tempfile.TemporaryDirectory() as tmp:
            save_reference(size, Path(tmp))
            for name, bf16, compiled in settings:
                x = batch(size)
                steps = {
                    kind: make_step(*build(kind, Path(tmp)), x, bf16, compiled) for kind in ("gpt2lab", "reference")
                }
                times = alternate(steps, repeats=args.repeats, warmup=2 if compiled else 1)
                memory = {}
                for kind in steps:
                    extra = ["--bf16"] if bf16 else []
                    extra += ["--compiled"] if compiled else []
                    memory[kind] = measure_in_subprocess(
                        __file__, ["--child", "--kind", kind, "--dir", tmp, "--size", size, *extra]
                    )
                tok_s = {kind: tokens / median(t) for kind, t in times.items()}
                rows.append(
                    {
                        "size": size,
                        "setting": name,
                        "gpt2lab_tok_s": tok_s["gpt2lab"],
                        "reference_tok_s": tok_s["reference"],
                        "speed_ratio": tok_s["gpt2lab"] / tok_s["reference"],
                        "gpt2lab_mfu": tok_s["gpt2lab"] * flops / (peak * 1e9),
                        "reference_mfu": tok_s["reference"] * flops / (peak * 1e9),
                        "gpt2lab_peak_mib": memory["gpt2lab"]["peak"] / 2**20,
                        "reference_peak_mib": memory["reference"]["peak"] / 2**20,
                        "memory_ratio": memory["gpt2lab"]["peak"] / memory["reference"]["peak"],
                        "gpt2lab_step_increase_mib": memory["gpt2lab"]["increase"] / 2**20,
                        "reference_step_increase_mib": memory["reference"]["increase"] / 2**20,
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr)
    print()
    print(
        "| size | setting | gpt2lab tok/s | reference tok/s | ratio | MFU gpt2lab / ref | peak MiB gpt2lab / ref "
        "| memory ratio | step working set MiB gpt2lab / ref |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['setting']} | {r['gpt2lab_tok_s']:,.0f} | {r['reference_tok_s']:,.0f} | "
            f"{r['speed_ratio']:.2f}× | {r['gpt2lab_mfu']:.1%} / {r['reference_mfu']:.1%} | "
            f"{r['gpt2lab_peak_mib']:,.0f} / {r['reference_peak_mib']:,.0f} | {r['memory_ratio']:.2f}× | "
            f"{r['gpt2lab_step_increase_mib']:,.0f} / {r['reference_step_increase_mib']:,.0f} |"
        )


if __name__ == "__main__":
    main()
