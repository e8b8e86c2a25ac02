"""int8 weights for CPU inference: every linear layer, the LM head included, becomes PyTorch's dynamically
quantized linear layer (``torch.ao.nn.quantized.dynamic.Linear``, FBGEMM's int8 product on x86).

Weights are stored as int8 with one scale per output channel (symmetric: a row's largest magnitude maps to
the end of int8's range), a quarter of fp32's bytes: decoding, which streams every weight once per token,
reads 4x fewer bytes. Each call quantizes its input rows to int8 on the fly (per tensor, 7 bits as FBGEMM asks, to keep
its 16-bit intermediate sums from overflowing), multiplies in integers and rescales to fp32. The token
embedding stays fp32 for the lookup (one row per token); LayerNorms, attention and the KV cache stay fp32.
Why this library rather than torchao: docs/benchmarks.md (measured decode speed).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from .config import GPT2LabError

SCHEMES = ("int8",)


def quantize_model(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """Replace ``model``'s linear layers in place by int8 ones; the model is then for inference only."""
    if scheme not in SCHEMES:
        raise GPT2LabError(f"unknown quantization '{scheme}' (choose from {', '.join(SCHEMES)})")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise GPT2LabError("int8 weights run on the CPU only (PyTorch's quantized kernels): load the model there")
    if torch.backends.quantized.engine == "none":
        raise GPT2LabError("this PyTorch build has no quantized engine (FBGEMM, oneDNN or QNNPACK) for int8 weights")
    model.float()  # bf16 weights are quantized from their fp32 values; what stays unquantized computes in fp32
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    for parent, name, child in targets:
        if isinstance(child, nn.Linear):
            setattr(parent, name, int8_linear(child))
    return model


def int8_linear(linear: nn.Linear) -> DynamicInt8Linear:
    """``linear`` with int8 weights, one symmetric scale per output channel, and its bias in fp32."""
    weight = linear.weight.detach().float()
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    with warnings.catch_warnings():  # PyTorch announces quantized tensors' eventual removal: docs/benchmarks.md
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel")
        qweight = torch.quantize_per_channel(weight, scale.double(), zero_point.long(), 0, torch.qint8)
    layer = DynamicInt8Linear(linear.in_features, linear.out_features, bias_=linear.bias is not None)
    layer.set_weight_bias(qweight, None if linear.bias is None else linear.bias.detach().float())
    return layer
