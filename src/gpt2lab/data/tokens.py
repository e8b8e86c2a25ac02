"""Token datasets: text → token ids in ``train.bin`` / ``val.bin`` (uint16 memmaps) + ``meta.json``, and the
tokenizer beside them (``gpt2lab-tokenizer.json``).

The tokenizer is GPT-2's BPE or characters (the sorted set of the corpus's characters). With the BPE,
each source document (a file, or one topic of the embedded corpus) is tokenized on its own and ends
with ``<|endoftext|>``, so the model learns where documents stop; characters have no such token, and
documents simply follow one another. The validation split is the *tail of the token stream* (the
last ``val_fraction`` of the tokens), which works the same way for a single file and for many documents.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt2lab.data.fingerprint import combine_digests, data_fingerprint
from gpt2lab.errors import GPT2LabError, check_number, closest_hint, is_int
from gpt2lab.files import atomic_file, make_folder, read_json, remove_stale_temp_files, scratch_file, write_json
from gpt2lab.outputs import DATA, META_FILE, TOKENIZER_FILE, TRAIN_BIN, VAL_BIN, clear_outputs, guard_output
from gpt2lab.tokenizer import (
    TOKENIZERS,
    Tokenizer,
    check_tokenizer_name,
    load_tokenizer,
    make_tokenizer,
    save_tokenizer,
    token_byte_lengths,
)

DTYPE = np.uint16  # GPT-2's 50257 ids fit in 16 bits: half the disk and memory of int32
SHAKESPEARE_FILE = "tinyshakespeare.txt.gz"  # package data (src/gpt2lab/corpora/README.md says where it is from)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")


# ---------------------------------------------------------------------------------------- sources


def _pydoc_documents() -> Iterator[tuple[str, str]]:
    """The Python documentation topics shipped with CPython (``pydoc_data``): ~465 KB, no network."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


def _shakespeare_documents() -> Iterator[tuple[str, str]]:
    """Tiny Shakespeare (char-rnn's corpus, 1.1 MB of public-domain plays), shipped gzipped with gpt2lab."""
    yield "shakespeare", shakespeare_text()


def shakespeare_text() -> str:
    return gzip.decompress((resources.files("gpt2lab") / "corpora" / SHAKESPEARE_FILE).read_bytes()).decode("utf-8")


NAMED_DATASETS = {"pydoc": _pydoc_documents, "shakespeare": _shakespeare_documents}


def resolve_sources(sources: list[str | Path]) -> list[tuple[str, str | Path]]:
    """Each source as (kind, name or path): a named dataset, a folder or a file. Decided before anything
    is written, so that an output folder created under a dataset's name (``prepare pydoc --out pydoc``)
    cannot be taken for the source."""
    resolved = []
    for source in sources:
        path = Path(source)
        if not path.exists() and str(source) in NAMED_DATASETS:
            resolved.append(("dataset", str(source)))
        elif path.is_dir() or path.is_file():
            resolved.append(("folder" if path.is_dir() else "file", path))
        else:
            hint = closest_hint(str(source), NAMED_DATASETS)
            raise GPT2LabError(
                f"no such file, folder or dataset: {source}{hint}; named datasets: {', '.join(NAMED_DATASETS)}"
            )
    return resolved


def iter_documents(sources: list[str | Path] | list[tuple[str, str | Path]]) -> Iterator[tuple[str, str]]:
    """(name, text) for each document: named datasets, text files, or every text file in a folder.
    ``sources`` are names and paths, or what :func:`resolve_sources` made of them."""
    resolved = sources if sources and isinstance(sources[0], tuple) else resolve_sources(sources)
    for kind, source in resolved:
        if kind == "dataset":
            yield from NAMED_DATASETS[source]()
        elif kind == "folder":
            files = folder_files(source, TEXT_SUFFIXES)
            if not files:
                raise GPT2LabError(f"no text files ({', '.join(TEXT_SUFFIXES)}) in folder {source}")
            for f in files:
                yield str(f), read_text_file(f)
        else:
            yield str(source), read_text_file(source)


