"""What identifies a prepared data folder's content, for ``--resume`` to tell the data a run was trained on
from any other: token counts, a SHA-256 over its token files (recorded by prepare in ``meta.json`` as
``content_sha256``; computed here for folders prepared before it was) and a SHA-256 of its tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gpt2lab.files import read_json
from gpt2lab.outputs import TOKENIZER_FILE, TRAIN_BIN, VAL_BIN


def data_fingerprint(path: Path, meta: dict) -> dict:
    counts = {k: meta.get(k) for k in ("tokenizer", "vocab_size", "tokens", "train_tokens", "val_tokens")}
    digest = meta.get("content_sha256") or combine_digests([(f.name, file_sha256(f)) for f in split_files(path, meta)])
    return counts | {"content_sha256": digest, "tokenizer_sha256": tokenizer_digest(path)}


def split_files(path: Path, meta: dict) -> list[Path]:
    """The token files of a prepared folder, in the order its content digest covers them: train, then val."""
    if "shards" not in meta:
        return [path / TRAIN_BIN, path / VAL_BIN]
    return [path / name for split in ("train", "val") for name in meta["shards"][split]]


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def combine_digests(named: list[tuple[str, str]]) -> str:
    """One SHA-256 over the (file name, file SHA-256) pairs of a folder's token files, in order."""
    return hashlib.sha256("".join(f"{name}:{digest}\n" for name, digest in named).encode()).hexdigest()


def tokenizer_digest(folder: Path) -> str:
    """SHA-256 of the tokenizer a folder carries (its name and, for characters, the vocabulary in order)."""
    file = folder / TOKENIZER_FILE
    stored = read_json(file) if file.is_file() else {"name": "gpt2"}
    return hashlib.sha256(f"{stored.get('name')}\n{stored.get('chars', '')}".encode()).hexdigest()
