"""GPT-2, top to bottom: the MLP, the attention block (:mod:`gpt2lab.attention`), the pre-norm Block, and
GPT itself: token and position embeddings, a stack of blocks, a final LayerNorm and the LM head tied to
the token embedding. Every projection is a plain ``nn.Linear``.

Parameter names follow the original checkpoints (``transformer.h.0.attn.c_attn.weight`` …), so the
readers in :mod:`gpt2lab.checkpoints` only rename prefixes and transpose Conv1D weights. What makes the
model faster without changing what it computes lives outside it, in :mod:`gpt2lab.kernels`, and is applied
from outside: CPU kernels and int8 weights swap its ``nn.Linear`` modules, the training loss reads
:meth:`GPT.hidden_states`, compiled decoding calls :meth:`GPT.decode_step`. Generation is
:mod:`gpt2lab.generation`.

Shapes: B batch, T tokens, C = n_embd, V = vocab_size, Vp = vocab_rows (V padded for training, see GPT).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lab.attention import CausalSelfAttention
from gpt2lab.checkpoints import export_hf, read_checkpoint, write_gpt2lab
from gpt2lab.checkpoints.convert import pool_kv_heads
from gpt2lab.checkpoints.gguf_export import export_gguf
from gpt2lab.config import ACTIVATIONS, GPTConfig, parse_dtype
from gpt2lab.errors import GPT2LabError
from gpt2lab.generation import generate
from gpt2lab.kv_cache import KVCache


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> activation (tanh GELU in GPT-2) -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.activation = ACTIVATIONS[config.activation]
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, positions, cache=None, valid=None, slot_index=None):
        x = x + self.attn(self.ln_1(x), positions, cache, valid, slot_index)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The decoder of "Language Models are Unsupervised Multitask Learners" (Radford et al. 2019).

    The paper's model, in this code:

    * input: token embedding ``transformer.wte`` + learned position embedding ``transformer.wpe``
      (``pos_encoding="rope"`` drops ``wpe`` and rotates queries and keys instead), then dropout;
    * ``n_layer`` :class:`Block` s (``transformer.h``), layer normalization moved to the input of each
      sub-block (section 2.3) and the residual projections' init scaled by 1/sqrt(2·n_layer);
    * an extra layer normalization after the final block (``transformer.ln_f``);
    * the output projection ``lm_head``, sharing its matrix with ``wte``.

    **The padded vocabulary.** A model built for training has ``padded_vocab_size`` rows in ``wte`` and
    ``lm_head`` (GPT-2's 50,257 padded to 50,304, a multiple of 64, as nanoGPT and llm.c do): the LM head is
    the largest product of a step, and a vocabulary that is a multiple of 64 keeps it aligned for tensor
    cores. The extra rows are no token. No input id reaches them, the logits are cut to the first
    ``vocab_size`` columns after the product (so they are never sampled or scored), the training loss leaves
    them out of its softmax (:mod:`gpt2lab.kernels.lm_head_loss`), so their gradient is zero and they stay
    at the zero they start from; every export drops them. They take no random numbers at init, so a padded
    model starts from exactly the weights of the unpadded one.

    :meth:`forward` gives logits; :meth:`hidden_states` the final-LayerNorm activations from which a
    loss without the logits is computed (:mod:`gpt2lab.kernels.lm_head_loss`); :meth:`loss` the plain
    cross-entropy.
    """

    quantized: str | None = None  # the scheme (e.g. "int8") once gpt2lab.quantize has run: inference only

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        parts = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # padded below, after the init
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        )
        if config.pos_encoding == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2·n_layer): each layer adds two such contributions.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.vocab_rows > config.vocab_size:
            self._pad_vocabulary(config.vocab_rows)

    def _pad_vocabulary(self, rows: int) -> None:
        """Zero rows appended to the tied wte / lm_head matrix, up to ``rows`` (the class docstring says why)."""
        wte = self.transformer.wte.weight
        padding = wte.new_zeros(rows - wte.shape[0], wte.shape[1])
        weight = nn.Parameter(torch.cat([wte.detach(), padding]))  # (Vp, C)
        self.transformer.wte.weight, self.transformer.wte.num_embeddings = weight, rows
        self.lm_head.weight, self.lm_head.out_features = weight, rows

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
        *,
        cache: list[KVCache] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); (B, 1, V) for the last position only with ``last_only``.

        ``cache`` (from :meth:`new_cache`) makes the call incremental; ``attention_mask`` (B, T) marks
        real tokens (1) and padding (0) of a left-padded batch; ``position_ids`` default to the sequence
        index.
        """
        x = self.hidden_states(idx, cache=cache, attention_mask=attention_mask, position_ids=position_ids)
        return self._logits(x[:, -1:] if last_only else x)  # (B, T, V)

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        cache: list[KVCache] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final LayerNorm's output (B, T, C): what the LM head multiplies by ``wte``. Arguments as
        :meth:`forward`'s."""
        T = idx.shape[1]
        start = 0 if cache is None else cache[0].length
        self.config.check_length(start + T)
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device)
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        x = self._embed(idx, position_ids)
        for i, block in enumerate(self.transformer.h):
            x = block(x, position_ids, None if cache is None else cache[i], valid)
        return self.transformer.ln_f(x)

    def decode_step(
        self,
        tokens: torch.Tensor,
        index: torch.Tensor,
        cache: list[KVCache],
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, 1, V) of one new token per row (``tokens`` (B, 1)) at sequence ``index`` ((1,) tensor).

        Each layer writes its key and value at that index of its cache and attends over every slot
        through a mask, so all steps have the same shapes and read nothing from the host: one compiled
        graph serves them all (:mod:`gpt2lab.kernels.compiled_decoding`, which advances the caches'
        lengths). ``position_ids`` (B, 1) default to ``index`` (they differ for left-padded rows).
        """
        positions = index if position_ids is None else position_ids
        x = self._embed(tokens, positions)
        for block, layer_cache in zip(self.transformer.h, cache, strict=True):
            x = block(x, positions, layer_cache, slot_index=index)
        return self._logits(self.transformer.ln_f(x))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head over the padded vocabulary, cut to the real one after the product, which stays aligned."""
        logits = self.lm_head(x)  # (B, T, Vp)
        V = self.config.vocab_size
        return logits if logits.shape[-1] == V else logits[..., :V]  # (B, T, V)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(idx)  # token embeddings (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.transformer.wpe(positions)  # + position embeddings
        return self.transformer.drop(x)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the logits against ``targets`` (B, T); targets of -1 are ignored.
        Training computes the same value without the (B, T, V) logits: :mod:`gpt2lab.kernels.lm_head_loss`."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    def new_cache(
        self, batch: int, capacity: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> list[KVCache]:
        """One KV cache per layer, for up to ``capacity`` tokens (ring of W slots for windowed layers)."""
        ref = self.transformer.wte.weight
        c = self.config
        return [
            KVCache(batch, c.n_kv_head, c.head_dim, capacity, window, dtype or ref.dtype, device or ref.device)
            for window in c.layer_windows()
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

    def train(self, mode: bool = True) -> GPT:
        if mode and self.quantized is not None:
            raise GPT2LabError(
                f"this model has {self.quantized} weights and cannot be trained: train the float model, then quantize"
            )
        return super().train(mode)

    def generate(self, prompts, max_new_tokens: int, **options):
        """Sample up to ``max_new_tokens`` after each prompt: see :func:`gpt2lab.generation.generate`."""
        return generate(self, prompts, max_new_tokens, **options)

    def convert_to_gqa(self, n_kv_head: int, init: str = "mean") -> GPT:
        """A copy with ``n_kv_head`` key/value heads, each the mean of its group's heads (or, with
        ``init="first"``, the group's first head): the starting point of GQA uptraining.
        See :func:`gpt2lab.checkpoints.convert.pool_kv_heads`."""
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
        dtype = parse_dtype(dtype)
        config, state = read_checkpoint(name_or_path)
        model = cls(config)
        with torch.no_grad():  # names and shapes are already checked, so load_state_dict cannot complain
            model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]}, strict=True)
        return model.to(device=device, dtype=dtype) if dtype is not None or device is not None else model

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` + ``config.json`` (gpt2lab's own format), each file atomically."""
        write_gpt2lab(directory, self.config, self._state_to_save())

    def export_hf(self, directory: str | Path) -> str:
        """Write the Hugging Face hub layout that ``transformers.AutoModelForCausalLM`` loads with the same
        logits, and return its model type: ``"gpt2"`` (GQA with repeated K/V heads), ``"gpt_bigcode"`` (MQA)
        or ``"starcoder2"`` (RoPE). Per-layer windows and learned positions with a window are refused.
        See :mod:`gpt2lab.checkpoints.hf_variants`."""
        return export_hf(directory, self.config, self._state_to_save(), self.lm_head.weight.dtype)

    def export_gguf(self, path: str | Path, tokenizer, file_type: str = "f32", overwrite: bool = False):
        """Write a GGUF file llama.cpp runs (``gpt2`` or ``starcoder2`` architecture) with ``tokenizer``'s
        vocabulary; see :mod:`gpt2lab.checkpoints.gguf_export`. Returns its :class:`GGUFExport` summary."""
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
