"""OpenAI's GPT-2 release format: ``hparams.json`` plus a TensorFlow checkpoint of ``model/...`` variables,
read into a :class:`GPTConfig` and a state dict in gpt2lab's names (LayerNorm g/b, Conv1D w as
[1, in, out] transposed; see :data:`~gpt2lab.checkpoints.names.TF_LAYOUT`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gpt2lab.checkpoints.names import TF_LAYOUT, collect_state
from gpt2lab.checkpoints.tf_bundle import TFCheckpointReader
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.files import read_json

__all__ = ["read_openai_tf"]


def read_openai_tf(hparams_path: Path, prefix: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The config (from ``hparams_path``) and state dict of the checkpoint at ``prefix`` (``.../model.ckpt``)."""
    reader = TFCheckpointReader(prefix)
    if not hparams_path.is_file():
        raise GPT2LabError(f"{hparams_path} is missing: it gives the model's shape (n_vocab, n_ctx, n_embd, ...)")
    hparams = read_json(hparams_path)
    keys = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    if absent := [k for k in keys if k not in hparams]:
        raise GPT2LabError(f"{hparams_path} lacks {', '.join(absent)}")
    config = GPTConfig(
        vocab_size=hparams["n_vocab"],
        block_size=hparams["n_ctx"],
        n_embd=hparams["n_embd"],
        n_head=hparams["n_head"],
        n_layer=hparams["n_layer"],
    )
    found = {name: e.shape for name, e in reader.entries.items() if _is_model_tensor(name)}
    return config, collect_state(
        config, found, lambda name: torch.from_numpy(reader.read(name)), TF_LAYOUT, str(reader.index_path)
    )


def _is_model_tensor(name: str) -> bool:
    """OpenAI's weights live under model/; fine-tuning scripts add global_step and optimizer slots."""
    return name.startswith("model/") and not re.search(r"/(Adam|Momentum|RMSProp)(_\d+)?$", name)
