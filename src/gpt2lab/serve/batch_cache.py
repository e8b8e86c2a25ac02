"""The KV cache of a batch whose rows come and go: continuous batching on :class:`~gpt2lab.kv_cache.KVCache`.

Every row of the batch decodes in lockstep, so the rows are right-aligned: each row's newest token sits at
the last sequence index, and a row with fewer tokens than the batch's length has padding in front (marked
invalid in ``key_valid``, exactly as a left-padded prompt is). A row's position ids count its real tokens
only, so it decodes as it would alone.

When rows join (from their own prefill cache) or leave (finished, or the client went away), the batch
cache is rebuilt by :func:`regroup`: a fresh cache as long as the longest remaining row, each row's last
tokens copied to the same distance from the end. Padding that no row needs any more disappears then, so
the batch never grows longer than its longest row. For a sliding-window layer the ring keeps its rule,
slot = sequence index % ring size, so the copy is a gather from the old slots into the new ones.

Shapes: B rows, nkv key/value heads, S slots, hs head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2lab.kv_cache import KVCache


@dataclass
class RowSource:
    """Where one row's keys and values live now: row ``row`` of ``cache`` (one KVCache per layer),
    ``n_real`` real tokens ending at the cache's length."""

    cache: list[KVCache]
    row: int
    n_real: int


def _slots(cache: KVCache, seq: torch.Tensor) -> torch.Tensor:
    """The slots holding sequence indices ``seq``: the index itself in a linear buffer, index % size in a ring."""
    return seq if cache.window is None else seq % cache.capacity


def _fill_layer(new: KVCache, sources: list[tuple[KVCache, int, int]], length: int) -> None:
    """Copy each source row's last tokens into row i of ``new`` so that they end at ``length``."""
    keep = min(length, new.capacity)  # a ring holds only its last `size` tokens
    seq = torch.arange(length - keep, length, device=new.k.device)
    slots = _slots(new, seq)
    if new.window is not None:
        new.key_index[slots] = seq
    for i, (src, src_row, n_real) in enumerate(sources):
        count = min(n_real, keep)
        src_seq = torch.arange(src.length - count, src.length, device=src.k.device)
        dst = _slots(new, torch.arange(length - count, length, device=new.k.device))
        new.k[i, :, dst] = src.k[src_row, :, _slots(src, src_seq)]
        new.v[i, :, dst] = src.v[src_row, :, _slots(src, src_seq)]
        new.key_valid[i, slots] = seq >= length - n_real  # the padding in front of a shorter row
    new.length = length
    new.has_padding = bool((~new.key_valid[:, slots]).any())


def regroup(model, sources: list[RowSource], extra_capacity: int) -> list[KVCache]:
    """A new batch cache (one KVCache per layer) holding ``sources`` as rows 0.., right-aligned, with room
    for ``extra_capacity`` more steps. Its length is the longest row's token count."""
    length = max(s.n_real for s in sources)
    cache = model.new_cache(len(sources), length + extra_capacity)
    for layer, new in enumerate(cache):
        _fill_layer(new, [(s.cache[layer], s.row, s.n_real) for s in sources], length)
    return cache


def prefill(model, prompts: list[list[int]]) -> tuple[list[KVCache], torch.Tensor]:
    """Run left-padded ``prompts`` through the model once: their cache and last-position logits (B, vocab).

    Position ids count each row's real tokens from 0, as :mod:`gpt2lab.generation` does.
    """
    width = max(len(p) for p in prompts)
    device = model.device
    idx = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts])
    padded = bool((pad > 0).any())
    mask = (torch.arange(width)[None, :] >= pad[:, None]).to(device) if padded else None
    positions = (torch.arange(width)[None, :] - pad[:, None]).clamp(min=0).to(device) if padded else None
    cache = model.new_cache(len(prompts), width)
    logits = model(idx.to(device), cache=cache, attention_mask=mask, position_ids=positions, last_only=True)
    return cache, logits[:, -1]
