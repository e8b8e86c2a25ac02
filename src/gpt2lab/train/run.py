"""A training run on disk: its files, RNG states, metrics log, lock, and the checks before a resume.

A run folder holds ``ckpt.pt`` (everything an exact resume needs, written and read by
:mod:`gpt2lab.checkpoints.train_state`), ``metrics.jsonl`` (one JSON row per logged step or evaluation)
and, once the run has finished or stopped, the exported model (``config.json`` + ``model.safetensors``).
:func:`gpt2lab.loading.load_model` loads a model from any of these.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab.errors import GPT2LabError, os_fault
from gpt2lab.files import make_folder, remove_stale_temp_files, write_text
from gpt2lab.outputs import (
    CKPT_NAME,
    CONFIG_FILE,
    CSV_NAME,
    LOSS_PLOT_FILE,
    METRICS_NAME,
    RUN,
    TENSORBOARD_DIR,
    TOKENIZER_FILE,
    TRAIN_CONFIG_FILE,
    WANDB_DIR,
    WANDB_ID_FILE,
    WEIGHTS_FILE,
    clear_outputs,
    guard_output,
)

# ---------------------------------------------------------------------------------------- RNG states


def capture_rng(data_state: torch.Tensor) -> dict:
    """Every RNG a run draws from (torch, CUDA, numpy, Python) and ``data_state``, the batch sampler's
    generator state as of the batches used (:meth:`gpt2lab.data.loader.BatchLoader.generator_state`: the
    loader draws ahead, so the generator itself may already be past the next step's batch)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's state holds an ndarray, which weights_only refuses: store it as a tensor
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "rest": list(np_state[2:])},
        "python": random.getstate(),
        "data": data_state,
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
        raise os_fault("append to", path, err) from err


# ---------------------------------------------------------------------------------------- ownership


RUN_FILES = (
    CKPT_NAME, METRICS_NAME, TRAIN_CONFIG_FILE, CONFIG_FILE, WEIGHTS_FILE, LOSS_PLOT_FILE, TOKENIZER_FILE,
    CSV_NAME, WANDB_ID_FILE,
)  # fmt: skip
RUN_DIRS = (TENSORBOARD_DIR, WANDB_DIR)  # the trackers' folders (gpt2lab.train.tracking)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a training run."""
    return run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_FILES)


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, a run folder that :func:`gpt2lab.outputs.guard_output` refuses:
    a file, another kind of output, a live training's folder, or a run the new one would silently replace."""
    if resume and overwrite:
        raise GPT2LabError("--resume continues a run and --overwrite starts it again: choose one")
    guard_output(run_dir, RUN, overwrite=overwrite, resume=resume)


def clear_run(run_dir: Path) -> None:
    """Remove a run's own files (``--overwrite``), nothing else the folder holds."""
    clear_outputs(run_dir, RUN)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


class RunLock:
    """One process at a time owns a run folder: an exclusive ``flock`` on ``run_dir/.lock``.

    The operating system drops the lock when its process ends, however it ends (``kill -9`` included),
    so a crashed run never leaves the folder locked. The file records the owner's pid for the message.
    The new owner removes the temp files a killed predecessor left mid-write.
    """

    def __init__(self, run_dir: Path) -> None:
        make_folder(run_dir)
        try:
            self.fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise os_fault("lock", run_dir / ".lock", err) from err
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self.fd, 32).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise GPT2LabError(
                f"{run_dir} is in use by another training (pid {owner}); wait for it to end or choose another --out"
            ) from None
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, str(os.getpid()).encode())
            remove_stale_temp_files(run_dir, RUN_FILES)
        except OSError as err:  # the lock must not outlive a failed start (a library caller goes on running)
            self.release()
            raise os_fault("write", run_dir / ".lock", err) from err

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
