"""Causal attention: full (one SDPA call, :func:`causal_attention`) and sliding-window in O(T·W), where
query i sees keys i-W+1 .. i (W keys, itself included), by one of two kernels.

* FlexAttention (:func:`flex_sliding_window_attention`): PyTorch's fused attention with a block mask.
  Blocks of 128 queries x 128 keys outside the window are skipped, blocks wholly inside it run unmasked,
  the few on its edges are masked. It must run compiled to be fast (eager flex materialises every score):
  one ``torch.compile(flex_attention, dynamic=False)`` per process, one graph per shape.
* Banded (:func:`banded_sliding_window_attention`): the sequence is cut into chunks of W queries. Every
  key a chunk needs lies in the chunk itself or the one before, so each chunk attends to 2W keys under one
  shared (W, 2W) band mask. On CPU without dropout the chunks run on PyTorch's CPU flash-attention
  operator with strided views (no copies of K and V, O(T) peak memory); elsewhere through
  ``F.scaled_dot_product_attention``.

:func:`sliding_window_attention` picks (``window_kernel``): FlexAttention on CUDA without dropout;
banded with dropout, on CPU, and on other devices. FlexAttention on CPU computes no gradients (inference
only), and each new shape costs a compilation of seconds to tens of seconds that one prefill never
repays, so a CPU runs it only when ``GPT2LAB_KERNEL=flex_window`` asks (and only without gradients);
``GPT2LAB_KERNEL=banded_window`` keeps CUDA on the banded kernel. Where flex cannot be compiled (no
C++ compiler or Triton, a torch without it) one warning says so and the banded kernel runs instead.

Shapes: B batch, nh query heads, nkv key/value heads, T tokens, hs head size, W window.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from gpt2lab.kernels.choice import candidates, choose, pinned

# The two kernels, by the names GPT2LAB_KERNEL pins them with.
WINDOW_KERNELS = tuple(
    candidates(
        {
            "flex_window": ("flex_window", "sliding windows through FlexAttention with a block mask (compiled)"),
            "banded_window": ("banded_window", "sliding windows as chunks of W queries against 2W keys"),
        }
    )
)
FLEX_BLOCK = 128  # FlexAttention's block: 128 queries x 128 keys, skipped, run whole, or masked
FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Shapes sent to the compiled flex call at most: torch._dynamo's default recompile_limit. Past it the
# compiled call would run flex eagerly (every score in memory); new shapes take the banded kernel instead.
FLEX_SHAPES_MAX = 8
BLOCK_MASKS_MAX = 16  # block masks kept, by (T, W, device): a few KiB each

_flex_failure: str | None = None  # why flex could not run in this process; then it is never tried again
_flex_shapes: set[tuple] = set()  # the shapes flex has compiled for
_block_masks: dict[tuple, object] = {}


def _band_mask(window: int, device: torch.device) -> torch.Tensor:
    # Query i of a chunk sits at offset W + i among the 2W keys [previous chunk | own chunk];
    # it may see key j when i < j <= i + W, i.e. the W keys ending at itself.
    i = torch.arange(window, device=device)[:, None]
    j = torch.arange(2 * window, device=device)[None, :]
    return (j > i) & (j <= i + window)  # (W, 2W)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal attention where query i sees keys i-W+1 .. i, in O(T·W) time and memory, through the kernel
    :func:`window_kernel` picks; (B, nh, T, hs) x (B, nkv, T, hs) -> (B, nh, T, hs)."""
    if q.shape[2] <= window:
        return causal_attention(q, k, v, dropout_p)
    if window_kernel(q, k, v, dropout_p) == "flex_window":
        y = _try_flex(q, k, v, window)
        if y is not None:
            return y
    return banded_sliding_window_attention(q, k, v, window, dropout_p)


def window_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> str:
    """The kernel :func:`sliding_window_attention` runs for these inputs: "flex_window" or "banded_window"."""
    if dropout_p or _flex_failure is not None:
        return "banded_window"
    device = q.device.type
    if torch.compiler.is_compiling():  # inside a compiled model: no environment read, no choice recorded
        return "flex_window" if device == "cuda" and flex_runs(device, True, q.dtype, q.shape[-1]) else "banded_window"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    runs = flex_runs(device, needs_grad, q.dtype, q.shape[-1])
    if any(name in WINDOW_KERNELS for name in pinned()):
        shape = f"{device}, {'with' if needs_grad else 'without'} gradients"
        trials = {"flex_window": _never_timed if runs else None, "banded_window": _never_timed}
        return choose(("sliding window", device, runs), "sliding window", shape, trials, fallback="banded_window")
    return "flex_window" if runs and device == "cuda" else "banded_window"


def flex_runs(device: str, needs_grad: bool, dtype: torch.dtype, head_size: int) -> bool:
    """Whether FlexAttention can compute this case on ``device`` ("cuda", "cpu", ...)."""
    if dtype not in FLEX_DTYPES:
        return False
    if device == "cuda":
        return head_size >= 16  # Triton's tl.dot, under flex's CUDA kernels, takes 16 columns or more
    return device == "cpu" and not needs_grad  # flex on CPU has no backward


def _never_timed() -> None:
    """What ``choose`` is handed for an available kernel: it only reaches here through a pin, never timed."""


