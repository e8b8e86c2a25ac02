"""A training run on disk: its checkpoint file, RNG states, metrics log, and models loaded from it.

A run folder holds ``ckpt.pt`` (everything an exact resume needs), ``metrics.jsonl`` (one JSON row per
logged step or evaluation) and, once the run has finished or stopped, the exported model
(``config.json`` + ``model.safetensors``). :func:`load_model` reads any of these, or anything
:meth:`GPT.from_pretrained` reads, so every ``--model`` argument accepts a run in progress.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab.checkpoints.safe_pickle import load_weights_only
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.files import atomic_file, remove_stale_temp_files, write_text
from gpt2lab.kernels.precision import parse_dtype
from gpt2lab.model import GPT
from gpt2lab.tokenizer import TOKENIZER_FILE, Tokenizer, check_model_vocab, load_tokenizer
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.tracking import CSV_NAME, TENSORBOARD_DIR, WANDB_ID_FILE

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
    return load_weights_only(data, str(path))


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
    """The rows of a run's ``metrics.jsonl``, in order. A torn last line (a crash or a full disk in the
    middle of a write) is left out; damage anywhere else is one error line."""
    path = Path(run_dir) / METRICS_NAME
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the row being written when the run stopped
            raise GPT2LabError(f"{path} is damaged at line {number} (not JSON)") from None
    return rows


def _json_line(row: dict[str, Any]) -> str:
    """One strict JSON line: a non-finite number (a diverged loss) is written as null, never as NaN."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def start_metrics(run_dir: str | Path, keep_until: int | None = None) -> None:
    """A fresh log, or (``keep_until``: a resumed run's step) the old one without the rows newer than the
    checkpoint (work a crash lost), so that the file reads as one uninterrupted run."""
    kept = []
    if keep_until is not None and (Path(run_dir) / METRICS_NAME).is_file():
        kept = [r for r in read_metrics(run_dir) if r["step"] <= keep_until]
    write_text(Path(run_dir) / METRICS_NAME, "".join(map(_json_line, kept)))


def append_metrics(run_dir: str | Path, row: dict[str, Any]) -> None:
    """Append one row. The log grows by a line per logged step, so it is appended to, not rewritten
    through a temporary file (that would cost the whole file per step); :func:`start_metrics` wrote it.
    A row cut short by a crash is a torn last line, which :func:`read_metrics` leaves out."""
    path = Path(run_dir) / METRICS_NAME
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(_json_line(row))
    except OSError as err:
        raise GPT2LabError(f"cannot append to {path}: {err.strerror or err}") from err


# ---------------------------------------------------------------------------------------- ownership


RUN_FILES = (
    CKPT_NAME, METRICS_NAME, "train_config.json", "config.json", "model.safetensors", "loss.png", TOKENIZER_FILE,
    CSV_NAME, WANDB_ID_FILE,
)  # fmt: skip
RUN_DIRS = (TENSORBOARD_DIR, "wandb")  # the trackers' folders (gpt2lab.train.tracking)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a training run."""
    return any((run_dir / name).exists() for name in RUN_FILES)


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, a run folder that is a file, or that holds a run which the
    new one would silently replace."""
    if run_dir.exists() and not run_dir.is_dir():
        raise GPT2LabError(f"--out {run_dir} is a file, not a run folder")
    if resume and overwrite:
        raise GPT2LabError("--resume continues a run and --overwrite starts it again: choose one")
    if not resume and not overwrite and holds_run(run_dir):
        raise GPT2LabError(
            f"{run_dir} already holds a run: continue it with --resume, start it again with --overwrite, "
            "or choose another --out"
        )


# What may differ between a run and its resumption: how long it runs, how often it reports, and where
# and how it computes. Anything else (data, model, batch, schedule, seed, precision) changes the result.
RESUMABLE_CHANGES = (
    "max_iters", "eval_interval", "eval_iters", "log_interval", "ckpt_interval",
    "out_dir", "device", "compile", "strategy", "skip_nonfinite", "hellaswag_interval", "hellaswag_file",
    "reference", "log_to",
)  # fmt: skip


def resume_checkpoint(cfg: TrainConfig, data_meta: dict, config: GPTConfig, allow_changes: bool) -> dict | None:
    """The run's checkpoint, refused when it holds another model, or was trained on other data or settings
    than the config describes (unless ``allow_changes``); None for a run killed before its first one."""
    run_dir = Path(cfg.out_dir)
    ckpt_path = run_dir / CKPT_NAME
    if not ckpt_path.is_file() and holds_run(run_dir):
        return None  # killed before its first checkpoint: nothing to lose, it starts from step 0
    if not ckpt_path.is_file():
        raise GPT2LabError(f"nothing to resume: {ckpt_path} does not exist")
    state = load_checkpoint(ckpt_path)
    saved, now = state["model_config"], config.to_dict()
    diff = [f"{k}: {saved.get(k)!r} vs {now.get(k)!r}" for k in now if saved.get(k) != now.get(k)]
    if diff:
        raise GPT2LabError(f"{run_dir} holds a run of a different model ({'; '.join(diff)} in checkpoint vs config)")
    saved_cfg, now_cfg = state.get("train_config", {}), cfg.to_dict()
    changes = [
        f"{k} {saved_cfg[k]!r} -> {now_cfg[k]!r}"
        for k in now_cfg
        if k in saved_cfg and k not in RESUMABLE_CHANGES and saved_cfg[k] != now_cfg[k]
    ]
    if "data" in state and state["data"] != data_fingerprint(data_meta):
        changes.append(f"the data in {cfg.data_dir} ({state['data']['tokens']:,} -> {data_meta['tokens']:,} tokens)")
    if changes and not allow_changes:
        raise GPT2LabError(
            f"--resume would not continue the run in {run_dir} as it was: {'; '.join(changes)}; "
            "undo the change, or pass --allow-changes to resume with it anyway"
        )
    return state


def data_fingerprint(data_meta: dict) -> dict:
    """What identifies a prepared dataset's content (from its meta.json): its tokenizer and token counts."""
    return {k: data_meta.get(k) for k in ("tokenizer", "vocab_size", "tokens", "train_tokens", "val_tokens")}


