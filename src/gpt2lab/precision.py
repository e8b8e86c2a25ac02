"""Number formats: dtype names as users write them, and whether a device multiplies bf16 natively."""

from __future__ import annotations

import torch

from .config import GPT2LabError, closest_hint

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a name such as ``"bfloat16"``, ``"bf16"`` or ``"torch.float32"``; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise GPT2LabError(f"unknown dtype '{dtype}'{closest_hint(key, DTYPE_NAMES)}")
    return DTYPE_NAMES[key]


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` has bf16 matrix instructions: CUDA with bf16 support, or a CPU with AVX-512-BF16
    or AMX. Elsewhere PyTorch multiplies bf16 through generic kernels, tens of times slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False
