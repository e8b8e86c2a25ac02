"""``Linear``: ``nn.Linear`` with the fastest CPU kernel for each shape and dtype when no gradient is needed.

The model is built with plain ``nn.Linear``; :func:`swap_linear_layers` replaces them by this class from
outside (:func:`gpt2lab.kernels.inference.apply_inference_kernels` decides when). With gradients, under
autocast and under torch.compile it is a plain ``nn.Linear``. The kernels are PyTorch's own, some reached
through internal operators (oneDNN's inner product, FBGEMM's 16-bit-weight product); each is
feature-checked, and which one runs is measured on this machine (:mod:`gpt2lab.kernels.choice`), with
``F.linear`` always among the candidates.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lab.kernels.choice import cached, candidates, choose, ranked, rows_bucket
from gpt2lab.kernels.precision import has_native_bf16

FP16_MAX = 65504.0  # FBGEMM saturates larger weights to this
PACKED_RESULT_BYTES = 32 * 2**20
# Products of more rows are timed on their first MEASURE_ROWS rows and share one choice: the candidates
# are all compute-bound there, and timing GPT-2's head on 8,192 rows would cost seconds.
MEASURE_ROWS = 256


def _cpu_has_bf16_matmul() -> bool:
    return has_native_bf16("cpu")


@functools.cache
def _has_fbgemm_fp16() -> bool:
    """Whether FBGEMM's 16-bit-weight, fp32-compute matrix product is available (x86 builds)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_dynamic_fp16"
    )