def folder_files(folder: Path, readable: tuple[str, ...]) -> list[Path]:
    """Every file under ``folder``, in a fixed order; a file of another kind than ``readable`` (suffixes) is
    refused by name, so that no file of a source folder is ever left out unnoticed."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    bad = [str(p.relative_to(folder)) for p in files if p.suffix.lower() not in readable]
    if bad:
        listed = f"{', '.join(bad[:3])}{' …' if len(bad) > 3 else ''} (it reads {', '.join(readable)})"
        raise GPT2LabError(f"folder {folder} holds files prepare cannot read: {listed}; move them out, or name files")
    return files


def read_text_file(path: Path) -> str:
    """The file's text; a file that is not UTF-8 text (a binary file, another encoding) is refused."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise GPT2LabError(f"cannot read {path}: {err.strerror or err}") from err
    if b"\0" in data:
        raise GPT2LabError(f"{path} is not a text file (it holds NUL bytes); prepare reads UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GPT2LabError(
            f"{path} is not UTF-8 text (invalid byte at offset {err.start}); convert it first, e.g. iconv -t utf-8"
        ) from None


# ---------------------------------------------------------------------------------------- prepare


def prepare(
    sources: list[str | Path] | str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    num_threads: int | None = None,
    chunk_docs: int = 64,
    tokenizer: str = "gpt2",
    overwrite: bool = False,
) -> dict:
    """Tokenize ``sources`` into ``out_dir`` with ``tokenizer`` (``"gpt2"`` or ``"char"``); returns ``meta.json``'s
    content. The tokenizer is written beside it. Prepared data is replaced only with ``overwrite``."""
    if isinstance(sources, str | Path):
        sources = [sources]
    check_tokenizer_name(tokenizer)
    check_number("val fraction", val_fraction, low=0.0, high=1.0, low_open=True)
    if num_threads is not None and (not is_int(num_threads) or num_threads < 1):
        raise GPT2LabError(f"threads must be an integer >= 1, got {num_threads!r}")
    resolved = resolve_sources(sources)
    out = Path(out_dir)
    guard_output(out, DATA, overwrite=overwrite)
    created = not out.exists()
    make_folder(out)
    remove_stale_temp_files(out)  # a killed prepare's token stream and half-written splits
    try:
        with scratch_file(out, "tokens") as stream_path:
            threads = num_threads or os.cpu_count() or 1
            enc, documents = _choose_tokenizer(tokenizer, iter_documents(resolved))
            n_docs, n_tokens = _tokenize(documents, enc, stream_path, threads, chunk_docs)
            if n_docs == 0:
                raise GPT2LabError(f"no text found in {', '.join(map(str, sources))}: every document is empty")
            # the old data is no longer whole once one split is replaced: unmarked until the new one is
            (out / "meta.json").unlink(missing_ok=True)
            meta = _write_splits(stream_path, out, n_tokens, val_fraction, enc)
        meta.update(documents=n_docs, sources=[str(s) for s in sources])
        clear_outputs(out, DATA, keep=(TRAIN_BIN, VAL_BIN, META_FILE, TOKENIZER_FILE))  # old shards, manifest
        save_tokenizer(enc, out)  # before meta.json, which marks the folder complete
        write_json(out / META_FILE, meta)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed first prepare leaves no empty folder behind
        raise
    return meta


def _choose_tokenizer(name: str, documents: Iterator[tuple[str, str]]) -> tuple[Tokenizer, Iterator[tuple[str, str]]]:
    """The tokenizer ``name`` and the documents to encode with it. A character vocabulary needs the whole
    corpus first, so its documents are read into memory (character-level corpora are small) and handed on."""
    if name != "char":
        return make_tokenizer(name), documents
    docs = list(documents)
    enc = make_tokenizer(name, (text for _, text in docs if text.strip()))
    if enc.n_vocab > np.iinfo(DTYPE).max + 1:
        raise GPT2LabError(f"the corpus has {enc.n_vocab:,} distinct characters, more than 16-bit token ids hold")
    return enc, iter(docs)


