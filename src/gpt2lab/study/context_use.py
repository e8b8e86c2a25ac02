"""How much context a trained model uses: its loss when it may see only the last c tokens.

Targets are sampled from the validation stream at indices i >= context (every ``stride``-th one, up to
``targets``), so each has a full context behind it. For each cut c the model reads exactly the c tokens
``tokens[i - c : i]`` and predicts ``tokens[i]`` (its last position); c = context is the full window. The
same targets are used for every c and every run, so loss(c) - loss(context) is a paired quantity.

The effective context is the smallest measured c whose loss, and that of every longer measured cut, is
within ``tolerance`` (0.01 nats) of the full-context loss: cutting the context to it costs less than
the tolerance, cutting it shorter costs more.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TOLERANCE = 0.01  # nats


def cut_lengths(context: int) -> list[int]:
    """1, 2, 4, ... up to the context, plus 3/4 of each doubling step (a finer grid where it matters)."""
    lengths, c = set(), 1
    while c < context:
        lengths |= {c, max(1, (3 * c) // 2)}
        c *= 2
    return sorted(x for x in lengths | {context} if x <= context)


def target_indices(n_tokens: int, context: int, targets: int) -> np.ndarray:
    """Up to ``targets`` target indices spread evenly over [context, n_tokens)."""
    available = n_tokens - context
    stride = max(1, available // max(1, targets))
    return np.arange(context, n_tokens, stride)[:targets]


@torch.no_grad()
def loss_by_cut(model, tokens: np.ndarray, context: int, targets: int = 1024, batch_size: int = 64) -> dict:
    """{"lengths": [c, ...], "loss": [mean loss with c tokens of context, ...]} on the sampled targets."""
    tokens = np.asarray(tokens, dtype=np.int64)
    at = target_indices(len(tokens), context, targets)
    lengths = cut_lengths(context)
    device = model.device
    losses = []
    for c in lengths:
        total = 0.0
        for start in range(0, len(at), batch_size):
            rows = at[start : start + batch_size]
            x = torch.from_numpy(np.stack([tokens[i - c : i] for i in rows])).to(device)  # (B, c)
            y = torch.from_numpy(tokens[rows]).to(device)  # (B,)
            logits = model(x, last_only=True)[:, -1]  # (B, V)
            total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        losses.append(total / len(at))
    return {"lengths": lengths, "loss": losses, "targets": len(at)}


def effective_context(lengths: list[int], losses: list[float], tolerance: float = TOLERANCE) -> int:
    """The smallest c such that loss(c') - loss(full) < tolerance for every measured c' >= c."""
    full = losses[-1]
    effective = lengths[-1]
    for c, loss in reversed(list(zip(lengths, losses, strict=True))):
        if loss - full >= tolerance:
            break
        effective = c
    return effective
