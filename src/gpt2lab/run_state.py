"""A training run on disk: its checkpoint file, RNG states, metrics log, and models loaded from it.

A run folder holds ``ckpt.pt`` (everything an exact resume needs), ``metrics.jsonl`` (one JSON row per
logged step or evaluation) and, once the run has finished or stopped, the exported model
(``config.json`` + ``model.safetensors``). :func:`load_model` reads any of these, or anything
:meth:`GPT.from_pretrained` reads, so every ``--model`` argument accepts a run in progress.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import GPT2LabError, GPTConfig
from .files import atomic_file, write_text
from .model import GPT
from .precision import parse_dtype

CKPT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
CKPT_MAGIC = b"GPT2LAB-TRAIN-CKPT v1 sha256="
_DIGEST_PLACEHOLDER = b"0" * hashlib.sha256().digest_size * 2  # hex digits


# ---------------------------------------------------------------------------------------- checkpoint file


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


def _is_checkpoint(path: Path) -> bool:
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
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------- RNG states


def capture_rng(data_gen: torch.Generator) -> dict:
    """Every RNG a run draws from (torch, CUDA, numpy, Python) and the batch sampler's own generator."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's state holds an ndarray, which weights_only refuses: store it as a tensor
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "rest": list(np_state[2:])},
        "python": random.getstate(),
        "data": data_gen.get_state(),
    }


def restore_rng(state: dict, data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), *state["numpy"]["rest"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    data_gen.set_state(state["data"])


# ---------------------------------------------------------------------------------------- metrics log


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``, in order."""
    text = (Path(run_dir) / METRICS_NAME).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def start_metrics(run_dir: str | Path, keep_until: int | None = None) -> None:
    """A fresh log, or (``keep_until``: a resumed run's step) the old one without the rows newer than the
    checkpoint (work a crash lost), so that the file reads as one uninterrupted run."""
    kept = []
    if keep_until is not None and (Path(run_dir) / METRICS_NAME).is_file():
        kept = [r for r in read_metrics(run_dir) if r["step"] <= keep_until]
    write_text(Path(run_dir) / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in kept))


def append_metrics(run_dir: str | Path, row: dict[str, Any]) -> None:
    """Append one row. The log grows by a line per logged step, so it is appended to, not rewritten
    through a temporary file (that would cost the whole file per step); :func:`start_metrics` wrote it."""
    with open(Path(run_dir) / METRICS_NAME, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------- models


def _model_from_checkpoint(path: Path) -> GPT:
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def load_model(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> GPT:
    """A training checkpoint file, a run folder (its exported model, else its checkpoint), or anything
    :meth:`GPT.from_pretrained` reads (gpt2lab / hub-layout folders, hub ids, TF checkpoints); cast to
    ``dtype`` (a ``torch.dtype`` or a name such as ``"bf16"``) and moved to ``device`` when given."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file() and _is_checkpoint(p / CKPT_NAME):
        p = p / CKPT_NAME
    if not _is_checkpoint(p):
        return GPT.from_pretrained(path, dtype=dtype, device=device)
    model = _model_from_checkpoint(p)
    dtype = parse_dtype(dtype)
    return model.to(device=device, dtype=dtype) if dtype is not None or device is not None else model
