"""GPT-2, top to bottom: token and position embeddings, pre-norm blocks of attention and MLP, a final
LayerNorm, and the LM head tied to the token embedding.

Parameter names follow the original checkpoints (``transformer.h.0.attn.c_attn.weight`` …), so the
readers in :mod:`gpt2lab.checkpoints` only rename prefixes and transpose Conv1D weights. The attention
variants live in :mod:`gpt2lab.attention`; the CPU kernel choices in :mod:`gpt2lab.kernels.cpu_linear`; the
memory-saving loss in :mod:`gpt2lab.kernels.lm_head_loss`; generation in :mod:`gpt2lab.generation`.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lab.attention import CausalSelfAttention
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.kernels.cpu_linear import Linear
from gpt2lab.kernels.lm_head_loss import LMHeadLoss
from gpt2lab.kv_cache import KVCache

# The MLP's nonlinearity by config name. GPT-2 uses the tanh approximation of GELU; the exact erf form
# moves 124M logits by ~1e-3, so a checkpoint must be run with the one it was trained with.
ACTIVATION_FUNCTIONS = {
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> activation (tanh GELU in GPT-2) -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.activation = ACTIVATION_FUNCTIONS[config.activation]
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, positions, cache=None, valid=None):
        x = x + self.attn(self.ln_1(x), positions, cache, valid)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    quantized: str | None = None  # "int8" once quantize() has run: inference only

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        parts = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        )
        if config.pos_encoding == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2·n_layer): each layer adds two such contributions.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: list[KVCache] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        last_only: bool = False,
        return_logits: bool = True,
    ):
        """Logits (B, T, vocab) for token ids (B, T); with ``targets``, also the mean cross-entropy.

        ``targets`` equal to -1 are ignored; ``return_logits=False`` (training, evaluation) gives
        ``(None, loss)``, computed by :class:`LMHeadLoss` without materialising the logits.
        ``cache`` (from :meth:`new_cache`) makes the call incremental; ``attention_mask`` (B, T) marks
        real tokens (1) and padding (0) of a left-padded batch; ``position_ids`` default to the sequence
        index; ``last_only`` computes logits for the last position only (generation).
        """
        B, T = idx.shape
        if cache is not None and cache[0].step_index is not None:  # compiled decoding: see kv_cache.py
            position_ids = cache[0].step_index if position_ids is None else position_ids
        else:
            start = 0 if cache is None else cache[0].length
            self.config.check_length(start + T)
            if position_ids is None:
                position_ids = torch.arange(start, start + T, device=idx.device)
        valid = None if attention_mask is None else attention_mask.to(torch.bool)

        x = self.transformer.wte(idx)  # token embeddings (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.transformer.wpe(position_ids)  # + position embeddings
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, position_ids, None if cache is None else cache[i], valid)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:]
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab)
        if not return_logits and self.quantized is None:
            return None, LMHeadLoss.apply(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    def new_cache(
        self, batch: int, capacity: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> list[KVCache]:
        """One KV cache per layer, for up to ``capacity`` tokens (ring of W slots for windowed layers)."""
        ref = self.transformer.wte.weight
        c = self.config
        return [
            KVCache(
                batch, c.n_kv_head, c.head_dim, capacity, c.layer_window(i), dtype or ref.dtype, device or ref.device
            )
            for i in range(c.n_layer)
        ]

    # ------------------------------------------------------------------ utilities
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting the tied LM head once; ``non_embedding`` leaves out wte/wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def quantize(self, scheme: str = "int8") -> GPT:
        """Make every linear layer int8 (per-output-channel scales), in place, for CPU inference; returns the
        model, which then refuses training. See :mod:`gpt2lab.kernels.quantize`."""
        from gpt2lab.kernels.quantize import quantize_model

        quantize_model(self, scheme)
        self.quantized = scheme
        return self.eval()

    def train(self, mode: bool = True) -> GPT:
        if mode and self.quantized is not None:
            raise GPT2LabError(
                f"this model has {self.quantized} weights and cannot be trained: train the float model, then quantize"
            )
        return super().train(mode)

    def generate(self, prompts, max_new_tokens: int, **options):
        """Sample up to ``max_new_tokens`` after each prompt: see :func:`gpt2lab.generation.generate`."""
        from gpt2lab.generation import generate

        return generate(self, prompts, max_new_tokens, **options)

    def convert_to_gqa(self, n_kv_head: int, init: str = "mean") -> GPT:
        """A copy with ``n_kv_head`` key/value heads, each the mean of its group's heads (or, with
        ``init="first"``, the group's first head): the starting point of GQA uptraining.
        See :func:`gpt2lab.checkpoints.convert.pool_kv_heads`."""
        from gpt2lab.checkpoints.convert import pool_kv_heads

        config, state = pool_kv_heads(self.config, self.state_dict(), n_kv_head, init)
        new = GPT(config).to(device=self.device, dtype=self.lm_head.weight.dtype)
        new.load_state_dict(state)
        return new

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
    ) -> GPT:
        """A model with the weights of a hub id, a hub-layout folder or file, an OpenAI TF checkpoint
        (folder or ``model.ckpt`` prefix) or a gpt2lab folder.

        Parameters come back as float32 unless ``dtype`` is given (a ``torch.dtype`` or a name such as
        ``"bfloat16"``), then are moved to ``device``. Hub and TF checkpoints come with dropout 0: they
        carry weights, not the regularisation of the run that produced them. Every failure is a one-line
        :class:`GPT2LabError`.
        """
        from gpt2lab.checkpoints import read_checkpoint
        from gpt2lab.kernels.precision import parse_dtype

        dtype = parse_dtype(dtype)
        config, state = read_checkpoint(name_or_path)
        model = cls(config)
        with torch.no_grad():  # names and shapes are already checked, so load_state_dict cannot complain
            model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]}, strict=True)
        return model.to(device=device, dtype=dtype) if dtype is not None or device is not None else model

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` + ``config.json`` (gpt2lab's own format), each file atomically."""
        from gpt2lab.checkpoints import write_gpt2lab

        write_gpt2lab(directory, self.config, self._state_to_save())

    def export_hf(self, directory: str | Path) -> str:
        """Write the Hugging Face hub layout that ``transformers.AutoModelForCausalLM`` loads with the same
        logits, and return its model type: ``"gpt2"`` (GQA with repeated K/V heads), ``"gpt_bigcode"`` (MQA)
        or ``"starcoder2"`` (RoPE). Per-layer windows and learned positions with a window are refused.
        See :mod:`gpt2lab.checkpoints.hf_variants`."""
        from gpt2lab.checkpoints import export_hf

        return export_hf(directory, self.config, self._state_to_save(), self.lm_head.weight.dtype)

    def export_gguf(self, path: str | Path, tokenizer, file_type: str = "f32", overwrite: bool = False):
        """Write a GGUF file llama.cpp runs (``gpt2`` or ``starcoder2`` architecture) with ``tokenizer``'s
        vocabulary; see :mod:`gpt2lab.checkpoints.gguf_export`. Returns its :class:`GGUFExport` summary."""
        from gpt2lab.checkpoints.gguf_export import export_gguf

        return export_gguf(path, self.config, self._state_to_save(), tokenizer, file_type, overwrite=overwrite)

    def _state_to_save(self) -> dict[str, torch.Tensor]:
        """The tensors on the CPU, contiguous, with the tied LM head left out (it is wte).

        A torch.compile'd model needs no unwrapping: its wrapper forwards these methods to the model.
        """
        if self.quantized is not None:
            raise GPT2LabError(f"a model with {self.quantized} weights cannot be saved: save the float model")
        if self.lm_head.weight is not self.transformer.wte.weight:
            raise GPT2LabError(
                "lm_head is no longer tied to transformer.wte: GPT-2 checkpoints store one shared matrix"
            )
        state = self.state_dict()
        state.pop("lm_head.weight")
        return {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
