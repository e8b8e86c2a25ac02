"""int8 weights for CPU inference: every linear layer, the LM head included, becomes PyTorch's dynamically
quantized linear layer (``torch.ao.nn.quantized.dynamic.Linear``, FBGEMM's int8 product on x86).

Weights are stored as int8 with one scale per output channel (symmetric: a row's largest magnitude maps to
the end of int8's range), a quarter of fp32's bytes: decoding, which streams every weight once per token,
reads 4x fewer bytes. Each call quantizes its input rows to int8 on the fly (per tensor, 7 bits as FBGEMM asks, to keep
its 16-bit intermediate sums from overflowing), multiplies in integers and rescales to fp32. The token
embedding stays fp32 for the lookup (one row per token); LayerNorms, attention and the KV cache stay fp32.
Why this library rather than torchao: docs/benchmarks.md (measured decode speed).

Applied from outside the model, as gpt-fast's quantize.py does: the model is built with ``nn.Linear`` and
:func:`quantize` swaps the modules.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from gpt2lab.errors import GPT2LabError

SCHEMES = ("int8",)


def quantize(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """Make every linear layer of ``model`` int8 (per-output-channel scales), in place, for CPU inference, and
    return the model in eval mode; a GPT then refuses training and saving (``model.quantized`` names the
    scheme). Public as ``gpt2lab.quantize(model, "int8")``."""
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
    model.quantized = scheme
    return model.eval()


# Int8Linear layers by id, for the custom op below: the op cannot take the packed weight itself.
_LAYERS: weakref.WeakValueDictionary[int, Int8Linear] = weakref.WeakValueDictionary()
_layer_ids = itertools.count()


class Int8Linear(DynamicInt8Linear):
    """PyTorch's dynamically quantized linear layer that torch.compile can keep inside one graph.

    Its FBGEMM weight is a TorchScript object, which Dynamo cannot put in a graph: every call would
    break the graph in two (49 breaks per GPT-2 step). Under compilation the call goes through the
    opaque custom op ``gpt2lab::int8_linear`` instead, which finds the layer by id; eager calls are
    the parent's, unchanged.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._register()

    def _register(self) -> None:
        self.layer_id = next(_layer_ids)
        _LAYERS[self.layer_id] = self

    def __setstate__(self, state) -> None:  # a copy (copy.deepcopy, pickle) must not call its original's weights
        super().__setstate__(state)
        self._register()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.gpt2lab.int8_linear(x, self.layer_id, self.out_features)
        return super().forward(x)


def _int8_linear_op(x: torch.Tensor, layer_id: int, n_out: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, _LAYERS[layer_id]._packed_params._packed_params, reduce_range=True)


def _int8_linear_shape(x: torch.Tensor, layer_id: int, n_out: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], n_out)


# Defined through torch.library.Library rather than the custom_op decorator: its Python wrapper costs several
# times a plain CPU kernel registration per call, and a GPT-2 step makes one call per linear layer.
_LIBRARY = torch.library.Library("gpt2lab", "FRAGMENT")
_LIBRARY.define("int8_linear(Tensor x, int layer_id, int n_out) -> Tensor")
_LIBRARY.impl("int8_linear", _int8_linear_op, "CPU")
torch.library.register_fake("gpt2lab::int8_linear", _int8_linear_shape, lib=_LIBRARY)


def int8_linear(linear: nn.Linear) -> Int8Linear:
    """``linear`` with int8 weights, one symmetric scale per output channel, and its bias in fp32."""
    weight = linear.weight.detach().float()
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    with warnings.catch_warnings():  # PyTorch announces quantized tensors' eventual removal: docs/benchmarks.md
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel")
        qweight = torch.quantize_per_channel(weight, scale.double(), zero_point.long(), 0, torch.qint8)
    layer = Int8Linear(linear.in_features, linear.out_features, bias_=linear.bias is not None)
    layer.set_weight_bias(qweight, None if linear.bias is None else linear.bias.detach().float())
    return layer
