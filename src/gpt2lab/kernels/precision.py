"""Number formats on a device: whether it multiplies bf16 or fp16 natively, and the loss scaler that float16
training needs. (Dtype names as users write them: :func:`gpt2lab.config.parse_dtype`.)"""

from __future__ import annotations

import torch


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` has bf16 matrix instructions: CUDA with bf16 support, or a CPU with AVX-512-BF16
    or AMX. Elsewhere PyTorch multiplies bf16 through generic kernels, tens of times slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def has_native_fp16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies fp16 natively: CUDA (tensor cores), or a CPU with AMX-FP16. AVX2 and
    AVX-512 CPUs convert every fp16 product through generic kernels, many times slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return torch.cpu._is_amx_fp16_supported()
    return False


# The loss scale of float16 training's first step (torch's default). The scaler halves it after every
# step whose gradients overflowed and doubles it after 2000 clean steps in a row.
FP16_INIT_SCALE = 2.0**16


def grad_scaler(dtype: torch.dtype, device: torch.device | str) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16 autocast, a pass-through (disabled) scaler for any other dtype.

    fp16's range is 6e-8 .. 65504: gradients scaled up by the loss scale stay above the bottom of that
    range; a step whose scaled gradients overflow is skipped and the scale lowered. bf16 has float32's
    range and needs no scaling.
    """
    enabled = dtype == torch.float16
    return torch.amp.GradScaler(torch.device(device).type, init_scale=FP16_INIT_SCALE, enabled=enabled)


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa) tensor-core products for float32 matrix multiplies on CUDA.

    One switch, ``torch.backends.cuda.matmul.allow_tf32``, because it is the one that every reader agrees
    with: since torch 2.9 it writes both the global precision (``torch.get_float32_matmul_precision``) and
    the per-backend ``torch.backends.cuda.matmul.fp32_precision``. Writing ``fp32_precision`` alone leaves the
    two disagreeing, and torch then refuses every read of the global one, which Inductor's caches and Dynamo
    still make (torch 2.13): ``torch.compile`` fails. (``torch.set_float32_matmul_precision`` would also switch
    the CPU's oneDNN products.) Convolutions keep torch's default; GPT-2 has none.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
