"""Exporting every attention variant that some transformers architecture computes exactly.

=================================  ==============================================================
gpt2lab model                      transformers architecture
=================================  ==============================================================
learned positions, multi-head      GPT-2 (:func:`~gpt2lab.checkpoints.hf.write_hf`)
learned positions, GQA             GPT-2, each key/value head repeated for its group of queries
learned positions, MQA             GPTBigCode with ``multi_query`` (gpt2lab's packed ``c_attn``)
RoPE (any K/V heads, one window)   Starcoder2: pre-norm LayerNorms with biases, c_fc/c_proj MLP,
                                   q/k/v/o projections with biases, ``num_key_value_heads``, the
                                   "rotate half" rotary layout, ``sliding_window``
=================================  ==============================================================

Starcoder2's ``sliding_window`` counts keys as gpt2lab's ``window`` does: query i sees keys
i-W+1 .. i, itself included (transformers' mask keeps ``kv_idx > q_idx - sliding_window``).
What no transformers architecture computes is refused with one line rather than exported as a model
that would silently compute something else: different windows per layer (Starcoder2 has one
``sliding_window`` for all layers), and a window with learned positions (GPT-2 and GPTBigCode attend
to every earlier token).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gpt2lab.checkpoints.convert import drop_vocab_padding, repeat_kv_heads
from gpt2lab.checkpoints.hf import HF_ACTIVATION, special_token_id, write_hf
from gpt2lab.checkpoints.tensor_files import write_safetensors
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.files import write_json
from gpt2lab.outputs import CONFIG_FILE, WEIGHTS_FILE

__all__ = ["export_hf", "hf_architecture"]


def hf_architecture(config: GPTConfig) -> str:
    """``"gpt2"``, ``"gpt_bigcode"`` or ``"starcoder2"``: the transformers model type that computes
    ``config`` exactly; anything else is a one-line :class:`GPT2LabError` naming why."""
    windows = set(config.layer_windows())
    if len(windows) > 1:
        raise GPT2LabError(
            f"export_hf: per-layer windows ({config.window}) exist in no transformers architecture this "
            "exporter targets (Starcoder2 has one sliding_window for all layers); use save_pretrained"
        )
    if config.pos_encoding == "rope":
        return "starcoder2"
    if windows != {None}:
        raise GPT2LabError(
            f"export_hf: a sliding window (window={config.window}) with learned positions exists in no "
            "transformers architecture (GPT-2 and GPTBigCode attend to every earlier token; Starcoder2 "
            "needs RoPE); use save_pretrained"
        )
    if config.n_kv_head == 1 and config.n_head > 1:
        return "gpt_bigcode"
    return "gpt2"


def export_hf(
    directory: str | os.PathLike, config: GPTConfig, state: dict[str, torch.Tensor], dtype: torch.dtype
) -> str:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers.AutoModelForCausalLM`` loads
    as the architecture :func:`hf_architecture` names (returned), computing the same logits.

    ``state`` is in gpt2lab's names, on the CPU, without the tied LM head; ``dtype`` is the weights'. A padded
    vocabulary is dropped: transformers' models have ``vocab_size`` rows.
    """
    config, state = drop_vocab_padding(config, state)
    architecture = hf_architecture(config)
    if architecture == "gpt2":
        if config.n_kv_head != config.n_head:
            config, state = repeat_kv_heads(config, state)
        write_hf(directory, config, state, dtype)
        return architecture
    if architecture == "gpt_bigcode":
        # GPTBigCode's names, nn.Linear (out, in) weights and packed q | k | v c_attn are gpt2lab's own.
        tensors, hf_config = state, _gpt_bigcode_config(config, dtype)
    else:
        tensors, hf_config = _starcoder2_state(config, state), _starcoder2_config(config, dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_FILE, tensors)
    write_json(directory / CONFIG_FILE, hf_config)
    return architecture


def _common_fields(config: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    special = special_token_id(config)
    return {
        "bos_token_id": special,
        "eos_token_id": special,
        "dtype": str(dtype).removeprefix("torch."),
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def _gpt_bigcode_config(config: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    """transformers' GPTBigCodeConfig fields of a multi-query model with learned positions."""
    return {
        **_common_fields(config, dtype),
        "architectures": ["GPTBigCodeForCausalLM"],
        "model_type": "gpt_bigcode",
        "multi_query": True,
        "activation_function": HF_ACTIVATION[config.activation],
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": 4 * config.n_embd,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "attn_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "scale_attn_weights": True,
        "add_cross_attention": False,
    }


def _starcoder2_config(config: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    """transformers' Starcoder2Config fields of a RoPE model with one window (or none) for all layers."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    return {
        **_common_fields(config, dtype),
        "architectures": ["Starcoder2ForCausalLM"],
        "model_type": "starcoder2",
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "hidden_act": HF_ACTIVATION[config.activation],
        # RoPE has no table to run out of; this is the context the model was trained for.
        "max_position_embeddings": config.block_size,
        "norm_epsilon": config.layer_norm_epsilon,
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,  # where transformers 4.x and servers that follow it read the base
        "sliding_window": config.layer_window(0),
        "attention_dropout": config.dropout,
        "embedding_dropout": config.dropout,
        "residual_dropout": config.dropout,
        "use_bias": True,
    }


# gpt2lab's block-level module names -> Starcoder2's; c_attn is split into q/k/v below.
_STARCODER2_MODULES = {
    "ln_1": "input_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "ln_2": "post_attention_layernorm",
    "mlp.c_fc": "mlp.c_fc",
    "mlp.c_proj": "mlp.c_proj",
}


def _starcoder2_state(config: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Starcoder2ForCausalLM's tensors (nn.Linear weights, as gpt2lab's), the tied lm_head left out."""
    q_dim, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"]}
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}", f"model.layers.{i}"
        for leaf in ("weight", "bias"):
            for module, name in _STARCODER2_MODULES.items():
                out[f"{theirs}.{name}.{leaf}"] = state[f"{ours}.{module}.{leaf}"]
            # c_attn rows are q | k | v; each becomes its own tensor (clone: safetensors refuses views
            # that share storage)
            q, k, v = state[f"{ours}.attn.c_attn.{leaf}"].split([q_dim, kv_dim, kv_dim], dim=0)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{theirs}.self_attn.{name}.{leaf}"] = part.clone()
    out |= {f"model.norm.{leaf}": state[f"transformer.ln_f.{leaf}"] for leaf in ("weight", "bias")}
    return out
