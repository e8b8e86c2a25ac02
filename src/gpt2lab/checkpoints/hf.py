"""The Hugging Face hub layout: transformers' GPT2Config <-> :class:`GPTConfig`, reading a hub-layout
checkpoint into gpt2lab's names, and writing one that ``transformers.GPT2LMHeadModel`` loads.

GPT-2's ``Conv1D`` stores weights as (in, out), so those are transposed both ways
(:data:`~gpt2lab.checkpoints.names.HF_LAYOUT`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gpt2lab.checkpoints.convert import drop_vocab_padding
from gpt2lab.checkpoints.names import HF_LAYOUT, collect_state
from gpt2lab.checkpoints.tensor_files import read_weight_files, write_safetensors
from gpt2lab.config import ACTIVATIONS, GPT2_EOT_ID, GPT2_VOCAB_SIZE, GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.files import read_json, write_json
from gpt2lab.outputs import CONFIG_FILE, WEIGHTS_FILE

__all__ = ["HF_ACTIVATION", "gpt_config_to_hf", "hf_config_to_gpt", "read_hf", "special_token_id", "write_hf"]

# gpt2lab's activations (config.ACTIVATIONS) -> transformers' ``activation_function`` that computes the
# same function; an activation added to the config without its transformers name fails here, at import.
_HF_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
HF_ACTIVATION = {name: _HF_NAMES[name] for name in ACTIVATIONS}
# and back; gelu_pytorch_tanh is the same tanh GELU as gelu_new, in one fused kernel.
ACTIVATION_FROM_HF = {**{hf: gpt for gpt, hf in HF_ACTIVATION.items()}, "gelu_pytorch_tanh": "gelu_tanh"}

# transformers' GPT2Config defaults: a config.json that omits a field means this value to transformers.
_HF_DEFAULTS = dict(
    vocab_size=GPT2_VOCAB_SIZE, n_positions=1024, n_embd=768, n_layer=12, n_head=12, layer_norm_epsilon=1e-5
)


def hf_config_to_gpt(hf: Mapping[str, Any], where: str = CONFIG_FILE) -> GPTConfig:
    """The :class:`GPTConfig` of a transformers GPT2Config dict, refusing what gpt2lab cannot compute.

    ``reorder_and_upcast_attn`` is accepted: it only changes the precision of the attention scores in
    half precision. Dropout rates are training settings of the source run and are not carried over.
    """
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise GPT2LabError(f"{where} describes a '{model_type}' model; gpt2lab reads GPT-2 checkpoints only")
    d = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if "n_positions" not in hf and "n_ctx" in hf:  # configs from before n_positions existed
        d["n_positions"] = hf["n_ctx"]
    refused = []
    activation = d.get("activation_function", "gelu_new")
    if not isinstance(activation, str) or activation not in ACTIVATION_FROM_HF:
        refused.append(f"activation_function '{activation}' (gpt2lab has {', '.join(ACTIVATION_FROM_HF)})")
    if d.get("n_inner") not in (None, 4 * d["n_embd"]):
        refused.append(f"n_inner {d['n_inner']} (gpt2lab's MLP is 4 x n_embd = {4 * d['n_embd']})")
    if not d.get("scale_attn_weights", True):
        refused.append("scale_attn_weights false (gpt2lab always divides scores by sqrt(head size))")
    if d.get("scale_attn_by_inverse_layer_idx", False):
        refused.append("scale_attn_by_inverse_layer_idx")
    if d.get("add_cross_attention", False):
        refused.append("add_cross_attention")
    if not d.get("tie_word_embeddings", True):
        refused.append("tie_word_embeddings false (gpt2lab ties lm_head to wte)")
    if refused:
        raise GPT2LabError(f"{where}: gpt2lab cannot represent {'; '.join(refused)}")
    return GPTConfig(
        block_size=d["n_positions"],
        vocab_size=d["vocab_size"],
        n_layer=d["n_layer"],
        n_head=d["n_head"],
        n_embd=d["n_embd"],
        layer_norm_epsilon=float(d["layer_norm_epsilon"]),
        activation=ACTIVATION_FROM_HF[activation],
    )


def special_token_id(config: GPTConfig) -> int | None:
    """<|endoftext|> as bos/eos, unless the vocabulary is too small: an id outside it would break generate()."""
    return GPT2_EOT_ID if config.vocab_size > GPT2_EOT_ID else None


def gpt_config_to_hf(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """transformers' GPT2Config fields for a plain GPT-2 ``config``, as transformers writes them."""
    special = special_token_id(config)
    return {
        "activation_function": HF_ACTIVATION[config.activation],
        "add_cross_attention": False,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": config.dropout,
        "bos_token_id": special,
        "dtype": str(dtype).removeprefix("torch."),
        "embd_pdrop": config.dropout,
        "eos_token_id": special,
        "initializer_range": 0.02,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "model_type": "gpt2",
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_inner": None,
        "n_layer": config.n_layer,
        "n_positions": config.block_size,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": config.dropout,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


# Buffers older transformers saved with GPT-2 (the causal mask and its fill value): not weights.
_HF_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def read_hf(config_path: Path, weights: tuple[Path, ...]) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The config and state dict (gpt2lab's names) of a hub-layout checkpoint, checked against each other."""
    config = hf_config_to_gpt(read_json(config_path), str(config_path))
    tensors = {}
    for name, tensor in read_weight_files(weights).items():
        short = name.removeprefix("transformer.")  # GPT2LMHeadModel has the prefix, GPT2Model does not
        if not _HF_BUFFER.match(short):
            tensors[short] = tensor
    _drop_tied_head(tensors, weights[0])
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    return config, collect_state(config, found, tensors.__getitem__, HF_LAYOUT, str(weights[0]))


def _drop_tied_head(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Remove ``lm_head.weight`` when it is the tied copy of wte; refuse a head that differs."""
    head, wte = tensors.pop("lm_head.weight", None), tensors.get("wte.weight")
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise GPT2LabError(f"{where}: lm_head.weight differs from wte.weight; gpt2lab needs the tied GPT-2 head")


def write_hf(
    directory: str | os.PathLike, config: GPTConfig, state: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Write the Hugging Face hub layout (``config.json`` + ``model.safetensors``) that
    ``transformers.GPT2LMHeadModel.from_pretrained`` loads without missing or unexpected keys.

    ``state`` is in gpt2lab's names, on the CPU, without the tied LM head; ``dtype`` is the weights'
    dtype, recorded in the config. Only the plain GPT-2 architecture exists in ``transformers``' GPT-2:
    learned positions, as many key/value heads as query heads, full attention. Anything else is refused
    rather than written as a model that would silently compute something different; :mod:`.hf_variants`
    maps the variants onto the transformers architectures that compute them. A padded vocabulary is dropped.
    """
    config, state = drop_vocab_padding(config, state)
    _refuse_what_transformers_cannot_compute(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # gpt2lab's names are GPT2LMHeadModel's; transformers, too, saves the tied lm_head only as wte.
    hf_state = {name: HF_LAYOUT.from_gpt(name, t).contiguous() for name, t in state.items()}
    write_safetensors(directory / WEIGHTS_FILE, hf_state)
    write_json(directory / CONFIG_FILE, gpt_config_to_hf(config, dtype=dtype))


def _refuse_what_transformers_cannot_compute(c: GPTConfig) -> None:
    unsupported = []
    if c.pos_encoding != "learned":
        unsupported.append(f"{c.pos_encoding} positions")
    if c.n_kv_head != c.n_head:
        unsupported.append(f"{c.n_kv_head} key/value heads for {c.n_head} query heads")
    if any(w is not None for w in c.layer_windows()):
        unsupported.append(f"sliding-window attention (window={c.window})")
    if unsupported:
        raise GPT2LabError(
            "write_hf: transformers' GPT-2 is learned positions, multi-head, full attention; "
            f"this model has {', '.join(unsupported)}; export_hf maps variants to other architectures"
        )
