"""A training run's checkpoint file, ``ckpt.pt``: written atomically behind a SHA-256 header, read back
only after the checksum holds, with tensors only (``weights_only``).

The file holds everything an exact resume needs (model, optimiser, RNG states, step, both configs);
:func:`read_run_weights` takes out what a model needs, so a run in progress loads as a model. Nothing
here imports the model: :mod:`gpt2lab.loading` builds one from what this returns.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from gpt2lab.checkpoints.safe_pickle import load_weights_only
from gpt2lab.checkpoints.tensor_files import check_finite
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.files import atomic_file
from gpt2lab.outputs import CKPT_NAME, CONFIG_FILE, WEIGHTS_FILE

CKPT_MAGIC = b"GPT2LAB-TRAIN-CKPT v1 sha256="
_DIGEST_PLACEHOLDER = b"0" * hashlib.sha256().digest_size * 2  # hex digits


class _HashingWriter:
    """What ``torch.save`` writes to: each chunk goes to the file and into the SHA-256, so the payload is
    never held in memory a second time."""

    def __init__(self, file) -> None:
        self.file, self.sha = file, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Written through :func:`atomic_file`: a crash mid-write (even ``kill -9``) leaves the previous
    checkpoint intact. The header line carries a SHA-256 of the payload that follows it."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(CKPT_MAGIC + _DIGEST_PLACEHOLDER + b"\n")  # the digest is known only at the end
        writer = _HashingWriter(f)
        torch.save(payload, writer)
        f.seek(len(CKPT_MAGIC))
        f.write(writer.sha.hexdigest().encode())


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a file that starts like a gpt2lab training checkpoint."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(CKPT_MAGIC)) == CKPT_MAGIC


def load_checkpoint(path: str | Path) -> dict:
    """Verify the checksum before unpickling anything, then load tensors only (``weights_only``)."""
    path = Path(path)
    with open(path, "rb") as f:
        header = f.readline().removesuffix(b"\n")
        data = f.read()
    if not header.startswith(CKPT_MAGIC):
        raise GPT2LabError(f"{path} is not a gpt2lab training checkpoint (bad header); it was not loaded")
    if hashlib.sha256(data).hexdigest().encode() != header[len(CKPT_MAGIC) :]:
        raise GPT2LabError(f"checkpoint {path} is corrupted (checksum mismatch); it was not loaded")
    return load_weights_only(data, str(path))


def _exported_is_newest(run_dir: Path) -> bool:
    """Whether the run's exported model is at least as new as its checkpoint. A run exports after its
    last checkpoint; a checkpoint written later (the run was resumed, then killed) holds newer weights."""
    weights = run_dir / WEIGHTS_FILE
    if not (run_dir / CONFIG_FILE).is_file() or not weights.is_file():
        return False
    return weights.stat().st_mtime_ns >= (run_dir / CKPT_NAME).stat().st_mtime_ns


def run_checkpoint(path: str | Path) -> Path | None:
    """The training checkpoint that holds the newest weights of ``path`` (a ``ckpt.pt`` file, or a run
    folder whose checkpoint is newer than its exported model), or None: then ``path`` is a saved model."""
    p = Path(path)
    if p.is_dir() and is_checkpoint(p / CKPT_NAME) and not _exported_is_newest(p):
        p = p / CKPT_NAME
    return p if is_checkpoint(p) else None


def read_run_weights(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The model config and state dict (``lm_head.weight`` included) held by a training checkpoint; weights
    holding NaN or infinity are refused, naming the tensor."""
    ckpt = load_checkpoint(path)
    check_finite(ckpt["model"], path)
    return GPTConfig.from_dict(ckpt["model_config"]), ckpt["model"]