def _tokenize(
    documents: Iterator[tuple[str, str]], enc: Tokenizer, stream: Path, threads: int, chunk_docs: int
) -> tuple[int, int]:
    """Append every non-empty document's tokens (+ ``<|endoftext|>`` if the tokenizer has it) to ``stream``;
    (documents, tokens).

    Documents are encoded in chunks with tiktoken's multithreaded ``encode_ordinary_batch`` (the BPE
    runs in Rust, so threads use every core) and streamed to disk: memory is bounded by one chunk.
    """
    first = next(documents, None)  # fail on a bad source (or a download) before drawing a progress bar
    n_docs = n_tokens = 0
    texts = iter(text for _, text in itertools.chain([first] if first else [], documents) if text.strip())
    with open(stream, "wb") as f, tqdm(desc="tokenizing", unit="doc") as bar:
        while batch := list(itertools.islice(texts, chunk_docs)):
            for ids in enc.encode_ordinary_batch(batch, num_threads=threads):
                if enc.eot_token is not None:
                    ids.append(enc.eot_token)
                f.write(np.asarray(ids, dtype=DTYPE).tobytes())
                n_tokens += len(ids)
            n_docs += len(batch)
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{n_tokens:,}")
    return n_docs, n_tokens


def _write_splits(stream_path: Path, out: Path, n_tokens: int, val_fraction: float, enc: Tokenizer) -> dict:
    """``train.bin`` and ``val.bin`` (the tail of the token stream) from the token stream; their metadata."""
    tokens = np.memmap(stream_path, dtype=DTYPE, mode="r")
    n_val = max(1, int(round(n_tokens * val_fraction)))
    n_train = n_tokens - n_val
    byte_len = token_byte_lengths(enc)
    digests = []
    for name, part in (("train", tokens[:n_train]), ("val", tokens[n_train:])):
        with atomic_file(out / f"{name}.bin") as tmp:
            part.tofile(tmp)
        digests.append((f"{name}.bin", hashlib.sha256(part).hexdigest()))
    meta = {
        "tokenizer": enc.name,
        "vocab_size": enc.n_vocab,
        "dtype": np.dtype(DTYPE).name,
        "tokens": n_tokens,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "train_bytes": int(byte_len[tokens[:n_train]].sum()),
        "val_bytes": int(byte_len[tokens[n_train:]].sum()),
        "val_fraction": val_fraction,
        "split": "tail of the token stream: val.bin holds the last val_fraction of the tokens",
        "content_sha256": combine_digests(digests),
    }
    del tokens
    return meta


# ---------------------------------------------------------------------------------------- loading


