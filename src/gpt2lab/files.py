"""Every file gpt2lab writes goes through :func:`atomic_file`: it appears whole, or not at all.

The content is written to a unique temporary file beside the target (``.NAME.XXXX.tmp``), flushed to
disk, given ordinary permissions and renamed over the target, which is atomic on POSIX within one
filesystem. If anything fails on the way (an exception, a full disk), the temporary file is removed
and the previous version of the target is untouched; an ``OSError`` becomes one error line.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpt2lab.errors import GPT2LabError, os_fault


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``."""
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise os_fault("write", path, err) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the user's files are made with their umask
        os.replace(tmp, path)
    except OSError as err:
        fault = os_fault("write", path, err)
        raise type(fault)(f"{fault}; the previous version is unchanged") from err
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temp_files(directory: str | os.PathLike, names: Iterable[str] | None = None) -> None:
    """Remove the temp files :func:`atomic_file` and :func:`scratch_file` left for ``names`` (every name when
    None) in ``directory`` when their process was killed mid-write (``kill -9`` runs no cleanup). Call it
    only while owning the folder (a run's lock, an output folder the guard let this command write)."""
    patterns = [".*.tmp"] if names is None else [f".{glob.escape(name)}.*.tmp" for name in names]
    for pattern in patterns:
        for stale in Path(directory).glob(pattern):
            stale.unlink(missing_ok=True)


def make_folder(path: str | os.PathLike) -> Path:
    """``mkdir -p``; an OS refusal (read-only, permissions, a file in the way) is one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if path.exists() and not path.is_dir():
            raise GPT2LabError(f"{path} is a file, not a folder") from None
        raise os_fault("create the folder", path, err) from err
    return path


@contextmanager
def scratch_file(directory: str | os.PathLike, name: str) -> Iterator[Path]:
    """A unique temporary file in ``directory`` for intermediate data, removed however the block ends."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    except OSError as err:
        raise os_fault("write", Path(directory) / name, err) from err
    os.close(fd)
    try:
        yield Path(tmp_name)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; anything else (missing, unreadable, not an object) is one error line."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GPT2LabError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GPT2LabError(f"cannot read {path}: {one_line(str(err))}") from err
    if not isinstance(value, dict):
        raise GPT2LabError(f"{path} does not hold a JSON object")
    return value


def inside(folder: str | os.PathLike, path: str | os.PathLike, what: str = "file") -> Path:
    """``path``, refused (one line) when it resolves outside ``folder`` (through ``..``, an absolute name or a
    symbolic link): a checkpoint folder, however it was obtained, may only make gpt2lab read its own files.
    The one exception is the Hugging Face cache's own layout: ``snapshots/REV/NAME`` links to ``blobs/``."""
    root, target = Path(folder).resolve(), Path(path).resolve()
    hub_blob = root.parent.name == "snapshots" and (root.parent.parent / "blobs") in target.parents
    if target != root and root not in target.parents and not hub_blob:
        raise GPT2LabError(
            f"{what} {path} resolves outside its folder {folder} (to {target}); refused: a checkpoint folder may "
            "only name files inside it"
        )
    return Path(path)


def one_line(text: str, limit: int = 160) -> str:
    """``text`` with its whitespace collapsed, cut to ``limit`` characters: for quoting causes in errors."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
