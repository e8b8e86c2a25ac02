"""Which folders gpt2lab may write: one decision for every command that writes one.

:func:`guard_output` is asked before anything is written (train, prepare, export, convert, eval's
by-position files, study). A target may be written when it is new or empty; when it holds the same
kind of output, only with ``overwrite`` (or ``resume``, for the kinds that continue: a run, a sharded
prepare, a study). It is refused, whatever the flags, when it holds another kind of output (a run, a
data folder, a model, a study), files gpt2lab did not write, or when a live process holds its lock
(``.lock``, taken by :class:`gpt2lab.train.run.RunLock`). A refusal raises one
:class:`~gpt2lab.errors.GPT2LabError` line and writes nothing.

What a folder holds is told by file names only (no file is opened but the lock): each kind has marker
files, which say the folder is of that kind, and own files, which that kind writes and
:func:`clear_outputs` removes on ``--overwrite``. Hidden files (the lock, temp files) belong to no one.
"""

from __future__ import annotations

import fcntl
import fnmatch
import os
from pathlib import Path

from gpt2lab.errors import GPT2LabError

RUN, DATA, MODEL, STUDY, EVAL = "run", "data", "model", "study", "eval"
LOCK_FILE = ".lock"

# The names of the files gpt2lab writes: their one home. The modules that write them import them from here,
# since this module (the lowest layer) must tell every kind of folder apart without importing them.
TOKENIZER_FILE = "gpt2lab-tokenizer.json"  # gpt2lab.tokenizer's; written into runs, data and models
# a run (gpt2lab.train.run, gpt2lab.checkpoints.train_state)
CKPT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"  # the run's TrainConfig, for a reader (the checkpoint holds it too)
LOSS_PLOT_FILE = "loss.png"
RESULT_FILE = "result.json"  # a study's finished run: its measurements (gpt2lab.study.runs), in the run's folder
# the trackers' files and folders in a run (gpt2lab.train.tracking)
CSV_NAME = "metrics.csv"
WANDB_ID_FILE = "wandb_run_id"
TENSORBOARD_DIR, WANDB_DIR = "tensorboard", "wandb"
# a model (gpt2lab.checkpoints.names): Hugging Face's layout
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded safetensors
WEIGHT_SHARDS = "model-*.safetensors"
PICKLED_WEIGHTS_FILE = "pytorch_model.bin"
GENERATION_CONFIG_FILE = "generation_config.json"
# prepared data (gpt2lab.data.tokens, gpt2lab.data.shards)
META_FILE = "meta.json"  # a prepared data folder's metadata, written last: it marks the folder complete
MANIFEST = "manifest.json"  # a sharded folder's list of shards
TRAIN_BIN, VAL_BIN = "train.bin", "val.bin"
# evaluation by position (gpt2lab.eval.loss) and a study (gpt2lab.study)
EVAL_FILES = ("loss_by_position.csv", "loss_by_position.png")
SUITE_FILE, REPORT_FILE = "suite.json", "report.md"

_MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, WEIGHT_SHARDS)
_TRACKER_FILES = (CSV_NAME, WANDB_ID_FILE, TENSORBOARD_DIR, WANDB_DIR)
# kind -> (markers: any of them present says the folder is this kind, own: every file the kind writes)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    RUN: (
        (CKPT_NAME, METRICS_NAME, TRAIN_CONFIG_FILE),
        (
            CKPT_NAME,
            METRICS_NAME,
            TRAIN_CONFIG_FILE,
            LOSS_PLOT_FILE,
            RESULT_FILE,
            TOKENIZER_FILE,
            *_MODEL_FILES,
            *EVAL_FILES,
            *_TRACKER_FILES,
        ),
    ),  # fmt: skip
    STUDY: ((SUITE_FILE,), (SUITE_FILE, "runs", "data", "*.csv", "*.png", REPORT_FILE)),
    DATA: (
        (META_FILE, MANIFEST, TRAIN_BIN, VAL_BIN),
        (META_FILE, MANIFEST, TRAIN_BIN, VAL_BIN, "train_*.bin", "val_*.bin", TOKENIZER_FILE),
    ),
    MODEL: (
        (WEIGHTS_FILE, WEIGHTS_INDEX_FILE, PICKLED_WEIGHTS_FILE),
        (*_MODEL_FILES, TOKENIZER_FILE, GENERATION_CONFIG_FILE, *EVAL_FILES),
    ),  # fmt: skip
    EVAL: (EVAL_FILES, EVAL_FILES),
}
_ADVICE = {
    RUN: "continue it with --resume, start it again with --overwrite, or choose another --out",
    STUDY: "re-run the same suite to continue it, or choose another --out",
}
_ARTICLE = {RUN: "a run", DATA: "prepared data", MODEL: "a model", STUDY: "a study", EVAL: "evaluation outputs"}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def folder_kind(folder: str | os.PathLike) -> tuple[str | None, list[str]]:
    """(the kind of output ``folder`` holds or None, the names in it that kind did not write).

    Kinds are tried from the most specific (a run also holds a model) to the least; hidden names are
    left out. ``(None, names)`` with names is a folder of someone else's files."""
    names = sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))
    for kind, (markers, own) in KINDS.items():
        if any(_matches(name, markers) for name in names):
            return kind, [name for name in names if not _matches(name, own)]
    return None, names


