"""The attention pattern the page draws: which prompt tokens one head of one layer attends to.

The model's attention kernels never form the (T, T) probabilities (SDPA and the banded kernel keep them
inside), so the pattern is recomputed outside the model: a forward pre-hook on the chosen layer's
attention records its input (after ``ln_1``) and positions during an ordinary forward pass, and the
pattern is built from the layer's own weights: the query/key projection of ``c_attn``, RoPE when the
model uses it, the key/value head that serves this query head under GQA, and the causal mask narrowed to
the layer's window, so a sliding window shows as a band.

Shapes: T prompt tokens, nh query heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import math

import torch

from gpt2lab.attention import visible_keys


def layer_input(model, ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input (1, T, C) and positions (T,) the attention of ``layer`` sees when the model reads ``ids``."""
    seen = {}

    def record(module, args):
        seen["x"], seen["positions"] = args[0].detach(), args[1]

    handle = model.transformer.h[layer].attn.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            model(torch.tensor([ids], device=model.device), last_only=True)
    finally:
        handle.remove()
    return seen["x"], seen["positions"]


def attention_pattern(model, x: torch.Tensor, positions: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Attention probabilities (T, T) of query head ``head`` of ``layer`` for the layer input ``x`` (1, T, C).

    Row t is query t's distribution over keys 0..T-1; masked keys (the future, outside the window) are 0.
    """
    attn = model.transformer.h[layer].attn
    hs, nh, nkv = attn.head_dim, attn.n_head, attn.n_kv_head
    T = x.shape[1]
    with torch.no_grad():
        q, k, _ = attn.c_attn(x).float().split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(1, T, nh, hs).transpose(1, 2)  # (1, nh, T, hs)
        k = k.view(1, T, nkv, hs).transpose(1, 2)  # (1, nkv, T, hs)
        if attn.rotary is not None:
            q, k = attn.rotary(q, positions), attn.rotary(k, positions)
        kv_head = head // (nh // nkv)  # GQA: consecutive query heads share one key/value head
        scores = q[0, head] @ k[0, kv_head].T / math.sqrt(hs)  # (T, T)
        index = torch.arange(T, device=x.device)
        allowed = visible_keys(index, index, attn.window)  # causal, and within the window if there is one
        return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def attention_view(model, tokenizer, ids: list[int], layer: int, head: int) -> dict:
    """What the page draws: the tokens as text, the layer's window, and the (T, T) pattern (rounded)."""
    x, positions = layer_input(model, ids, layer)
    pattern = attention_pattern(model, x, positions, layer, head)
    return {
        "tokens": [tokenizer.decode_bytes([i]).decode("utf-8", errors="replace") for i in ids],
        "layer": layer,
        "head": head,
        "window": model.transformer.h[layer].attn.window,
        "weights": [[round(p, 4) for p in row] for row in pattern.tolist()],
    }
