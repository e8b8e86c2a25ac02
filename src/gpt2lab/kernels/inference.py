"""What the inference loading path applies to a model, from outside it: the weight dtype and the CPU kernels
that win there, decided by the weights' dtype alone, never by a timing that could differ between processes.

* ``"int8"``: every linear layer becomes int8 (:func:`gpt2lab.kernels.quantize.quantize`).
* bfloat16 / float16 weights on a CPU: the linear layers become :class:`~gpt2lab.kernels.cpu_linear.Linear`,
  whose FBGEMM packed-16-bit product keeps the model usable on CPUs without bf16 instructions, where
  PyTorch's own bf16 product is a generic kernel many times slower than fp32.
* float32: nothing changes. The model keeps ``nn.Linear``, as built; the measured fp32 kernels of
  :mod:`gpt2lab.kernels.cpu_linear` did not win in every process (benchmarks/outside_user.py, docs/benchmarks.md)
  and stay available through :func:`~gpt2lab.kernels.cpu_linear.swap_linear_layers`.

Training applies none of these: it runs with gradients (and usually autocast), where the swapped layer is a
plain ``nn.Linear`` anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from gpt2lab.config import parse_dtype
from gpt2lab.kernels.cpu_linear import swap_linear_layers
from gpt2lab.kernels.quantize import SCHEMES, quantize

PACKED_DTYPES = (torch.bfloat16, torch.float16)


def apply_inference_kernels(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """``model`` cast to ``dtype`` (a ``torch.dtype``, a name such as ``"bf16"``, ``"int8"`` or None: keep
    its dtype) with the kernels that win for that dtype swapped in, in place; returned in eval mode."""
    if isinstance(dtype, str) and dtype in SCHEMES:
        return quantize(model, dtype)
    dtype = parse_dtype(dtype)
    if dtype is not None:
        model.to(dtype)
    weight = next(model.parameters())
    if weight.is_cpu and weight.dtype in PACKED_DTYPES:
        swap_linear_layers(model)
    return model.eval()