def _try_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor | None:
    """Flex's output, or None where it should not run (too many shapes) or could not be compiled."""
    if torch.compiler.is_compiling():
        return flex_sliding_window_attention(q, k, v, window)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    T = q.shape[2]
    # What the compiled call sees: padded inputs are fresh contiguous copies; unpadded ones bring their strides.
    layout = (q.stride(), k.stride(), v.stride()) if T % FLEX_BLOCK == 0 else None
    key = (-(-T // FLEX_BLOCK), q.shape[:2], k.shape[1], q.shape[3], layout, q.dtype, q.device, window, needs_grad)
    if key in _flex_shapes:
        return flex_sliding_window_attention(q, k, v, window)
    if len(_flex_shapes) >= FLEX_SHAPES_MAX:
        return None
    try:
        y = flex_sliding_window_attention(q, k, v, window)  # compiles for this shape
    except torch.cuda.OutOfMemoryError:  # this call ran out of memory: not a sign that flex is missing
        raise
    except Exception as error:  # no C++ compiler or Triton, a torch without flex, an unsupported case ...
        _give_up_on_flex(error)
        return None
    _flex_shapes.add(key)
    return y


def _give_up_on_flex(error: Exception) -> None:
    global _flex_failure
    inner = getattr(error, "inner_exception", None) or error  # torch.compile wraps its backend's error
    _flex_failure = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    warnings.warn(
        f"FlexAttention unavailable ({_flex_failure}): sliding windows run on the banded kernel", stacklevel=4
    )


def flex_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window attention through compiled FlexAttention: (B, nh, T, hs) x (B, nkv, T, hs) -> (B, nh, T, hs).

    Raises where flex cannot run here (:func:`sliding_window_attention` falls back by itself). T is padded
    to a multiple of 128 (the padded keys come after every real query: causality hides them), so that prompts
    of nearby lengths share one compiled graph; training lengths are usually multiples already (no copy).
    """
    if not torch.is_grad_enabled():  # flex on CPU refuses inputs that require grad, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    T = q.shape[2]
    pad = -T % FLEX_BLOCK
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if torch.compiler.is_compiling():  # inside a compiled model: Dynamo traces flex and its mask into the graph
        from torch.nn.attention.flex_attention import flex_attention

        y = flex_attention(q, k, v, block_mask=window_block_mask(T + pad, window, q.device), enable_gqa=gqa)
    else:
        y = _compiled_flex()(q, k, v, block_mask=_cached_block_mask(T + pad, window, q.device), enable_gqa=gqa)
    return y[:, :, :T] if pad else y


@functools.cache
def _compiled_flex():
    # Imported on first use: torch's flex module pulls in the compiler stack (tens of MiB in every process).
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _cached_block_mask(T: int, window: int, device: torch.device):
    key = (T, window, device)
    mask = _block_masks.get(key)
    if mask is None:
        if len(_block_masks) >= BLOCK_MASKS_MAX:
            del _block_masks[next(iter(_block_masks))]  # the oldest
        mask = _block_masks[key] = window_block_mask(T, window, device)
    return mask


def window_block_mask(T: int, window: int, device: torch.device | str = "cpu"):
    """FlexAttention's ``BlockMask`` of a sliding window over T tokens, one for every batch row and head.

    Computed block by block, O((T/128)²): ``create_block_mask`` gives the same mask but evaluates every
    (query, key) pair, T² booleans (1 GiB at T = 32k) and larger temporaries. A block is full when every
    pair in it is visible (flex skips the mask there), partial when some are; a block cut short by the end
    of the sequence is never full, as ``create_block_mask`` counts it.
    """
    from torch.nn.attention.flex_attention import BlockMask

    start = torch.arange(0, T, FLEX_BLOCK, device=device)  # first token of each block
    last = (start + FLEX_BLOCK - 1).clamp(max=T - 1)  # last real token of each block
    whole = start + FLEX_BLOCK <= T
    # Over query block a and key block b, q - k runs from start[a] - last[b] to last[a] - start[b];
    # a pair is visible when 0 <= q - k < W.
    closest, farthest = start[:, None] - last[None, :], last[:, None] - start[None, :]
    some = (farthest >= 0) & (closest < window)
    every = (closest >= 0) & (farthest < window) & whole[:, None] & whole[None, :]
    return BlockMask.from_kv_blocks(
        *_listed(some & ~every), *_listed(every), BLOCK_SIZE=FLEX_BLOCK, mask_mod=_in_window(window), seq_lengths=(T, T)
    )


def _listed(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, n) booleans -> flex's layout, batch and head broadcast: per query block the number of key blocks
    (1, 1, n) and their indices, those listed first in ascending order, then the others (1, 1, n, n)."""
    blocks = blocks[None, None].to(torch.int32)
    order = torch.argsort(blocks, dim=-1, descending=True, stable=True)
    return blocks.sum(-1, dtype=torch.int32), order.to(torch.int32)


def _in_window(window: int):
    def in_window(b, h, q_idx, kv_idx):  # flex's mask_mod, on the partial blocks: causal, and fewer than W back
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    return in_window


def banded_sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal attention where query i sees keys i-W+1 .. i, in O(T·W) time and memory, any device.

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
