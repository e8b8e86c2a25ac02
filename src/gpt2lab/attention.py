"""Causal self-attention and its variants, all in one place.

* multi-head (GPT-2), grouped-query and multi-query attention: ``n_kv_head`` key/value heads shared by
  groups of ``n_head / n_kv_head`` query heads. K/V are never repeated: SDPA's ``enable_gqa`` broadcasts.
* rotary position embeddings (RoFormer, Su et al. 2021) applied to queries and keys.
* sliding-window attention (Longformer / Mistral): each query sees the W most recent keys, itself
  included. Training and prefill use a banded formulation that costs O(T·W); decoding uses a rolling
  KV cache of W slots.

Shapes: B batch, T new tokens, S keys attended (cache + new), nh query heads, nkv key/value heads,
hs head size.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .config import GPTConfig

# ---------------------------------------------------------------------------------------- linear


@functools.cache
def _cpu_has_bf16_matmul() -> bool:
    """Whether oneDNN has a bf16 matrix kernel for this CPU (AVX-512-BF16 or AMX; not plain AVX2)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def _has_fbgemm_fp16() -> bool:
    """Whether FBGEMM's 16-bit-weight, fp32-compute matrix product is available (x86 builds)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_dynamic_fp16"
    )


# oneDNN's inner-product primitive (the op Inductor's CPU backend uses for linear layers), reached
# directly. PyTorch's own fp32 CPU matmul goes to MKL, whose few-row products are slow: on a 2-core Zen 3,
# GPT-2's head takes 28 ms for 8 rows (13 ms through oneDNN) and a 768x2304 layer 1.1 ms (0.65 ms).
_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
FEW_ROWS = 64  # up to here oneDNN is as fast or faster for every GPT-2 layer shape; beyond, MKL catches up
FP16_MAX = 65504.0  # FBGEMM saturates larger weights to this
PACKED_RESULT_BYTES = 32 * 2**20


class Linear(nn.Linear):
    """``nn.Linear`` with faster CPU inference paths; the same function everywhere else.

    When no gradient is needed on a CPU (outside autocast and torch.compile):

    * fp32: :func:`cpu_linear` picks the faster kernel for the shape.
    * bf16 weights on a CPU without bf16 matrix instructions. There PyTorch multiplies bf16 matrices with
      a generic kernel about 50x slower than fp32 (about 1 vs 55 GFLOP/s on a 2-core Zen 3), and
      upcasting the weights on every call costs more than the halved reads save. Instead, the product
      runs in FBGEMM's 16-bit-weight kernel, which converts weights to fp32 in registers: a copy of the
      weights packed as fp16, built on first use, holds every bf16 value exactly (fp16 has 3 more
      mantissa bits; only magnitudes below 2^-17, which fp16 stores as subnormals, round, by at most
      2^-25). Inputs are widened to fp32 and the fp32-accumulated result is rounded once to bf16: what
      a bf16 kernel computes, about 2x faster than fp32 here. The packed copy costs 2 bytes per weight
      on top of the bf16 parameters. Without FBGEMM, several rows are computed in fp32 from upcast
      weights and one row keeps bf16's vectorised matrix-vector kernel.

    With gradients, bf16 on such a CPU computes in fp32 through autograd; fp32 is nn.Linear.
    """

    _fp16_pack: tuple | None = None  # (weight identity and version, FBGEMM-packed weight or None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not x.is_cpu
            or x.dtype != self.weight.dtype
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()  # Inductor picks its own kernels
        ):
            return super().forward(x)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.dtype == torch.bfloat16 and not _cpu_has_bf16_matmul():
            packed = None if needs_grad else self._packed_fp16_weight()
            if packed is not None:
                return _packed_fp16_linear(x, packed, self.out_features)
            if x.numel() > x.shape[-1]:
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)
            return super().forward(x)
        if x.dtype == torch.float32 and not needs_grad:
            return cpu_linear(x, self.weight, self.bias)
        return super().forward(x)

    def _packed_fp16_weight(self):
        """The weight and bias packed for FBGEMM, rebuilt when either changes; None where it cannot be used."""
        key = tuple((t.data_ptr(), t._version) for t in (self.weight, self.bias) if t is not None)
        if self._fp16_pack is None or self._fp16_pack[0] != key:
            packed = None
            if _has_fbgemm_fp16() and float(self.weight.abs().max()) <= FP16_MAX:
                bias = None if self.bias is None else self.bias.detach().float()
                packed = torch.ops.quantized.linear_prepack_fp16(self.weight.detach(), bias)
            self._fp16_pack = (key, packed)
        return self._fp16_pack[1]

    def _apply(self, fn, recurse=True):
        self._fp16_pack = None  # .to(), .float(), ...: the packed copy would be stale
        return super()._apply(fn, recurse)


def _packed_fp16_linear(x: torch.Tensor, packed, n_out: int) -> torch.Tensor:
    """bf16 ``x`` times FBGEMM-packed weights, in fp32, rounded once to bf16.

    Rows go through in groups whose fp32 result stays under ``PACKED_RESULT_BYTES``: a forward pass
    over 1,024 tokens would otherwise hold GPT-2's logits in fp32 (206 MB) beside their bf16 copy.
    """
    x2 = x.reshape(-1, x.shape[-1])
    out = x.new_empty(x2.shape[0], n_out)
    step = max(1, PACKED_RESULT_BYTES // (4 * n_out))
    for s in range(0, x2.shape[0], step):
        out[s : s + step] = torch.ops.quantized.linear_dynamic_fp16(x2[s : s + step].float(), packed)
    return out.view(*x.shape[:-1], n_out)


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` in fp32 on CPU without autograd, with the faster kernel for the shape."""
    rows, (n_out, n_in) = x.numel() // x.shape[-1], weight.shape
    if _onednn_linear is not None and rows <= FEW_ROWS:
        return _onednn_linear(x, weight, bias, "none", [], "")
    if n_out >= 16 * n_in:
        # A vocabulary projection: MKL computes its transpose, weight @ x.T, about 1.4x faster
        # (GPT-2's head on 1,024 rows: 0.53 vs 0.77 s). The result is returned as a transposed view.
        x2 = x.reshape(rows, n_in)
        y = torch.mm(weight, x2.T) if bias is None else torch.addmm(bias[:, None], weight, x2.T)
        return y.T.view(*x.shape[:-1], n_out)
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------- rotary


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


