"""Every write fails, one point at a time: train (a resume), prepare (new and --overwrite) and export, with the
n-th write primitive raising ENOSPC, EROFS, EACCES or EEXIST in turn. Each run must end with one stderr line and
exit status 74 (an environment fault, told apart from bad input's 2), leave no temp file, and leave what was
there before whole: the run still resumes, the data still opens as a consistent whole (or is marked incomplete),
the source model is untouched. Then the same command without faults succeeds: nothing is stuck.

The write primitives are wrapped for paths under the test's folder only: builtins/io ``open`` in a writing mode,
``os.open`` with O_CREAT/O_WRONLY/O_RDWR, ``os.write``, ``os.ftruncate``, ``os.fsync``, ``os.replace``,
``os.mkdir`` and ``tempfile.mkstemp``. A dry run counts the points; then each point fails in turn."""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from gpt2lab.checkpoints.train_state import load_checkpoint
from gpt2lab.cli.main import main
from gpt2lab.data.fingerprint import combine_digests, file_sha256, split_files
from gpt2lab.data.tokens import TokenData
from gpt2lab.errors import EXIT_ENVIRONMENT
from gpt2lab.loading import load_model
from gpt2lab.train.run import read_metrics

ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EEXIST)
SETS = ["pos_encoding=learned", "window=full", "n_layer=1", "n_head=2", "n_embd=32", "model.block_size=16"]
SETS += ["block_size=16", "batch_size=2", "eval_iters=1", "eval_interval=1", "ckpt_interval=1", "log_interval=1"]


class Faults:
    """Counts the write primitives called on paths under ``root``; the ``fail_at``-th raises ``err``."""

    def __init__(self, root: Path, fail_at: int | None = None, err: int = errno.ENOSPC) -> None:
        self.root, self.fail_at, self.err, self.calls = str(root.resolve()), fail_at, err, 0
        self.where: list[str] = []

    quiet = False

    def point(self, path) -> None:
        if self.quiet or path is None or not os.path.abspath(os.fspath(path)).startswith(self.root):
            return
        self.calls += 1
        self.where.append(str(path))
        if self.calls == self.fail_at:
            raise OSError(self.err, os.strerror(self.err), os.fspath(path))


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