def locked_by(folder: str | os.PathLike) -> str | None:
    """The pid recorded in ``folder/.lock`` while a live process holds it (``?`` if unrecorded), else None."""
    lock = Path(folder) / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None  # no lock file (or unreadable): no training holds the folder through it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)  # closing drops the shared lock this check took
    return None


def guard_output(path: str | os.PathLike, kind: str, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse (one line, nothing written) to write output ``kind`` into folder ``path`` unless it is new,
    empty, or of the same kind and ``overwrite`` or ``resume`` says to replace or continue it."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    folder = Path(path)
    if not folder.exists():
        if folder.is_symlink():
            raise GPT2LabError(f"{folder} is a dangling symbolic link; choose another output folder")
        return
    if not folder.is_dir():
        raise GPT2LabError(f"{folder} is a file, not a folder; choose another output folder")
    owner = locked_by(folder)
    if owner is not None:
        raise GPT2LabError(
            f"{folder} is in use by another training (pid {owner}); wait for it to end or choose another --out"
        )
    found, foreign = folder_kind(folder)
    if kind == EVAL:  # two named files beside a model, in a folder of one's own, or in the working folder
        return _guard_eval(folder, found, overwrite)
    if found is None and not foreign:
        return  # empty, or only hidden files
    if found is None:
        listed = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise GPT2LabError(f"{folder} holds files gpt2lab did not write ({listed}); choose a new or empty folder")
    mixed = [name for name in foreign if any(_matches(name, KINDS[k][0]) for k in KINDS if k != found)]
    if mixed:
        raise GPT2LabError(
            f"{folder} holds {_ARTICLE[found]} mixed with other outputs ({', '.join(mixed[:3])}); it is not "
            "written to: choose another output folder"
        )
    if found == kind:
        if resume or overwrite:
            return
        advice = _ADVICE.get(kind, "pass --overwrite to replace it, or choose another --out")
        raise GPT2LabError(f"{folder} already holds {_ARTICLE[kind]}: {advice}")
    raise GPT2LabError(
        f"{folder} holds {_ARTICLE[found]}, not {_ARTICLE[kind]}; it is never replaced by another kind of output "
        "(not even with --overwrite): choose another output folder"
    )


def _guard_eval(folder: Path, found: str | None, overwrite: bool) -> None:
    if found in (DATA, STUDY):
        raise GPT2LabError(f"{folder} holds {_ARTICLE[found]}; write evaluation outputs to another --out")
    if not overwrite and any(_matches(entry.name, EVAL_FILES) for entry in folder.iterdir()):
        raise GPT2LabError(f"{folder} already holds evaluation outputs: pass --overwrite to replace them")


def clear_outputs(path: str | os.PathLike, kind: str, keep: tuple[str, ...] = ()) -> None:
    """Remove the files output ``kind`` writes from ``path`` (``--overwrite``), but those named in ``keep``
    (just rewritten), and nothing else it holds. Folders the kind writes (a study's runs) are left."""
    folder = Path(path)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        own = not entry.name.startswith(".") and _matches(entry.name, KINDS[kind][1])
        if entry.is_file() and own and entry.name not in keep:
            entry.unlink()
