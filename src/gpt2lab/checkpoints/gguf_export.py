"""GGUF export: a file llama.cpp (and what is built on it: llama-cpp-python, Ollama, LM Studio) runs.

=================================  ==============================================================
gpt2lab model                      llama.cpp architecture
=================================  ==============================================================
learned positions (MHA, GQA, MQA)  ``gpt2``: LayerNorms with biases, fused q | k | v ``attn_qkv``
                                   (split by ``head_count_kv``), tanh-GELU MLP, ``position_embd``
RoPE (MHA, GQA, MQA)               ``starcoder2``: the same block with separate q/k/v projections,
                                   NeoX ("rotate half") RoPE over the whole head, ``rope.freq_base``
=================================  ==============================================================

Both graphs tie the output layer to ``token_embd`` when the file has no ``output`` tensor, and both
compute ``ggml_gelu``, GPT-2's tanh approximation. What they cannot compute is refused with one line:
the exact (erf) GELU and ReLU, and any sliding window (neither graph masks keys by distance).

Types: ``f32``; ``f16`` (matrices in half precision, norms and biases in f32, as llama.cpp's converter
does); ``q8_0`` (matrices in blocks of 32 int8 values with one f16 scale each, quantized by the ``gguf``
package; a matrix whose rows are not a multiple of 32 long stays f16, and the position table stays f32,
as llama.cpp's converter keeps it). The file is written to a temporary name and moved into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpt2lab.checkpoints.convert import drop_vocab_padding
from gpt2lab.checkpoints.gguf_vocab import GGUFVocab, gguf_vocab
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.files import atomic_file
from gpt2lab.tokenizer import Tokenizer

__all__ = ["GGUF_TYPES", "GGUFExport", "export_gguf", "gguf_architecture", "gguf_tensors"]

GGUF_TYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32  # values per q8_0 block (ggml's QK8_0)


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote: the architecture, and how many tensors of each ggml type."""

    path: Path
    architecture: str
    tensor_types: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        return f"llama.cpp '{self.architecture}' model ({types} tensors)"


def gguf_architecture(config: GPTConfig) -> str:
    """``"gpt2"`` or ``"starcoder2"``: the llama.cpp architecture that computes ``config`` exactly; anything
    else is a one-line :class:`GPT2LabError` naming why."""
    windows = {config.layer_window(i) for i in range(config.n_layer)}
    if len(windows) > 1:
        raise GPT2LabError(
            f"export_gguf: per-layer windows ({config.window}) exist in no llama.cpp architecture with "
            "LayerNorm biases and a GELU MLP (its gpt2 and starcoder2 graphs attend to every earlier token)"
        )
    if windows != {None}:
        raise GPT2LabError(
            f"export_gguf: llama.cpp's gpt2 and starcoder2 graphs have no sliding window (window={config.window}); "
            "they would attend to every earlier token"
        )
    if config.activation != "gelu_tanh":
        raise GPT2LabError(
            f"export_gguf: activation '{config.activation}' is not what llama.cpp's gpt2 and starcoder2 graphs "
            "compute (ggml_gelu, the tanh GELU: activation 'gelu_tanh')"
        )
    return "starcoder2" if config.pos_encoding == "rope" else "gpt2"


