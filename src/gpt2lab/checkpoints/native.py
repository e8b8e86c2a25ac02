"""gpt2lab's own checkpoint format: ``config.json`` (every :class:`GPTConfig` field and ``"format":
"gpt2lab"``) next to ``model.safetensors`` in gpt2lab's names, so every variant (RoPE, GQA, windows)
round-trips.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gpt2lab.checkpoints.convert import drop_vocab_padding
from gpt2lab.checkpoints.names import GPT2LAB_LAYOUT, collect_state
from gpt2lab.checkpoints.tensor_files import read_weight_files, write_safetensors
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.files import read_json, write_json
from gpt2lab.outputs import CONFIG_FILE, WEIGHTS_FILE

__all__ = ["GPT2LAB_FORMAT", "GPT2LAB_FORMAT_VERSION", "is_gpt2lab_config", "read_gpt2lab", "write_gpt2lab"]

GPT2LAB_FORMAT = "gpt2lab"
GPT2LAB_FORMAT_VERSION = 1


def is_gpt2lab_config(config: dict[str, Any]) -> bool:
    """gpt2lab and transformers both call their config ``config.json``; gpt2lab's carries a marker."""
    return config.get("format") == GPT2LAB_FORMAT


def read_gpt2lab(config_path: Path, weights: tuple[Path, ...]) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The config and state dict of a gpt2lab checkpoint, checked against each other."""
    raw = read_json(config_path)
    fields = {k: v for k, v in raw.items() if k not in ("format", "format_version")}
    version = raw.get("format_version", GPT2LAB_FORMAT_VERSION)
    if not isinstance(version, int) or version > GPT2LAB_FORMAT_VERSION:
        raise GPT2LabError(f"{config_path}: format_version {version!r} is not one this gpt2lab reads")
    config = GPTConfig.from_dict(fields)
    tensors = read_weight_files(weights)
    tensors.pop("lm_head.weight", None)  # tied: wte is the one copy that counts
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    return config, collect_state(config, found, tensors.__getitem__, GPT2LAB_LAYOUT, str(weights[0]))


def write_gpt2lab(directory: str | os.PathLike, config: GPTConfig, state: dict[str, torch.Tensor]) -> None:
    """Write ``model.safetensors`` and ``config.json`` (gpt2lab format) into ``directory``.

    ``state`` holds contiguous CPU tensors in gpt2lab's names, the tied LM head stored once, as
    ``transformer.wte.weight``. Each file is written to a temporary name and moved into place, so a
    crash or a full disk never leaves a half-written checkpoint; the config goes last, so a folder whose
    config.json is readable has its weights. A padded vocabulary is dropped: the saved model is the plain one.
    """
    config, state = drop_vocab_padding(config, state)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_FILE, state)
    marked = {"format": GPT2LAB_FORMAT, "format_version": GPT2LAB_FORMAT_VERSION, **config.to_dict()}
    write_json(directory / CONFIG_FILE, marked)
