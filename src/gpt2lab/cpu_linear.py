"""``Linear``: ``nn.Linear`` with the faster CPU kernel for each shape and dtype when no gradient is needed.

The model builds every projection from this class; training, autocast and torch.compile see a plain
``nn.Linear``. The kernels are PyTorch's own, some reached through internal operators (oneDNN's inner
product, FBGEMM's 16-bit-weight product); each is feature-checked, with ``F.linear`` as the fallback.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .precision import has_native_bf16


def _cpu_has_bf16_matmul() -> bool:
    return has_native_bf16("cpu")


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
