"""What a training run starts from: its compute dtype, its model, its seeds, its share of the batch, and
the checks that the data, the tokenizer and the batch suit the model, all before the first step."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import torch

from gpt2lab.config import GPTConfig, padded_vocab, parse_dtype
from gpt2lab.data.tokens import TokenData
from gpt2lab.errors import GPT2LabError
from gpt2lab.kernels.choice import faster_training_dtype
from gpt2lab.kernels.precision import has_native_bf16, has_native_fp16
from gpt2lab.loading import load_model
from gpt2lab.model import GPT
from gpt2lab.tokenizer import describe, load_tokenizer, same_tokenizer
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.distributed import Dist


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_iters``, cosine decay to ``min_lr`` at ``lr_decay_iters``, then flat."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and LayerNorm gains are not shrunk toward 0.

    The fused kernel (one pass over each tensor) is used on CUDA and CPU, where it steps several times
    faster than the multi-tensor (foreach) path, which is kept elsewhere.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **fast)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` picks whichever of float32 and bfloat16 autocast a short probe finds faster on this machine
    (:func:`~gpt2lab.kernels.choice.faster_training_dtype`). Without native matrix instructions bf16 and fp16
    run through generic kernels, many times slower than fp32: asking for them there gives a warning."""
    if name == "auto":
        return faster_training_dtype(device)
    dtype = parse_dtype(name)
    native = {torch.bfloat16: has_native_bf16(device), torch.float16: has_native_fp16(device)}
    if not native.get(dtype, True):
        warnings.warn(
            f"{name} autocast on this {device.type} has no native {name} matrix multiply and runs many times "
            "slower than float32 (dtype = 'auto' picks float32 here)",
            stacklevel=2,
        )
    return dtype


def build_model(cfg: TrainConfig, vocab_size: int, resumed: dict | None = None) -> GPT:
    """From scratch (preset + fields), or from a pretrained checkpoint or run, optionally GQA-converted, with
    the padded vocabulary of :func:`vocab_padding`. ``resumed``: the model config of the run being resumed."""
    if cfg.init_from is None:
        fields = {"vocab_size": vocab_size, **cfg.model}
        config = GPTConfig.from_preset(cfg.preset, **fields) if cfg.preset else GPTConfig.from_dict(fields)
        return GPT(config.replace(padded_vocab_size=vocab_padding(cfg, config, resumed)))
    model = load_model(cfg.init_from)
    if cfg.convert_n_kv_head is not None:
        model = model.convert_to_gqa(cfg.convert_n_kv_head, init=cfg.convert_kv_init)
    return pad_vocabulary(model, vocab_padding(cfg, model.config, resumed))


def vocab_padding(cfg: TrainConfig, config: GPTConfig, resumed: dict | None) -> int | None:
    """The ``padded_vocab_size`` a run trains with (see :class:`~gpt2lab.model.GPT`): a resumed run's own, read
    from its checkpoint (absent, so None, in those written before padding existed), so that it continues with
    the shapes it was saved with; else the one ``[model]`` sets; else ``vocab_size`` rounded up to a multiple
    of ``vocab_multiple``. Fine-tuned models are padded too: their rows are the same inert padding."""
    padding = None if resumed is None else resumed.get("padded_vocab_size")
    if resumed is not None and (padding is None or padding >= config.vocab_size):
        return padding  # (another vocabulary is refused by resume, naming vocab_size)
    if cfg.init_from is None and cfg.model.get("padded_vocab_size") is not None:
        return config.padded_vocab_size
    return padded_vocab(config.vocab_size, cfg.vocab_multiple)


def pad_vocabulary(model: GPT, padded_vocab_size: int | None) -> GPT:
    """``model`` with ``padded_vocab_size`` rows of vocabulary (None: ``vocab_size``): its real rows and every
    other weight kept, new padding rows zero. The model itself when it already has them."""
    config = model.config.replace(padded_vocab_size=padded_vocab_size)
    if config == model.config:
        return model
    state = model.state_dict()
    wte = state.pop("lm_head.weight")[: config.vocab_size]
    rows = wte.new_zeros(config.vocab_rows, wte.shape[1])
    rows[: config.vocab_size] = wte
    padded = GPT(config).to(dtype=wte.dtype)
    padded.load_state_dict({**state, "transformer.wte.weight": rows, "lm_head.weight": rows})
    return padded


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, numpy and Python; return the batch sampler's generator (the same on every rank)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


def micro_batches_per_rank(cfg: TrainConfig, dist: Dist) -> int:
    if cfg.grad_accum % dist.world:
        raise GPT2LabError(
            f"grad_accum ({cfg.grad_accum}) must be a multiple of the number of processes ({dist.world}) "
            "so that the global batch stays the same"
        )
    return cfg.grad_accum // dist.world


def check_fits(cfg: TrainConfig, data: TokenData, config: GPTConfig) -> None:
    """The data's tokenizer and the batch's sequence length must suit the model."""
    if data.vocab_size > config.vocab_size:
        raise GPT2LabError(
            f"{cfg.data_dir} has a vocabulary of {data.vocab_size} tokens but the model has "
            f"{config.vocab_size}; it was made with another tokenizer"
        )
    if cfg.init_from is not None and not same_tokenizer(load_tokenizer(cfg.init_from), data.tokenizer):
        raise GPT2LabError(
            f"{cfg.init_from} reads {describe(load_tokenizer(cfg.init_from))} but {cfg.data_dir} was prepared "
            f"with {describe(data.tokenizer)}; prepare the data with the model's tokenizer"
        )
    if cfg.seq_len > config.block_size:
        raise GPT2LabError(
            f"seq_len ({cfg.seq_len}) is longer than the model's context (block_size {config.block_size})"
        )
    data.check_fits(cfg.seq_len)