@dataclass
class TokenData:
    """A prepared folder: the two splits as read-only memmaps and the metadata."""

    path: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the folder was prepared with (``gpt2lab-tokenizer.json``; GPT-2's in older folders)."""
        tok = load_tokenizer(self.path)
        if (tok.name, tok.n_vocab) != (self.meta["tokenizer"], self.vocab_size):
            raise GPT2LabError(
                f"{self.path}: meta.json says {self.meta['tokenizer']} with {self.vocab_size} tokens but the "
                f"tokenizer beside it has {tok.name} with {tok.n_vocab}; prepare it again"
            )
        return tok

    @functools.cached_property
    def fingerprint(self) -> dict:
        """What identifies the folder's content (:func:`gpt2lab.data.fingerprint.data_fingerprint`)."""
        return data_fingerprint(self.path, self.meta)

    @classmethod
    def open(cls, path: str | Path, vocab_size: int | None = None) -> TokenData:
        """Open and check a prepared folder; ``vocab_size`` is the model's, to catch foreign token ids."""
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise GPT2LabError(
                f"no prepared data in {path} (missing meta.json); run: gpt2lab prepare SOURCE --out {path}"
            )
        meta = _read_meta(path)
        if vocab_size is not None and meta["vocab_size"] > vocab_size:
            raise GPT2LabError(
                f"{path} has a vocabulary of {meta['vocab_size']} tokens but the model has {vocab_size}; "
                "it was made with another tokenizer"
            )
        splits = {name: _open_named_split(path, meta, name) for name in ("train", "val")}
        for name, tokens in splits.items():
            top = max_token_id(tokens)
            if top >= meta["vocab_size"]:
                raise GPT2LabError(
                    f"{path}/{name}.bin has token id {top} >= vocab size {meta['vocab_size']}: another tokenizer?"
                )
        data = cls(path, meta, splits["train"], splits["val"])
        if meta["tokenizer"] != "gpt2":
            data.tokenizer  # noqa: B018 (a character vocabulary is cheap to read: check it now, not mid-run)
        return data

    def check_fits(self, seq_len: int) -> None:
        """Each split must hold at least one sequence of ``seq_len`` inputs + 1 target."""
        for name in ("train", "val"):
            n = len(getattr(self, name))
            if n < seq_len + 1:
                raise GPT2LabError(
                    f"the {name} split of {self.path} has {n} tokens, fewer than one sequence of "
                    f"seq_len {seq_len} + 1; use a smaller seq_len or more data"
                )


def _read_meta(path: Path) -> dict:
    meta = read_json(path / META_FILE)
    if meta.get("tokenizer") not in TOKENIZERS:
        raise GPT2LabError(
            f"{path} was made with tokenizer {meta.get('tokenizer')!r}, not one of {', '.join(TOKENIZERS)}; "
            "prepare it again"
        )
    if not is_int(meta.get("vocab_size")) or meta["vocab_size"] < 1 or meta.get("dtype") not in ("uint16", "uint32"):
        raise GPT2LabError(f"{path}/meta.json is damaged (vocab_size or dtype missing or wrong); prepare it again")
    return meta


def _open_named_split(path: Path, meta: dict, name: str) -> np.ndarray | ShardedTokens:
    """``NAME.bin``, or the split's shards as one array when the folder was prepared in shards."""
    if "shards" not in meta:
        return _open_split(path / f"{name}.bin", meta["dtype"])
    files = meta["shards"].get(name) if isinstance(meta["shards"], dict) else None
    if not files:
        raise GPT2LabError(f"{path}/meta.json names no {name} shards; prepare it again")
    tokens = ShardedTokens([_open_split(path / f, meta["dtype"]) for f in files])
    if len(tokens) != meta.get(f"{name}_tokens"):
        raise GPT2LabError(
            f"the {name} shards of {path} hold {len(tokens):,} tokens, not the {meta.get(f'{name}_tokens')} "
            "meta.json records: damaged; prepare it again"
        )
    return tokens


def _open_split(file: Path, dtype: str) -> np.ndarray:
    if not file.is_file() or file.stat().st_size == 0:
        raise GPT2LabError(f"{file} is missing or empty; run: gpt2lab prepare SOURCE --out {file.parent}")
    itemsize = np.dtype(dtype).itemsize
    if file.stat().st_size % itemsize:
        raise GPT2LabError(f"{file} is truncated: {file.stat().st_size} bytes is not a whole number of {dtype} tokens")
    return np.memmap(file, dtype=dtype, mode="r")


def max_token_id(tokens: np.ndarray, chunk: int = 1 << 26) -> int:
    """The largest id in ``tokens``, read in chunks: every id is checked, memory stays one chunk."""
    return max(int(tokens[start : start + chunk].max()) for start in range(0, len(tokens), chunk))


def sample_offsets(n_tokens: int, seq_len: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random start positions of (seq_len + 1)-token windows, drawn from ``generator``."""
    return torch.randint(n_tokens - seq_len, (count,), generator=generator)


def gather_batch(tokens: np.ndarray, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (B, seq_len) at ``offsets``."""
    rows = np.stack([tokens[o : o + seq_len + 1] for o in offsets.tolist()]).astype(np.int64)
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


class ShardedTokens:
    """A split stored as several token shards, read as one array: ``len`` and slicing, shard boundaries hidden.

    Each shard is a read-only memmap, so opening a 10B-token split costs no memory; a slice that crosses
    a boundary joins its pieces. :class:`TokenData`'s samplers and checks only slice, so shards read as one file.
    """

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts  # (n_shards,) read-only memmaps, in order
        self.dtype = parts[0].dtype
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # (n_shards + 1,) first index of each

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("sharded tokens are read by contiguous slices")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            base = int(self.starts[first])
            end = min(stop, int(self.starts[first + 1]))
            pieces.append(self.parts[first][start - base : end - base])
            start, first = end, first + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)