def clear_run(run_dir: Path) -> None:
    """Remove a run's own files (``--overwrite``), nothing else the folder holds."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


class RunLock:
    """One process at a time owns a run folder: an exclusive ``flock`` on ``run_dir/.lock``.

    The operating system drops the lock when its process ends, however it ends (``kill -9`` included),
    so a crashed run never leaves the folder locked. The file records the owner's pid for the message.
    The new owner removes the temp files a killed predecessor left mid-write.
    """

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self.fd, 32).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise GPT2LabError(
                f"{run_dir} is in use by another training (pid {owner}); wait for it to end or choose another --out"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        remove_stale_temp_files(run_dir, RUN_FILES)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# ---------------------------------------------------------------------------------------- models


def _model_from_checkpoint(path: Path) -> GPT:
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def _exported_is_newest(run_dir: Path) -> bool:
    """Whether the run's exported model is at least as new as its checkpoint. A run exports after its
    last checkpoint; a checkpoint written later (the run was resumed, then killed) holds newer weights."""
    model = run_dir / "model.safetensors"
    if not (run_dir / "config.json").is_file() or not model.is_file():
        return False
    return model.stat().st_mtime_ns >= (run_dir / CKPT_NAME).stat().st_mtime_ns


def load_model(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> GPT:
    """A training checkpoint file, a run folder (the newer of its exported model and its checkpoint), or anything
    :meth:`GPT.from_pretrained` reads (gpt2lab / hub-layout folders, hub ids, TF checkpoints); cast to
    ``dtype`` (a ``torch.dtype`` or a name such as ``"bf16"``) and moved to ``device`` when given."""
    p = Path(path)
    if p.is_dir() and _is_checkpoint(p / CKPT_NAME) and not _exported_is_newest(p):
        p = p / CKPT_NAME
    if not _is_checkpoint(p):
        return GPT.from_pretrained(path, dtype=dtype, device=device)
    model = _model_from_checkpoint(p)
    dtype = parse_dtype(dtype)
    return model.to(device=device, dtype=dtype) if dtype is not None or device is not None else model


def load_model_and_tokenizer(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> tuple[GPT, Tokenizer]:
    """:func:`load_model` and the tokenizer stored beside it (GPT-2's BPE where none is), checked to fit.
    ``dtype="int8"`` quantizes the fp32 weights after loading (:meth:`GPT.quantize`)."""
    if dtype == "int8":
        model = load_model(path, device=device).quantize("int8")
    else:
        model = load_model(path, dtype=dtype, device=device)
    tokenizer = load_tokenizer(path)
    check_model_vocab(tokenizer, model.config.vocab_size, path)
    return model, tokenizer
