"""A training run's cost before it starts: tokens, FLOPs, memory per GPU and wall time on named GPUs.

Everything is computed from the training config alone (``gpt2lab plan`` / ``gpt2lab train --plan``);
no model is built and no data is read (``meta.json`` of the data folder is read for the vocabulary
when it exists, since training takes the model's vocabulary from it). The model counted is the one
training builds, its vocabulary padded (``vocab_multiple``): the padded rows are parameters, gradients,
optimizer state and LM-head FLOPs of the run; ``exported_params`` counts the model the run exports.

Conventions, chosen where no one standard exists:

* training FLOPs per token = 3 × the forward FLOPs of :mod:`gpt2lab.analysis` at the batch's
  sequence length (the backward pass costs two forward passes: gradients of activations and of
  weights). Attention scores are counted with the mean number of keys a causal query sees, (T + 1) / 2,
  so this is about 8 % below the "6N + 12·L·C·T" estimate nanoGPT and llm.c use for MFU at T = 1024;
* evaluation runs the same batches on every process (training's ``evaluate``), so its FLOPs are
  not divided among the GPUs in the wall time;
* memory: fp32 weights (autocast computes in bf16 but keeps fp32 parameters), fp32 gradients, AdamW's
  two fp32 moments, DDP's gradient buckets (a second copy of the gradients by default), FSDP2's
  gathered units (the root's embeddings stay gathered; two blocks in flight with prefetching).
  Activations follow Korthikanti et al. 2022 ("Reducing activation recomputation", eq. 1): 34·C bytes
  per token and layer in 16-bit activations, without their attention-matrix term, because PyTorch's
  fused attention keeps no T × T matrix; twice that in fp32. These are estimates: the GPU check
  (scripts/gpu-check.sh) measures the real peak for comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt2lab.analysis import model_report
from gpt2lab.config import GPT2_VOCAB_SIZE, GPTConfig
from gpt2lab.errors import GPT2LabError, check_number, is_int
from gpt2lab.files import read_json
from gpt2lab.outputs import META_FILE
from gpt2lab.train.config import TrainConfig, load_model_config
from gpt2lab.train.setup import vocab_padding

# Dense (no sparsity) peak FLOP/s from the vendors' datasheets: bf16 tensor cores, and TF32 for fp32
# training (gpt2lab enables TF32 on CUDA). H100 and H200 are the SXM parts; H200 has the same compute.
PEAK_FLOPS = {
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "H100": {"bfloat16": 989e12, "float32": 494.5e12},
    "H200": {"bfloat16": 989e12, "float32": 494.5e12},
}
ACTIVATION_BYTES_PER_TOKEN_LAYER = 34  # × n_embd, 16-bit activations (Korthikanti et al. 2022)


def model_config_of(cfg: TrainConfig) -> GPTConfig:
    """The model a fresh run of ``cfg`` would train, from its config alone (no weights loaded), with the padded
    vocabulary training gives it (:func:`~gpt2lab.train.setup.vocab_padding`)."""
    if cfg.init_from is not None:
        config = load_model_config(cfg.init_from)
        config = config.replace(n_kv_head=cfg.convert_n_kv_head) if cfg.convert_n_kv_head else config
    else:
        meta = Path(cfg.data_dir) / META_FILE
        vocab = read_json(meta).get("vocab_size", GPT2_VOCAB_SIZE) if meta.is_file() else GPT2_VOCAB_SIZE
        fields = {"vocab_size": vocab, **cfg.model}
        config = GPTConfig.from_preset(cfg.preset, **fields) if cfg.preset else GPTConfig.from_dict(fields)
    return config.replace(padded_vocab_size=vocab_padding(cfg, config, resumed=None))


def _evaluations(cfg: TrainConfig) -> int:
    """Evaluations in a fresh run: step 0, every eval_interval steps, and the last step."""
    return 1 + cfg.max_iters // cfg.eval_interval + (1 if cfg.max_iters % cfg.eval_interval else 0)


def _flops(cfg: TrainConfig, config: GPTConfig) -> dict[str, float]:
    forward = model_report(config, cfg.seq_len)["flops_per_token"]["total"]
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    eval_tokens = _evaluations(cfg) * 2 * cfg.eval_iters * cfg.batch_size * cfg.seq_len  # train + val
    return {
        "forward_per_token": forward,
        "train_per_token": 3 * forward,
        "per_step": 3 * forward * tokens_per_step,
        "train_run": 3 * forward * tokens_per_step * cfg.max_iters,
        "eval_tokens": eval_tokens,
        "eval_run": forward * eval_tokens,
    }


def train_flops_per_token(cfg: TrainConfig, config: GPTConfig) -> float:
    """Training FLOPs per token (3 x forward at the batch's sequence length): the numerator of MFU."""
    return 3 * model_report(config, cfg.seq_len)["flops_per_token"]["total"]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The dense peak FLOP/s of the GPU ``device`` when training in ``dtype`` (fp32: TF32), if it is listed in
    :data:`PEAK_FLOPS` (the denominator of MFU); None for a CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    listed = next((gpu for gpu in PEAK_FLOPS if gpu in name), None)
    return PEAK_FLOPS[listed]["float32" if dtype == torch.float32 else "bfloat16"] if listed else None


def _fsdp_gathered_bytes(config: GPTConfig, params: dict[str, int]) -> int:
    """Bytes held unsharded at once under FSDP2: the weights of the root unit (embeddings, final
    LayerNorm: gathered for the whole step) and of two blocks (the one computing, the one prefetched),
    and the gradients of the root and of one block before they are reduce-scattered."""
    block = params["attention_per_layer"] + params["mlp_per_layer"] + 2 * 2 * config.n_embd
    root = params["wte"] + params["wpe"] + 2 * config.n_embd
    return 4 * (root + 2 * block) + 4 * (root + block)


def memory(cfg: TrainConfig, config: GPTConfig, gpus: int) -> dict[str, dict[str, float]]:
    """Bytes per GPU of each part, for DDP and for FSDP2 over ``gpus`` processes."""
    params = model_report(config)["params"]
    n = params["total"]
    act_bytes = 1 if _train_dtype(cfg) == "bfloat16" else 2  # × 2 bytes: 16-bit activations, or fp32
    tokens = cfg.batch_size * cfg.seq_len  # one micro-batch per process at a time
    activations = tokens * config.n_layer * ACTIVATION_BYTES_PER_TOKEN_LAYER * config.n_embd * act_bytes
    activations += tokens * config.n_embd * 4  # the fp32 embedding sum that starts the residual stream
    distributed = gpus > 1  # one process trains the bare model: no DDP buckets, nothing sharded
    ddp = {"parameters": 4 * n, "gradients": 4 * n, "optimizer": 8 * n, "activations": activations}
    ddp["buckets"] = 4 * n if distributed else 0
    fsdp = {
        "parameters": 4 * n / gpus,
        "gradients": 4 * n / gpus,
        "optimizer": 8 * n / gpus,
        "gathered": _fsdp_gathered_bytes(config, params) if distributed else 0,
        "activations": activations,
    }
    for parts in (ddp, fsdp):
        parts["total"] = sum(parts.values())
    return {"ddp": ddp, "fsdp": fsdp}


def _train_dtype(cfg: TrainConfig) -> str:
    return "float32" if cfg.dtype == "float32" else "bfloat16"  # "auto" is bf16 on every listed GPU


def plan(cfg: TrainConfig, gpus: int = 1, mfu: float = 0.4, gpu_names: list[str] | None = None) -> dict[str, Any]:
    """The plan of ``cfg`` on ``gpus`` GPUs at model FLOPs utilisation ``mfu``."""
    if not is_int(gpus) or gpus < 1:
        raise GPT2LabError(f"gpus must be an integer >= 1, got {gpus!r}")
    check_number("mfu", mfu, low=0.0, high=1.0, low_open=True)
    names = gpu_names or list(PEAK_FLOPS)
    for name in names:
        if name not in PEAK_FLOPS:
            raise GPT2LabError(f"unknown GPU {name!r}; known: {', '.join(PEAK_FLOPS)}")
    if cfg.grad_accum % gpus:
        raise GPT2LabError(f"grad_accum ({cfg.grad_accum}) must be a multiple of the number of GPUs ({gpus})")
    config = model_config_of(cfg)
    flops = _flops(cfg, config)
    dtype = _train_dtype(cfg)
    hours = {}
    for name in names:
        peak = PEAK_FLOPS[name][dtype] * mfu
        hours[name] = (flops["train_run"] / (gpus * peak) + flops["eval_run"] / peak) / 3600
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    return {
        "model": config.to_dict(),
        "params": model_report(config)["params"]["total"],  # as trained: memory, and the N of 6N
        "exported_params": model_report(config.unpadded())["params"]["total"],
        "gpus": gpus,
        "mfu": mfu,
        "dtype": dtype,
        "tokens_per_step": tokens_per_step,
        "steps": cfg.max_iters,
        "total_tokens": tokens_per_step * cfg.max_iters,
        "flops": flops,
        "memory_per_gpu": memory(cfg, config, gpus),
        "hours": hours,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    return f"{hours * 60:.1f} min" if hours < 1 else (f"{hours:.2f} h" if hours < 48 else f"{hours / 24:.1f} days")


def format_plan(p: dict[str, Any]) -> str:
    """The plan as text, one figure per line."""
    f, m = p["flops"], p["memory_per_gpu"]
    c = p["model"]
    vocab = f"vocab={c['vocab_size']}"
    if c["padded_vocab_size"] is not None:  # the exported model holds only the real rows
        vocab += f" padded to {c['padded_vocab_size']}; {p['exported_params']:,} exported"
    lines = [
        f"model: {p['params']:,} parameters (n_layer={c['n_layer']} n_head={c['n_head']} n_embd={c['n_embd']} "
        f"{vocab}); training in {p['dtype']} on {p['gpus']} GPU(s)",
        f"tokens per step      {p['tokens_per_step']:,}",
        f"steps                {p['steps']:,}",
        f"total tokens         {p['total_tokens']:,} ({p['total_tokens'] / 1e9:.3g} B)",
        f"FLOPs per token      {f['train_per_token']:.4g} (training: 3 x forward {f['forward_per_token']:.4g}; "
        f"6N = {6 * p['params']:.4g})",
        f"FLOPs per step       {f['per_step']:.4g}",
        f"FLOPs per run        {f['train_run']:.4g} training + {f['eval_run']:.4g} evaluation "
        f"({f['eval_tokens']:,} tokens)",
        "memory per GPU       DDP          FSDP2",
    ]
    for part in ("parameters", "gradients", "optimizer", "buckets", "gathered", "activations", "total"):
        ddp, fsdp = m["ddp"].get(part), m["fsdp"].get(part)
        lines.append(
            f"  {part:<18} {_gib(ddp) if ddp is not None else '       -    '} "
            f"{_gib(fsdp) if fsdp is not None else '       -'}"
        )
    lines.append(f"wall time at MFU {p['mfu']:.0%} ({p['gpus']} GPU(s), peak {p['dtype']} dense FLOP/s):")
    for name, hours in p["hours"].items():
        lines.append(f"  {name:<6} {PEAK_FLOPS[name][p['dtype']] / 1e12:6.1f} TFLOP/s  {_duration(hours)}")
    return "\n".join(lines)
