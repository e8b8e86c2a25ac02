"""Causal self-attention and its variants, all switched by :class:`GPTConfig`.

* multi-head (GPT-2), grouped-query and multi-query attention: ``n_kv_head`` key/value heads shared by
  groups of ``n_head / n_kv_head`` query heads. K/V are never repeated: SDPA's ``enable_gqa`` broadcasts.
* rotary position embeddings (RoFormer, Su et al. 2021) applied to queries and keys.
* sliding-window attention (Longformer / Mistral): each query sees the W most recent keys, itself
  included. Training and prefill use the banded O(T·W) kernel of :mod:`gpt2lab.sliding_window`;
  decoding keeps a ring of W slots in its :class:`~gpt2lab.kv_cache.KVCache`.

Three ways through a layer, chosen by the arguments, never by state set from outside: no cache (training,
a whole sequence), the growing cache of eager generation, and a static cache written at an explicit
sequence index (``slot_index``: compiled decoding, one token per row, shapes that never change).

Shapes: B batch, T new tokens, S keys attended (cache + new), nh query heads, nkv key/value heads,
hs head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lab.config import GPTConfig
from gpt2lab.kv_cache import KVCache
from gpt2lab.sliding_window import causal_attention, sliding_window_attention


class CausalSelfAttention(nn.Module):
    """GPT-2's attention block with the variant switches of :class:`GPTConfig`.

    ``c_attn`` packs the query, key and value projections as GPT-2 does: its output is
    ``[q (nh·hs) | k (nkv·hs) | v (nkv·hs)]``, which for MHA is exactly GPT-2's ``3·n_embd``.
    """

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.layer_window(layer)
        self.dropout = config.dropout
        kv_dim = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = RotaryEmbedding(self.head_dim, config.rope_theta) if config.pos_encoding == "rope" else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        slot_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` (B, T, C) at sequence ``positions``; ``valid`` (B, T) marks real tokens of a padded batch.
        ``slot_index`` (1,): the sequence index of the one new token, written there in ``cache``."""
        B, T, C = x.shape
        hs, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if slot_index is None:
            y = self._attend(q, k, v, cache, valid)  # (B, nh, T, hs)
        else:
            y = self._attend_at(q, k, v, cache, slot_index)  # (B, nh, 1, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, nh·hs)
        return self.resid_dropout(self.c_proj(y))

    def _attend_at(self, q, k, v, cache: KVCache, slot_index: torch.Tensor) -> torch.Tensor:
        """Compiled decoding's step: write at ``slot_index`` and read every slot through a mask (fixed shapes)."""
        keys, values, key_index, key_valid = cache.write_at(k, v, slot_index)
        key_valid = key_valid if cache.has_padding else None
        return one_query_attention(q, keys, values, slot_index, key_index, key_valid, self.window)

    def _attend(self, q, k, v, cache: KVCache | None, valid: torch.Tensor | None) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        start = 0 if cache is None else cache.length
        if start == 0 and valid is None:  # nothing cached, no padding: the fast kernels
            if cache is not None:
                cache.update(k, v, None)
            if self.window is None:
                return causal_attention(q, k, v, dropout_p)
            return sliding_window_attention(q, k, v, self.window, dropout_p)
        T = q.shape[2]
        if cache is not None:
            keys, values, key_index, key_valid = cache.update(k, v, valid)
            if T == 1 and not cache.has_padding:  # one new token: every stored key is visible to it
                return F.scaled_dot_product_attention(q, keys, values, enable_gqa=self.n_head != self.n_kv_head)
            key_valid = key_valid if cache.has_padding else None
        query_index = torch.arange(start, start + T, device=q.device)
        if cache is None:
            keys, values, key_index, key_valid = k, v, query_index, valid
        return masked_attention(q, keys, values, query_index, key_index, key_valid, self.window, dropout_p)


class RotaryEmbedding(nn.Module):
    """Rotates each (x[i], x[i + hs/2]) pair of a head by angle pos · theta^(-2i/hs).

    This is the "rotate half" layout of GPT-NeoX and Llama; RoFormer pairs adjacent channels instead.
    Both give scores that depend on relative position only; the layouts differ by a fixed permutation
    of the head channels. Angles are computed from the positions on every call, so any position works,
    including those past ``block_size``.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: (B, h, T, hs); positions: (B, T) or (T,)
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (B, T, hs/2)
        if angles.dim() == 3:
            angles = angles[:, None]  # (B, 1, T, hs/2), broadcast over heads
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor | None,
    window: int | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """General path for padded batches and cached decoding: the mask is built from sequence indices.

    query_index: (T,) and key_index: (S,) sequence indices (-1 marks an empty cache slot);
    key_valid: (B, S), False for padding.
    """
    mask = visible_keys(query_index, key_index, window)[None, None]  # (1, 1, T, S)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
        # A query with no visible key (a pad query before any real token) would give NaN; let it see
        # everything instead. Its output is never used.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1]
    )


def visible_keys(query_index: torch.Tensor, key_index: torch.Tensor, window: int | None) -> torch.Tensor:
    """(T, S) True where the query at sequence index query_index[t] may see the key at key_index[s]:
    a filled slot (index >= 0), not in the future, and within the window if there is one."""
    qi, ki = query_index[:, None], key_index[None, :]
    allowed = (ki >= 0) & (ki <= qi)
    if window is not None:
        allowed = allowed & (ki > qi - window)
    return allowed


def one_query_attention(q, k, v, query_index, key_index, key_valid: torch.Tensor | None, window: int | None):
    """:func:`masked_attention` for one query per row, written as products and sums: compiled decoding's
    attention. Inductor fuses these into a few loops; SDPA's CPU kernel, called with a mask from inside
    the compiled graph, was slower (docs/benchmarks.md).

    q: (B, nh, 1, hs); k, v: (B, nkv, S, hs); query_index: (1,); the query's own key is among the visible.
    """
    B, nh, _, hs = q.shape
    nkv = k.shape[1]
    mask = visible_keys(query_index, key_index, window)[None, None]  # (1, 1, 1, S)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]  # (B, 1, 1, S)
    q = q.view(B, nkv, nh // nkv, 1, hs)  # (B, nkv, g, 1, hs): the g query heads sharing each K/V head
    scores = (q * k[:, :, None]).sum(-1) * hs**-0.5  # (B, nkv, g, S)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    y = (probs[..., None] * v[:, :, None]).sum(-2)  # (B, nkv, g, hs)
    return y.reshape(B, nh, 1, hs)