# ---------------------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of one layer, for incremental decoding.

    ``window=None``: a buffer of ``capacity`` slots filled left to right.
    ``window=W``: a ring of W slots; the token at sequence index p lives in slot p % W, so memory stays
    constant however long the generation runs. Keys are stored after RoPE, so a slot's order in the
    ring does not matter: the mask is built from the sequence index stored with each slot.

    ``key_valid`` marks padding (left-padded batches) so that pad tokens are never attended.
    """

    def __init__(
        self,
        batch: int,
        n_kv_head: int,
        head_dim: int,
        capacity: int,
        window: int | None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        size = capacity if window is None else min(window, capacity)
        self.window = window
        self.k = torch.zeros(batch, n_kv_head, size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.key_index = torch.full((size,), -1, dtype=torch.long, device=device)  # -1: empty slot
        self.key_valid = torch.zeros(batch, size, dtype=torch.bool, device=device)
        self.length = 0  # tokens written so far = sequence index of the next token
        self.has_padding = False

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v))

    def _write(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        T = k.shape[2]
        start = self.length
        if self.window is None:
            if start + T > self.capacity:
                raise RuntimeError(f"KV cache is full ({self.capacity} tokens)")
            slots = slice(start, start + T)
            index = torch.arange(start, start + T, device=k.device)
        else:
            keep = min(T, self.capacity)  # only the last W tokens can ever be attended again
            k, v, valid = k[:, :, T - keep :], v[:, :, T - keep :], valid[:, T - keep :]
            index = torch.arange(start + T - keep, start + T, device=k.device)
            slots = index % self.capacity
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        self.key_index[slots] = index
        self.key_valid[:, slots] = valid
        self.length += T

    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None):
        """Store the new (B, nkv, T, hs) keys/values; return what the new queries attend to.

        Returns ``(keys, values, key_index, key_valid)``: the cached entries (new ones included, or
        appended when a multi-token step would overwrite ring slots its own queries still need).
        """
        B, _, T, _ = k.shape
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=k.device)
        else:
            self.has_padding = self.has_padding or not bool(valid.all())
        if self.window is None or T == 1:
            self._write(k, v, valid)
            n = min(self.length, self.capacity)
            return self.k[:, :, :n], self.v[:, :, :n], self.key_index[:n], self.key_valid[:, :n]
        new_index = torch.arange(self.length, self.length + T, device=k.device)
        out = (
            torch.cat((self.k, k), dim=2),
            torch.cat((self.v, v), dim=2),
            torch.cat((self.key_index, new_index)),
            torch.cat((self.key_valid, valid), dim=1),
        )
        self._write(k, v, valid)
        return out


# ---------------------------------------------------------------------------------------- kernels


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Full causal attention, (B, nh, T, hs) x (B, nkv, T, hs) -> (B, nh, T, hs)."""
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1]
    )


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
    5-D inputs fall back to the math kernel, which materialises the scores (2x slower here).
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
    which took about twice the peak memory of full causal attention at T=8192. Here the blocks are
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
    qi, ki = query_index[:, None], key_index[None, :]
    allowed = (ki >= 0) & (ki <= qi)
    if window is not None:
        allowed = allowed & (ki > qi - window)
    mask = allowed[None, None]  # (1, 1, T, S)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
        # A query with no visible key (a pad query before any real token) would give NaN; let it see
        # everything instead. Its output is never used.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1]
    )


# ---------------------------------------------------------------------------------------- module


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
        self.c_attn = Linear(config.n_embd, config.n_embd + 2 * kv_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = RotaryEmbedding(self.head_dim, config.rope_theta) if config.pos_encoding == "rope" else None

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        hs, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        dropout_p = self.dropout if self.training else 0.0

        start = 0 if cache is None else cache.length
        padded = valid is not None and not bool(valid.all())
        if start == 0 and not padded:
            # Fast paths: nothing cached, no padding.
            if self.window is None:
                y = causal_attention(q, k, v, dropout_p)
            else:
                y = sliding_window_attention(q, k, v, self.window, dropout_p)
            if cache is not None:
                cache.update(k, v, valid)
        else:
            query_index = torch.arange(start, start + T, device=x.device)
            if cache is None:
                keys, values, key_index, key_valid = k, v, query_index, valid
            else:
                keys, values, key_index, key_valid = cache.update(k, v, valid)
                if not cache.has_padding:
                    key_valid = None
            if T == 1 and key_valid is None and bool((key_index >= 0).all()):
                # Decoding one token when every stored key is visible (a full cache, or a ring
                # that holds exactly the last W tokens): no mask needed.
                y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=nh != nkv)
            else:
                y = masked_attention(q, keys, values, query_index, key_index, key_valid, self.window, dropout_p)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, nh·hs)
        return self.resid_dropout(self.c_proj(y))
