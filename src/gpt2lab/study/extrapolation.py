"""Length extrapolation: loss by position at 1x, 2x and 4x the trained context, on the same tokens.

Every factor scores the same span of validation tokens (a whole number of 4x windows), cut into
windows of factor x context that each start fresh, so position p has seen exactly p earlier tokens.
RoPE models run at every factor. Learned positions have no embedding past the trained context, so
they run at 1x and, as the comparator at 4x, with a sliding context: every token is predicted from at
most ``context`` tokens before it (a new window every ``stride`` tokens), which is what a deployed
learned-position model does with a long input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FACTORS = (1, 2, 4)


def extrapolation_span(tokens: np.ndarray, context: int, max_tokens: int | None) -> np.ndarray:
    """The evaluated span: as many whole 4x windows as fit (and ``max_tokens`` allows), + 1 target."""
    long = context * FACTORS[-1]
    budget = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    n_windows = budget // long
    return np.asarray(tokens[: n_windows * long + 1], dtype=np.int64)


@torch.no_grad()
def _direct(model, span: np.ndarray, length: int, batch_size: int) -> np.ndarray:
    """Mean loss at each position of non-overlapping ``length``-token windows of ``span``: (length,)."""
    n = (len(span) - 1) // length
    total = torch.zeros(length, dtype=torch.float64)
    for start in range(0, n, batch_size):
        rows = np.stack([span[r * length : r * length + length + 1] for r in range(start, min(start + batch_size, n))])
        batch = torch.from_numpy(rows)
        logits = model(batch[:, :-1])  # (B, length, V)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        total += losses.view(len(rows), length).double().sum(dim=0)
    return (total / n).numpy()


@torch.no_grad()
def sliding(model, span: np.ndarray, context: int, length: int, stride: int) -> np.ndarray:
    """Loss by position of ``length``-token windows where no token sees more than ``context`` before it.

    Positions [0, context) come from one pass; then each pass covers the next ``stride`` targets with
    the ``context`` tokens that end at them (so a target sees between context - stride + 1 and context).
    """
    n = (len(span) - 1) // length
    windows = torch.from_numpy(np.stack([span[r * length : r * length + length + 1] for r in range(n)]))
    x, y = windows[:, :-1], windows[:, 1:]
    losses = torch.zeros(n, length, dtype=torch.float64)
    ends = [context, *range(context + stride, length, stride), length]
    for i, end in enumerate(ends):
        first = 0 if i == 0 else ends[i - 1]  # targets not scored yet
        logits = model(x[:, end - context : end])[:, first - (end - context) :]  # (n, end - first, V)
        scored = F.cross_entropy(logits.flatten(0, 1).float(), y[:, first:end].flatten(), reduction="none")
        losses[:, first:end] = scored.view(n, end - first).double()
    return losses.mean(dim=0).numpy()


def extrapolate(model, tokens: np.ndarray, context: int, settings: dict) -> dict[str, list[float]]:
    """Loss by position per method: ``"1x"``, ``"2x"``, ``"4x"`` (RoPE), ``"sliding-4x"`` (every model)."""
    span = extrapolation_span(tokens, context, settings.get("max_tokens"))
    if len(span) <= 1:
        return {}
    batch = settings.get("batch_size", 8)
    rope = model.config.pos_encoding == "rope"
    curves = {f"{f}x": _direct(model, span, f * context, batch).tolist() for f in FACTORS if rope or f == 1}
    stride = settings.get("stride", context // 4)
    curves[f"sliding-{FACTORS[-1]}x"] = sliding(model, span, context, FACTORS[-1] * context, stride).tolist()
    return curves


def band_means(curve: list[float], context: int) -> dict[str, float]:
    """Mean loss over [0, ctx), [ctx, 2ctx) and [2ctx, 4ctx) where the curve reaches them."""
    bands = {"0-1x": (0, context), "1x-2x": (context, 2 * context), "2x-4x": (2 * context, 4 * context)}
    return {name: float(np.mean(curve[a:b])) for name, (a, b) in bands.items() if len(curve) >= b}
