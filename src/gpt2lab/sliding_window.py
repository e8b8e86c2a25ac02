"""Causal attention: full (one SDPA call, :func:`causal_attention`) and sliding-window in O(T·W), where
query i sees keys i-W+1 .. i (W keys, itself included).

The sequence is cut into chunks of W queries. Every key a chunk needs lies in the chunk itself or the
one before, so each chunk attends to 2W keys under one shared (W, 2W) band mask. On CPU without
dropout the chunks run on PyTorch's CPU flash-attention operator with strided views (no copies of K
and V, O(T) peak memory); elsewhere through ``F.scaled_dot_product_attention``.

Shapes: B batch, nh query heads, nkv key/value heads, T tokens, hs head size, W window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _band_mask(window: int, device: torch.device) -> torch.Tensor:
    # Query i of a chunk sits at offset W + i among the 2W keys [previous chunk | own chunk];
    # it may see key j when i < j <= i + W, i.e. the W keys ending at itself.
    i = torch.arange(window, device=device)[:, None]
    j = torch.arange(2 * window, device=device)[None, :]
    return (j > i) & (j <= i + window)  # (W, 2W)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal attention where query i sees keys i-W+1 .. i, in O(T·W) time and memory.

    The sequence is cut into chunks of W queries. Every key a chunk needs lies in the chunk itself or
    the one before, so each chunk attends to 2W keys under one shared (W, 2W) band mask. The first
    chunk has no predecessor and is plain causal attention.
    """
    T = q.shape[2]
    if T <= window:
        return causal_attention(q, k, v, dropout_p)
    pad = -T % window  # padded keys sit after every real query, so causality hides them
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    if q.is_cpu and dropout_p == 0.0:
        y = _BandedAttentionCPU.apply(q, k, v, window)
    else:
        y = _banded_sdpa(q, k, v, window, dropout_p)
    return y[:, :, :T] if pad else y


def _banded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout_p: float) -> torch.Tensor:
    """The banded computation through F.scaled_dot_product_attention (any device, dropout).

    The 2W-key blocks are copies, and so are their gradients: twice the memory of the CPU path.
    Chunks are folded into the batch dimension because SDPA's flash kernels take 4-D inputs only;
    5-D inputs fall back to the math kernel, which materialises the scores (slower: docs/benchmarks.md).
    """
    B, nh, L, hs = q.shape
    nkv, n = k.shape[1], L // window
    first = causal_attention(q[:, :, :window], k[:, :, :window], v[:, :, :window], dropout_p)

    def chunks(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(2, (n, window)).transpose(1, 2)  # (B, n, h, W, hs)

    qc, kc, vc = chunks(q)[:, 1:], chunks(k), chunks(v)
    k2 = torch.cat((kc[:, :-1], kc[:, 1:]), dim=3)  # (B, n-1, nkv, 2W, hs)
    v2 = torch.cat((vc[:, :-1], vc[:, 1:]), dim=3)
    rest = F.scaled_dot_product_attention(
        qc.flatten(0, 1),
        k2.flatten(0, 1),
        v2.flatten(0, 1),
        attn_mask=_band_mask(window, q.device),
        dropout_p=dropout_p,
        enable_gqa=nh != nkv,
    )  # (B·(n-1), nh, W, hs)
    rest = rest.unflatten(0, (B, n - 1)).transpose(1, 2).flatten(2, 3)
    return torch.cat((first, rest), dim=2)


def _chunks(t: torch.Tensor, window: int) -> torch.Tensor:
    """(h, n·W, hs) -> (n, h, W, hs): chunk c of every head, as a view."""
    return t.unflatten(1, (-1, window)).transpose(0, 1)


def _chunk_pairs(t: torch.Tensor, window: int) -> torch.Tensor:
    """(h, n·W, hs) -> (n-1, h, 2W, hs): chunks c and c+1 back to back, as a view (pairs overlap)."""
    return t.unfold(1, 2 * window, window).permute(1, 0, 3, 2)


# PyTorch's CPU flash-attention operator and its backward, which F.scaled_dot_product_attention
# dispatches to on CPU. Called directly, they take strided views and return the log-sum-exp.
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_BACKWARD_QUERIES = 256  # queries per backward call: bounds the temporaries of the backward pass


class _BandedAttentionCPU(torch.autograd.Function):
    """The banded kernel on the CPU flash operator, with views instead of copies.

    Through SDPA, the (2W-key) blocks must be materialised (2x K and V) and so must their gradients,
    which took more peak memory than full causal attention at long T (docs/benchmarks.md). Here the blocks are
    overlapping views of K and V, the output is written in place, and the backward pass runs a few
    chunks at a time, accumulating straight into the input gradients: beyond those three gradients
    and the output, only per-call temporaries are alive, so the peak stays below full attention's.
    Inputs: (B, h, L, hs) with L a multiple of ``window``; no dropout.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        B, nh, L, hs = q.shape
        band = torch.zeros(window, 2 * window, dtype=q.dtype, device=q.device)
        band.masked_fill_(~_band_mask(window, q.device), float("-inf"))  # the operator wants an additive mask
        out = q.new_empty(B, L, nh, hs)  # heads inner: CausalSelfAttention's next layout, so no copy there
        lse = q.new_empty(B, L // window, nh, window, dtype=torch.promote_types(q.dtype, torch.float32))  # as the op
        for b in range(B):
            qc, kc, vc = (_chunks(t[b], window) for t in (q, k, v))
            oc = _chunks(out[b].transpose(0, 1), window)
            oc[:1], lse[b, :1] = _flash(qc[:1], kc[:1], vc[:1], is_causal=True)
            oc[1:], lse[b, 1:] = _flash(qc[1:], _chunk_pairs(k[b], window), _chunk_pairs(v[b], window), attn_mask=band)
        ctx.save_for_backward(q, k, v, out, lse, band)
        ctx.window = window
        return out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse, band = ctx.saved_tensors
        W = ctx.window
        n = q.shape[2] // W
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        step = max(1, _BACKWARD_QUERIES // W)
        for b in range(q.shape[0]):
            qc, kc, vc, gc = (_chunks(t[b], W) for t in (q, k, v, grad))
            oc = _chunks(out[b].transpose(0, 1), W)
            kp, vp = _chunk_pairs(k[b], W), _chunk_pairs(v[b], W)
            dqc, dkc, dvc = (_chunks(g[b], W) for g in grads)
            first = _flash_backward(gc[:1], qc[:1], kc[:1], vc[:1], oc[:1], lse[b, :1], 0.0, True)
            for acc, d in zip((dqc, dkc, dvc), first, strict=True):
                acc[:1] += d
            for s in range(1, n, step):
                e = min(s + step, n)  # query chunks s..e-1 attend to key pairs s-1..e-2
                dq, dk, dv = _flash_backward(
                    gc[s:e], qc[s:e], kp[s - 1 : e - 1], vp[s - 1 : e - 1], oc[s:e], lse[b, s:e], 0.0, False,
                    attn_mask=band,
                )  # fmt: skip
                dqc[s:e] += dq
                for acc, d in ((dkc, dk), (dvc, dv)):  # pair c-1 holds key chunks c-1 and c
                    acc[s - 1 : e - 1] += d[:, :, :W]
                    acc[s:e] += d[:, :, W:]
        return *grads, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Full causal attention, (B, nh, T, hs) x (B, nkv, T, hs) -> (B, nh, T, hs). K/V heads are never
    repeated for GQA/MQA: SDPA's ``enable_gqa`` broadcasts them over their query heads."""
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1]
    )
