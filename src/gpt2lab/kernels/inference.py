"""What the inference loading path applies to a model, from outside it: the weight dtype and the CPU kernels
that win there. A model built as an outside user builds it (``GPT(config)``) keeps plain ``nn.Linear``.

* ``"int8"``: every linear layer becomes int8 (:func:`gpt2lab.kernels.quantize.quantize`).
* float32, bfloat16 or float16 weights on a CPU: the linear layers become
  :class:`~gpt2lab.kernels.cpu_linear.Linear`, which runs each product shape through the kernel measured
  fastest in the process, ``F.linear`` among the candidates (for 16-bit weights FBGEMM's packed product
  keeps the model usable on CPUs without bf16 instructions, where PyTorch's own bf16 product is a generic
  kernel many times slower than fp32). Measured with benchmarks/outside_user.py, one process per
  measurement, the swapped fp32 model was faster than plain ``nn.Linear`` in every process, for a
  1,024-token forward and for decoding (docs/benchmarks.md); ``GPT2LAB_KERNEL=linear`` pins plain
  ``F.linear`` where that does not hold.

Training applies none of these: it runs with gradients (and usually autocast), where the swapped layer is a
plain ``nn.Linear`` anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from gpt2lab.config import parse_dtype
from gpt2lab.kernels.cpu_linear import swap_linear_layers
from gpt2lab.kernels.quantize import SCHEMES, quantize

SWAPPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # on a CPU


def apply_inference_kernels(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """``model`` cast to ``dtype`` (a ``torch.dtype``, a name such as ``"bf16"``, ``"int8"`` or None: keep
    its dtype) with the kernels that win for that dtype swapped in, in place; returned in eval mode."""
    if isinstance(dtype, str) and dtype in SCHEMES:
        return quantize(model, dtype)
    dtype = parse_dtype(dtype)
    if dtype is not None:
        model.to(dtype)
    weight = next(model.parameters())
    if weight.is_cpu and weight.dtype in SWAPPED_DTYPES:
        swap_linear_layers(model)
    return model.eval()