@contextmanager
def injected(faults: Faults):
    real = {
        "open": builtins.open, "os_open": os.open, "write": os.write, "ftruncate": os.ftruncate, "fsync": os.fsync,
        "replace": os.replace, "mkdir": os.mkdir, "mkstemp": tempfile.mkstemp,
    }  # fmt: skip

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, str | os.PathLike) and any(c in mode for c in "wax+"):
            faults.point(file)
        return real["open"](file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            faults.point(path)
        return real["os_open"](path, flags, *args, **kwargs)

    def by_fd(name):
        def call(fd, *args):
            faults.point(_fd_path(fd))
            return real[name](fd, *args)

        return call

    def replace(src, dst, *args, **kwargs):
        faults.point(dst)
        return real["replace"](src, dst, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if not os.path.isdir(path):  # mkdir of an existing folder writes nothing (Path.mkdir(exist_ok) asks)
            faults.point(path)
        return real["mkdir"](path, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        faults.point(dir)
        faults.quiet = True  # its own os.open retries another name on EEXIST: one point, not several
        try:
            return real["mkstemp"](*args, dir=dir, **kwargs)
        finally:
            faults.quiet = False

    patches = [
        (builtins, "open", open_), (io, "open", open_), (os, "open", os_open), (os, "write", by_fd("write")),
        (os, "ftruncate", by_fd("ftruncate")), (os, "fsync", by_fd("fsync")), (os, "replace", replace),
        (os, "mkdir", mkdir), (tempfile, "mkstemp", mkstemp),
    ]  # fmt: skip
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, fake in patches:
            setattr(module, name, fake)
        yield faults
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def run(args: list, faults: Faults, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with injected(faults):
        status = main([str(a) for a in args])
    return status, capsys.readouterr().err


def assert_fault_line(status: int, err: str, faults: Faults) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"(doc|step|it)/s", line)]
    where = f"fault at point {faults.fail_at} ({faults.where[-1] if faults.where else '?'}, {os.strerror(faults.err)})"
    assert "Traceback" not in err, f"{where}: {err}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{where}: {err}"
    assert status == EXIT_ENVIRONMENT, f"{where}: status {status}, {err}"


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def each_point(count: int) -> list[tuple[int, int]]:
    """Every point, each with the next errno in turn (all four kinds are met across the points)."""
    return [(point, ERRNOS[point % len(ERRNOS)]) for point in range(1, count + 1)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A character-level data folder and a run of 2 steps on it, made without faults."""
    root = tmp_path_factory.mktemp("base")
    (root / "t.txt").write_text("to be or not to be, that is the question " * 100)
    assert main(["prepare", str(root / "t.txt"), "--out", str(root / "data"), "--tokenizer", "char"]) == 0
    sets = [*SETS, f"data.dir={root / 'data'}", "max_iters=2"]
    assert main(["train", *[a for s in sets for a in ("--set", s)], "--out", str(root / "run")]) == 0
    return root


def train_args(base: Path, out: Path, max_iters: int) -> list:
    sets = [*SETS, f"data.dir={base / 'data'}", f"max_iters={max_iters}"]
    return ["train", *[a for s in sets for a in ("--set", s)], "--out", out, "--resume"]


def test_train_resume_survives_a_failed_write_at_every_point(base, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(base / "run", work)
    dry = Faults(tmp_path)
    assert run(train_args(base, work, 4), dry, capsys)[0] == 0
    assert dry.calls >= 10, dry.where  # the lock, metrics, config, tokenizer, checkpoints, export, plot
    for point, err in each_point(dry.calls):
        shutil.rmtree(work)
        shutil.copytree(base / "run", work)
        faults = Faults(tmp_path, point, err)
        status, stderr = run(train_args(base, work, 4), faults, capsys)
        assert_fault_line(status, stderr, faults)
        assert no_temp_files(work)
        step = load_checkpoint(work / "ckpt.pt")["step"]  # whole (its checksum holds), at 2 or later
        assert step >= 2 and load_model(work).config.n_embd == 32 and read_metrics(work)[0]["step"] == 0
        status, stderr = run(train_args(base, work, 4), Faults(tmp_path), capsys)
        assert status == 0, f"after a fault at point {point} ({faults.where[-1]}): {stderr}"  # resumes to the end
        assert load_checkpoint(work / "ckpt.pt")["step"] == 4


def _data_is_whole_or_unmarked(folder: Path) -> None:
    """A data folder after a failed prepare: it opens and its files match the content hash meta.json records,
    or it has no meta.json (incomplete: TokenData refuses it with one line)."""
    if not (folder / "meta.json").is_file():
        return
    data = TokenData.open(folder)
    digest = combine_digests([(f.name, file_sha256(f)) for f in split_files(folder, data.meta)])
    assert digest == data.meta["content_sha256"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_survives_a_failed_write_at_every_point(base, tmp_path, capsys, overwrite):
    out = tmp_path / "data"
    args = ["prepare", base / "t.txt", "--out", out, "--threads", "1"] + (["--overwrite"] if overwrite else [])

    def fresh() -> None:
        shutil.rmtree(out, ignore_errors=True)
        if overwrite:  # the previous state: data of another tokenizer
            assert main(["prepare", str(base / "t.txt"), "--out", str(out), "--tokenizer", "char"]) == 0

    fresh()
    dry = Faults(tmp_path)
    assert run(args, dry, capsys)[0] == 0
    for point, err in each_point(dry.calls):
        fresh()
        faults = Faults(tmp_path, point, err)
        status, stderr = run(args, faults, capsys)
        assert_fault_line(status, stderr, faults)
        assert not out.exists() or no_temp_files(out)
        if out.exists():
            _data_is_whole_or_unmarked(out)
        retry = [*args, "--overwrite"] if out.exists() and any(out.iterdir()) and not overwrite else args
        assert run(retry, Faults(tmp_path), capsys)[0] == 0
        _data_is_whole_or_unmarked(out)


def test_export_survives_a_failed_write_at_every_point(base, tmp_path, capsys):
    out = tmp_path / "hf"
    args = ["export", "--model", base / "run", "--out", out]
    source = {p.name: p.read_bytes() for p in (base / "run").iterdir() if p.is_file()}
    dry = Faults(tmp_path)
    assert run(args, dry, capsys)[0] == 0
    for point, err in each_point(dry.calls):
        shutil.rmtree(out)
        faults = Faults(tmp_path, point, err)
        status, stderr = run(args, faults, capsys)
        assert_fault_line(status, stderr, faults)
        assert not out.exists() or no_temp_files(out)
        assert {p.name: p.read_bytes() for p in (base / "run").iterdir() if p.is_file()} == source
        assert run([*args, "--overwrite"], Faults(tmp_path), capsys)[0] == 0  # nothing stuck
