"""Weight conversions: multi-head to grouped-query (or multi-query) and back, and the padded vocabulary dropped.

Ainslie et al. (2023) start GQA uptraining from a multi-head checkpoint whose key and value heads are
mean-pooled within each group; queries, outputs and every other tensor are kept. Their ablation keeps
each group's first head instead (``init="first"``), which they found worse.

A model trained with a padded vocabulary (``padded_vocab_size``) has rows in ``wte`` that are no token;
every writer drops them (:func:`drop_vocab_padding`), so what leaves gpt2lab is the plain model.
"""

from __future__ import annotations

import torch

from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError


@torch.no_grad()
def pool_kv_heads(config: GPTConfig, state: dict[str, torch.Tensor], n_kv_head: int, init: str = "mean"):
    """``(config, state)`` with ``n_kv_head`` key/value heads, each the mean of its group's heads
    (``init="mean"``) or the group's first head (``init="first"``).

    Weights and biases of K and V are pooled in GPT-2's packed ``c_attn`` (rows ``q | k | v``).
    ``n_kv_head`` equal to the current count is the identity.
    """
    if n_kv_head < 1 or config.n_kv_head % n_kv_head:
        raise GPT2LabError(
            f"cannot convert {config.n_kv_head} key/value heads to {n_kv_head}: "
            f"the new count must divide the current one"
        )
    if init not in ("mean", "first"):
        raise GPT2LabError(f"K/V head init must be 'mean' or 'first', got {init!r}")
    group, hs, q_dim = config.n_kv_head // n_kv_head, config.head_dim, config.n_embd
    pooled_state = dict(state)
    for name, packed in state.items():
        if not name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            continue
        q, k, v = packed.split([q_dim, config.n_kv_head * hs, config.n_kv_head * hs], dim=0)
        grouped = [t.reshape(n_kv_head, group, hs, *t.shape[1:]) for t in (k, v)]  # (n_kv, group, hs, ...)
        merged = [g.mean(dim=1) if init == "mean" else g[:, 0] for g in grouped]  # (n_kv, hs, ...)
        pooled = [m.reshape(n_kv_head * hs, *m.shape[2:]) for m in merged]
        pooled_state[name] = torch.cat((q, *pooled), dim=0)
    return config.replace(n_kv_head=n_kv_head), pooled_state


@torch.no_grad()
def repeat_kv_heads(config: GPTConfig, state: dict[str, torch.Tensor]):
    """``(config, state)`` as multi-head attention that computes exactly the same function.

    Each key/value head is copied for every query head of its group, the broadcast that grouped-query
    attention performs at run time (query head i reads key/value head i // (n_head / n_kv_head)). The
    inverse of :func:`pool_kv_heads`; it lets a GQA model run as plain GPT-2.
    """
    group, hs, kv_dim = config.n_head // config.n_kv_head, config.head_dim, config.n_kv_head * config.head_dim
    repeated_state = dict(state)
    for name, packed in state.items():
        if not name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            continue
        q, k, v = packed.split([config.n_embd, kv_dim, kv_dim], dim=0)
        # (nkv·hs, ...) -> (nkv, 1, hs, ...) -> (nkv, group, hs, ...) -> (nh·hs, ...)
        repeated = [
            t.unflatten(0, (config.n_kv_head, 1, hs)).expand(-1, group, *[-1] * t.dim()).flatten(0, 2) for t in (k, v)
        ]
        repeated_state[name] = torch.cat((q, *repeated), dim=0)
    return config.replace(n_kv_head=config.n_head), repeated_state


def drop_vocab_padding(config: GPTConfig, state: dict[str, torch.Tensor]):
    """``(config, state)`` without the padded vocabulary rows: ``wte`` cut to ``vocab_size`` rows (a copy, so
    that no file holds a view of the larger matrix). The identity for an unpadded model."""
    if config.padded_vocab_size is None:
        return config, state
    name = "transformer.wte.weight"
    return config.unpadded(), {**state, name: state[name][: config.vocab_size].clone()}
