"""What gpt2lab picks on this machine, and why: ``gpt2lab info --kernels``.

Runs a model of the given config, with the kernels the inference loading path swaps in
(:func:`gpt2lab.kernels.apply_inference_kernels`), through a short greedy decode in fp32 and in bf16 weights
(a prompt of 8 tokens, then 1-token steps, batch 1), which makes every measured product choose its kernel,
and the training dtype probe; then lists each choice with the times that decided it.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from gpt2lab.config import GPTConfig
from gpt2lab.kernels.choice import ENV, decisions, faster_training_dtype, pinned
from gpt2lab.kernels.inference import apply_inference_kernels
from gpt2lab.model import GPT

# The instruction-set extensions that decide which kernels PyTorch has for fp32, bf16, fp16 and int8.
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16")


def cpu_description() -> dict:
    """The CPU model and the instruction-set flags that matter for matrix products (Linux; else platform)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {"model": model, "flags": [f for f in FLAGS_OF_INTEREST if f in flags]}


def measure_choices(config: GPTConfig, prompt: int = 8, steps: int = 2) -> list:
    """Make every choice a short decode and a training run would make; return them all."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, min(prompt, config.block_size - steps)))
    for dtype in (torch.float32, torch.bfloat16):  # as `generate --dtype` loads it
        apply_inference_kernels(model, dtype).generate(idx, steps, temperature=0)
    faster_training_dtype(torch.device("cpu"))
    return decisions()


def kernel_report(config: GPTConfig) -> dict:
    choices = measure_choices(config)
    return {
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "pinned": pinned(),
        "choices": [
            {"operation": d.operation, "shape": d.shape, "picked": d.picked, "how": d.how, "seconds": d.times}
            for d in choices
        ],
    }


def format_kernel_report(report: dict) -> str:
    cpu = report["cpu"]
    lines = [
        f"CPU: {cpu['model']} ({', '.join(cpu['flags']) or 'none of ' + ', '.join(FLAGS_OF_INTEREST)})",
        f"torch {report['torch']}, {report['threads']} threads, {ENV}={','.join(report['pinned']) or '(unset)'}",
        "",
        f"{'operation':<15} {'shape':<30} {'picked':<14} {'how':<9} times that decided it (ms per call)",
    ]
    for c in report["choices"]:
        times = " | ".join(f"{name} {s * 1e3:.3f}" for name, s in sorted(c["seconds"].items(), key=lambda t: t[1]))
        lines.append(f"{c['operation']:<15} {c['shape']:<30} {c['picked']:<14} {c['how']:<9} {times}")
    return "\n".join(lines)