@functools.cache
def _onednn_op():
    """oneDNN's inner-product primitive (the op Inductor's CPU backend uses for linear layers), or None."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


class Linear(nn.Linear):
    """``nn.Linear`` with faster CPU inference paths; the same function everywhere else.

    When no gradient is needed on a CPU (outside autocast and torch.compile), :func:`_run_fastest` runs
    the fastest of these, measured per shape on first use:

    * fp32: ``F.linear`` (MKL), oneDNN's inner product, or MKL's product of the transposes.
    * bf16 weights: ``F.linear`` in bf16, weights upcast to fp32, or FBGEMM's 16-bit-weight kernel,
      which converts weights to fp32 in registers: a copy of the weights packed as fp16, built on first
      use, holds every bf16 value exactly (fp16 has 3 more mantissa bits; only magnitudes below 2^-17,
      which fp16 stores as subnormals, round, by at most 2^-25). Inputs are widened to fp32 and the
      fp32-accumulated result is rounded once to bf16: what a bf16 kernel computes. On CPUs without
      bf16 instructions PyTorch's own bf16 product is a generic kernel many times slower than fp32, and
      this one faster than fp32 (docs/benchmarks.md). The packed copy costs 2 bytes per weight.

    fp16 weights have the same candidates (the packed copy then holds the weights exactly as they are).

    With gradients, bf16 on a CPU without bf16 instructions computes in fp32 through autograd; fp32 is
    nn.Linear.
    """

    _fp16_pack: tuple | None = None  # (weight identity and version, FBGEMM-packed weight or None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not x.is_cpu
            or x.dtype != self.weight.dtype
            or type(self.weight) is not nn.Parameter  # a tensor subclass (torchao, ...) brings its own kernel
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()  # Inductor picks its own kernels
        ):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            if x.dtype == torch.bfloat16 and not _cpu_has_bf16_matmul():
                return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
            return super().forward(x)
        if x.dtype == torch.float32:
            return _run_fastest("linear fp32", FP32_KERNELS, x, weight, bias, self)
        if x.dtype == torch.bfloat16:
            return _run_fastest("linear bf16", BF16_KERNELS, x, weight, bias, self)
        if x.dtype == torch.float16:  # the same candidates; the packed copy is the weights themselves
            return _run_fastest("linear fp16", BF16_KERNELS, x, weight, bias, self)
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


def swap_linear_layers(model: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Linear`` of ``model`` in place by :class:`Linear`, sharing its parameters (tied
    weights stay tied, checkpoint names stay the same); return ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                layer = Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                layer.weight, layer.bias = child.weight, child.bias
                layer.train(child.training)
                setattr(parent, name, layer)
    return model


def _run_fastest(operation: str, kernels: dict, x, weight, bias, layer: Linear) -> torch.Tensor:
    """``kernels[name](x, weight, bias, layer)`` for the kernel measured fastest on this (rows, shape, dtype)."""
    rows, (n_out, n_in) = x.numel() // x.shape[-1], weight.shape
    bucket = rows_bucket(min(rows, MEASURE_ROWS))
    key = (operation, bucket, n_in, n_out, bias is not None)
    name = cached(key)  # the common case, once per layer and token: no measuring, no strings
    if name is None:
        sample = x.reshape(rows, n_in)[:MEASURE_ROWS]
        trials = {
            name: functools.partial(kernel, sample, weight, bias, layer) if _available(kernel, layer) else None
            for name, kernel in kernels.items()
        }
        rows_text = f">={MEASURE_ROWS}" if rows >= MEASURE_ROWS else f"<={bucket}"
        shape = f"{rows_text} rows, {n_in}->{n_out}{'' if bias is None else ' +bias'}"
        name = choose(key, operation, shape, trials, fallback="linear")
    if not _available(kernels[name], layer):  # this layer cannot run the choice (weights beyond fp16's range)
        name = next((n for n in ranked(key) if _available(kernels[n], layer)), "linear")
    return kernels[name](x, weight, bias, layer)


def _available(kernel, layer: Linear) -> bool:
    if kernel is _onednn_linear:
        return _onednn_op() is not None
    if kernel is _packed_fp16_kernel:
        return layer._packed_fp16_weight() is not None
    return True


def _plain_linear(x, weight, bias, layer=None):
    return F.linear(x, weight, bias)


def _onednn_linear(x, weight, bias, layer=None):
    return _onednn_op()(x, weight, bias, "none", [], "")


def _packed_fp16_kernel(x, weight, bias, layer: Linear):
    return _packed_fp16_linear(x, layer._packed_fp16_weight(), weight.shape[0])


def _upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer=None) -> torch.Tensor:
    bias = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), bias).to(x.dtype)


def _packed_fp16_linear(x: torch.Tensor, packed, n_out: int) -> torch.Tensor:
    """16-bit ``x`` times FBGEMM-packed weights, in fp32, rounded once to ``x``'s dtype.

    Rows go through in groups whose fp32 result stays under ``PACKED_RESULT_BYTES``: a forward pass
    over 1,024 tokens would otherwise hold GPT-2's logits in fp32 (4 bytes x 50,257 per token) beside their bf16 copy.
    """
    x2 = x.reshape(-1, x.shape[-1])
    out = x.new_empty(x2.shape[0], n_out)
    step = max(1, PACKED_RESULT_BYTES // (4 * n_out))
    for s in range(0, x2.shape[0], step):
        out[s : s + step] = torch.ops.quantized.linear_dynamic_fp16(x2[s : s + step].float(), packed)
    return out.view(*x.shape[:-1], n_out)


def _transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer=None) -> torch.Tensor:
    """``weight @ x.T``, returned as a transposed view: on some CPUs MKL computes a vocabulary projection
    faster this way (docs/benchmarks.md)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(weight, x2.T) if bias is None else torch.addmm(bias[:, None], weight, x2.T)
    return y.T.view(*x.shape[:-1], weight.shape[0])


# The candidates of each operation, called as (x, weight, bias, layer); "linear" is the fallback of both.
_PLAIN = (_plain_linear, "F.linear: PyTorch's default (MKL for fp32 on x86)")
FP32_KERNELS = candidates(
    {
        "linear": _PLAIN,
        "onednn": (_onednn_linear, "oneDNN's inner product (mkldnn._linear_pointwise), Inductor's CPU kernel"),
        "transposed": (_transposed_linear, "MKL computing weight @ x.T, returned as a transposed view"),
    }
)
BF16_KERNELS = candidates(
    {
        "linear": _PLAIN,
        "upcast": (_upcast_linear, "bf16 weights widened to fp32 on every call, fp32 product"),
        "fbgemm_fp16": (_packed_fp16_kernel, "FBGEMM's fp16-packed-weight product, fp32 compute (exact for bf16)"),
    }
)
