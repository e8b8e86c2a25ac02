"""Weight files: safetensors and ``pytorch_model.bin`` read into tensors, safetensors written atomically.

The files hold names and tensors only; what the names mean is up to the format reading them
(:mod:`~gpt2lab.checkpoints.hf`, :mod:`~gpt2lab.checkpoints.native`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from gpt2lab.checkpoints.safe_pickle import load_weights_only
from gpt2lab.errors import GPT2LabError
from gpt2lab.files import atomic_file, one_line

__all__ = ["check_finite", "read_weight_files", "write_safetensors"]


def read_weight_files(paths: tuple[Path, ...]) -> dict[str, torch.Tensor]:
    """Every tensor in ``paths`` (one file, or the shards of one checkpoint), by name, on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        tensors |= _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch_bin(path)
    return tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise GPT2LabError(f"missing weights file {path}")
    try:
        return load_file(path)
    except SafetensorError as err:
        raise GPT2LabError(f"{path} is not a readable safetensors file: {one_line(str(err))}") from err


def _read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` state dict, unpickled with ``weights_only=True``.

    A pickle can run arbitrary code when loaded; the weights-only unpickler allows tensors and plain
    containers only, so a file carrying anything else is refused before any of it runs.
    """
    if not path.is_file():
        raise GPT2LabError(f"missing weights file {path}")
    state = load_weights_only(path, str(path))
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise GPT2LabError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def check_finite(state: Mapping[str, torch.Tensor], where: object) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor: such a model writes newlines and
    scores ``loss nan`` instead of failing. One pass over the weights, a fraction of reading them."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise GPT2LabError(
                f"{where}: tensor {name} holds {bad:,} NaN or infinite value(s); the weights are damaged (a diverged "
                "or corrupted save) and were not loaded"
            )


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """``state`` (contiguous CPU tensors) as ``path``, which appears whole or not at all."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
