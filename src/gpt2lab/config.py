"""Model configuration: one dataclass, named presets, validation that fails early with one line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from gpt2lab.errors import GPT2LabError, check_number, closest_hint, is_int

# GPT-2's byte-level BPE: 50,257 tokens, the last of them <|endoftext|>, its only special token.
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256
# How a training TOML (which has no null) spells a global layer in a per-layer window list.
FULL_WINDOW = "full"
# The MLP's nonlinearity by config name: GPT-2's tanh approximation of GELU, the exact (erf) GELU, and ReLU
# (the original Transformer's feed-forward network). The exact form moves GPT-2 124M's logits by ~1e-3, so a
# checkpoint must be run with the one it was trained with.
ACTIVATIONS = {
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass
class GPTConfig:
    """Shape of a GPT-2 style decoder and of its attention variant.

    The defaults are GPT-2 small (124M). The three architecture switches compose freely:

    * ``pos_encoding``: ``"learned"`` (GPT-2's ``wpe`` table) or ``"rope"`` (rotary, no ``wpe``).
    * ``n_kv_head``: key/value heads; ``None`` means ``n_head`` (multi-head), ``1`` is multi-query.
    * ``activation``: the MLP's nonlinearity, one of :data:`ACTIVATIONS` (``"gelu_tanh"`` is GPT-2's).
    * ``padded_vocab_size``: rows of ``wte`` and the LM head, ``None`` meaning ``vocab_size``. Training pads
      the vocabulary to a multiple of 64 (50,257 -> 50,304, as nanoGPT and llm.c do) so that the LM head's
      product is aligned for tensor cores; the rows past ``vocab_size`` are never a real token (see
      :class:`gpt2lab.model.GPT`) and are dropped on export.
    * ``window``: ``None`` for full causal attention, or W = the number of keys each query sees,
      *itself included* (query i attends to keys i-W+1 .. i). Mistral's ``sliding_window`` uses the
      same count; Longformer's one-sided window w corresponds to W = w + 1. A list gives one value per
      layer, ``None`` entries being global layers. ``"full"`` is accepted for ``None`` anywhere (TOML
      has no null): ``window = [256, "full", 256, "full"]``.
    """

    block_size: int = 1024
    vocab_size: int = 50257
    padded_vocab_size: int | None = None
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None
    pos_encoding: str = "learned"
    rope_theta: float = 10000.0
    window: int | list[int | None] | None = None
    activation: str = "gelu_tanh"
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if isinstance(self.window, tuple | list):
            self.window = [None if w == FULL_WINDOW else w for w in self.window]
        elif self.window == FULL_WINDOW:
            self.window = None
        if self.padded_vocab_size == self.vocab_size:  # no padding, spelled one way so that configs compare equal
            self.padded_vocab_size = None
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise GPT2LabError(f"config: {name} must be a positive integer, got {value!r}")
        padded = self.padded_vocab_size
        if padded is not None and (not is_int(padded) or padded < self.vocab_size):
            raise GPT2LabError(
                f"config: padded_vocab_size must be unset or an integer >= vocab_size {self.vocab_size}, got {padded!r}"
            )
        if self.n_embd % self.n_head:
            raise GPT2LabError(f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise GPT2LabError(f"config: n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.pos_encoding not in ("learned", "rope"):
            raise GPT2LabError(f"config: pos_encoding must be 'learned' or 'rope', got {self.pos_encoding!r}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise GPT2LabError(f"config: rope needs an even head size, got {self.head_dim}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise GPT2LabError(
                f"config: activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
                + (closest_hint(self.activation, ACTIVATIONS) if isinstance(self.activation, str) else "")
            )
        check_number("config: rope_theta", self.rope_theta, low=0.0, low_open=True)
        check_number("config: layer_norm_epsilon", self.layer_norm_epsilon, low=0.0, low_open=True)
        check_number("config: dropout", self.dropout, low=0.0, high=1.0)
        self._validate_window()

    def _validate_window(self) -> None:
        if isinstance(self.window, list) and len(self.window) != self.n_layer:
            raise GPT2LabError(
                f"config: window list has {len(self.window)} entries but the model has {self.n_layer} layers"
            )
        for w in self.window if isinstance(self.window, list) else [self.window]:
            if w is None:
                continue
            if not is_int(w) or w < 1:
                raise GPT2LabError(
                    f"config: window must be None or an integer >= 1 ('{FULL_WINDOW}' for no window), got {w!r}"
                )
            if w > self.block_size:
                raise GPT2LabError(f"config: window ({w}) is larger than the context block_size ({self.block_size})")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def vocab_rows(self) -> int:
        """Rows of ``wte`` and the LM head: ``padded_vocab_size``, or ``vocab_size`` when unpadded."""
        return self.padded_vocab_size or self.vocab_size

    def unpadded(self) -> GPTConfig:
        """This config without vocabulary padding: what an exported model has."""
        return self.replace(padded_vocab_size=None)

    def layer_window(self, layer: int) -> int | None:
        """The window of layer ``layer``: W keys seen by each query, or None for a global layer."""
        return self.window[layer] if isinstance(self.window, list) else self.window

    def layer_windows(self) -> list[int | None]:
        """The window of every layer, first to last (None: a global layer)."""
        return [self.layer_window(i) for i in range(self.n_layer)]

    def check_length(self, length: int) -> None:
        """Learned positions stop at block_size; RoPE models extrapolate (and slide, with a window)."""
        if self.pos_encoding == "learned" and length > self.block_size:
            raise GPT2LabError(
                f"sequence of {length} tokens is longer than the context ({self.block_size}) of a model "
                "with learned positions"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        for key in d:
            if key not in FIELDS:
                raise GPT2LabError(f"config: unknown key '{key}'{closest_hint(key, FIELDS)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in PRESETS:
            raise GPT2LabError(f"unknown preset '{name}'{closest_hint(name, PRESETS)}; known: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> GPTConfig:
        return GPTConfig.from_dict({**self.to_dict(), **changes})


FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig))


def padded_vocab(vocab_size: int, multiple: int) -> int | None:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (50,257 -> 50,304 for 64), or None when it
    already is one: the ``padded_vocab_size`` that training gives a model."""
    padded = -(-vocab_size // multiple) * multiple
    return None if padded == vocab_size else padded


# Sizes of the four released GPT-2 models (Radford et al. 2019, table 2; hparams.json of each release).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # Small models for CPU experiments and tests.
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


# Weight dtypes by the names users write (``--dtype``, ``from_pretrained(dtype=...)``).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a name such as ``"bfloat16"``, ``"bf16"`` or ``"torch.float32"``; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise GPT2LabError(f"unknown dtype '{dtype}'{closest_hint(key, DTYPE_NAMES)}")
    return DTYPE_NAMES[key]