def gguf_tensors(config: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (gpt2lab's names, tied head left out) in llama.cpp's names for :func:`gguf_architecture`.

    Shapes stay PyTorch's (out, in); GGUF lists dimensions the other way round, so a (V, C) matrix is
    llama.cpp's {C, V}, which is what its loader asks for.
    """
    architecture = gguf_architecture(config)
    out = {"token_embd.weight": state["transformer.wte.weight"]}
    if architecture == "gpt2":
        out["position_embd.weight"] = state["transformer.wpe.weight"]
    q_dim, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
    for i in range(config.n_layer):
        ours, blk = f"transformer.h.{i}", f"blk.{i}"
        for leaf in ("weight", "bias"):
            out[f"{blk}.attn_norm.{leaf}"] = state[f"{ours}.ln_1.{leaf}"]
            qkv = state[f"{ours}.attn.c_attn.{leaf}"]  # rows q | k | v, llama.cpp's order too
            if architecture == "gpt2":
                out[f"{blk}.attn_qkv.{leaf}"] = qkv
            else:
                q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=0)
                out |= {f"{blk}.attn_q.{leaf}": q, f"{blk}.attn_k.{leaf}": k, f"{blk}.attn_v.{leaf}": v}
            out[f"{blk}.attn_output.{leaf}"] = state[f"{ours}.attn.c_proj.{leaf}"]
            out[f"{blk}.ffn_norm.{leaf}"] = state[f"{ours}.ln_2.{leaf}"]
            out[f"{blk}.ffn_up.{leaf}"] = state[f"{ours}.mlp.c_fc.{leaf}"]
            out[f"{blk}.ffn_down.{leaf}"] = state[f"{ours}.mlp.c_proj.{leaf}"]
    out |= {f"output_norm.{leaf}": state[f"transformer.ln_f.{leaf}"] for leaf in ("weight", "bias")}
    return out


def export_gguf(
    path: str | os.PathLike,
    config: GPTConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    file_type: str = "f32",
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> GGUFExport:
    """Write ``path``, a GGUF file of ``config`` + ``state`` (gpt2lab's names, tied head left out) with the
    vocabulary of ``tokenizer``, its matrices in ``file_type`` (one of :data:`GGUF_TYPES`).

    An existing ``path`` is replaced only with ``overwrite``; refusals come before any work. A padded
    vocabulary is dropped: the file has a row for each of ``vocab_size`` tokens.
    """
    config, state = drop_vocab_padding(config, state)
    gguf = _import_gguf()
    path = Path(path)
    if file_type not in GGUF_TYPES:
        raise GPT2LabError(f"export_gguf: type must be one of {', '.join(GGUF_TYPES)}, got {file_type!r}")
    if path.is_dir():
        raise GPT2LabError(f"export_gguf: {path} is a folder; give the path of the .gguf file to write")
    if path.exists() and not overwrite:
        raise GPT2LabError(f"{path} exists; pass --overwrite to replace it")
    architecture = gguf_architecture(config)
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    tensors = gguf_tensors(config, state)
    writer = gguf.GGUFWriter(None, architecture)
    _add_hyperparameters(writer, gguf, config, architecture, file_type, name or path.stem)
    _add_vocab(writer, vocab)
    summary = GGUFExport(path, architecture)
    for tensor_name, tensor in tensors.items():
        data, ggml_type = _encode(gguf, tensor_name, tensor, file_type)
        writer.add_tensor(tensor_name, data, raw_dtype=ggml_type)
        summary.tensor_types[ggml_type.name] = summary.tensor_types.get(ggml_type.name, 0) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return summary


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise GPT2LabError("GGUF export needs the gguf package: pip install 'gpt2lab[gguf]'") from None
    return gguf


def _add_hyperparameters(writer, gguf, config: GPTConfig, architecture: str, file_type: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    if architecture == "starcoder2":
        writer.add_rope_dimension_count(config.head_dim)  # the whole head rotates
        writer.add_rope_freq_base(config.rope_theta)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    # gpt2lab feeds the prompt as it is: no token is prepended or appended.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _encode(gguf, name: str, tensor: torch.Tensor, file_type: str) -> tuple[np.ndarray, object]:
    """The bytes and ggml type of one tensor: vectors and the position table in f32, matrices in the
    requested type (q8_0 only where each row is a whole number of 32-value blocks, else f16)."""
    types = gguf.GGMLQuantizationType
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if file_type == "f32" or data.ndim == 1 or name == "position_embd.weight":
        return data, types.F32
    if file_type == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
        return gguf.quants.quantize(data, types.Q8_0), types.Q8_0
    return data.astype(np.float16), types.F16
