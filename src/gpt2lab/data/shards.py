"""prepare at scale: documents -> token shards + ``manifest.json``, on every core, resumable after a kill.

Documents are read in a fixed order (:mod:`gpt2lab.data.sources`), tokenized in chunks by a pool of
processes (at most two chunks per process in flight, so memory stays flat however large the corpus),
and written in order. Shards end at document boundaries: the validation shard holds the first
documents (at least ``val_tokens`` tokens; a stream's length is unknown in advance, so its tail cannot
be used as ``prepare`` does for small corpora), then training shards of at least ``shard_tokens``.

Each shard is written to a temporary file and renamed when complete; the manifest, rewritten
atomically after every shard, records the finished shards and how many documents they hold. A
prepare killed at any moment and started again with the same command skips those documents (read,
not tokenized) and continues with the next shard; ``meta.json`` appears when the corpus is done.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2lab.data.fingerprint import combine_digests, file_sha256
from gpt2lab.data.sources import SourceOptions, count_documents, iter_texts
from gpt2lab.data.tokens import DTYPE
from gpt2lab.errors import GPT2LabError, is_int
from gpt2lab.files import atomic_file, make_folder, read_json, remove_stale_temp_files, write_json
from gpt2lab.outputs import DATA, MANIFEST, META_FILE, clear_outputs, guard_output
from gpt2lab.tokenizer import GPT2_TOKENIZER, load_tokenizer, token_byte_lengths

FORMAT = "gpt2lab-shards"
SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
VAL_TOKENS = 10_000_000


# ---------------------------------------------------------------------------------------- tokenizing


def encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, tokens per document, UTF-8 bytes per document); each document ends with <|endoftext|>."""
    enc = load_tokenizer()
    texts, n_bytes = zip(*map(_utf8, texts), strict=True)
    docs = [enc.encode_ordinary(text) + [enc.eot_token] for text in texts]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=DTYPE, count=int(lengths.sum()))
    return tokens, lengths, np.array(n_bytes, dtype=np.int64)


def _utf8(text: str) -> tuple[str, int]:
    """The text and its UTF-8 length; a lone surrogate (a JSON "\\ud800" escape, not UTF-8 text) becomes "?"."""
    try:
        return text, len(text.encode("utf-8"))
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
        return text, len(text.encode("utf-8"))


def worker_pool(workers: int):
    """A pool of ``workers`` tokenizing processes (none for one worker). Made before any progress bar,
    so no thread exists when the workers are forked."""
    if workers == 1:
        return nullcontext(None)
    load_tokenizer()  # built once here; forked workers inherit it
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return context.Pool(workers, initializer=_ignore_interrupts)


def _ignore_interrupts() -> None:
    """Ctrl-C reaches every process of the terminal's group: the main process stops the prepare (and the
    pool) with one line, so the workers must not each print a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def encoded_chunks(texts: Iterator[str], pool, workers: int, chunk_docs: int) -> Iterator[tuple]:
    """Chunks of ``chunk_docs`` documents encoded by ``pool``'s processes (or here), in order, with at most
    two chunks per process in flight (``Pool.imap`` would read the whole corpus ahead into memory)."""
    chunks = iter(lambda: list(itertools.islice(texts, chunk_docs)), [])
    if pool is None:
        yield from map(encode_chunk, chunks)
        return
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(encode_chunk, (chunk,)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends whole documents to the current shard; closes it (rename + manifest) once it is full."""

    def __init__(self, out: Path, manifest: dict) -> None:
        self.out, self.manifest = out, manifest
        self.stack: ExitStack | None = None
        self.documents = _documents_done(manifest)

    def _target(self) -> tuple[str, int]:
        settings = self.manifest["settings"]
        if not any(s["split"] == "val" for s in self.manifest["shards"]):
            return "val", settings["val_tokens"] or VAL_TOKENS
        return "train", settings["shard_tokens"]

    def _open(self) -> None:
        split, self.target = self._target()
        index = sum(s["split"] == split for s in self.manifest["shards"])
        self.name = f"{split}_{index:06d}.bin"
        self.stack = ExitStack()
        tmp = self.stack.enter_context(atomic_file(self.out / self.name))
        self.file = self.stack.enter_context(open(tmp, "wb"))
        self.split, self.tokens, self.bytes = split, 0, 0
        self.sha = hashlib.sha256()  # the shard's digest, recorded in the manifest: resume checks the data by it

    def _write(self, tokens: np.ndarray, n_bytes: np.ndarray, n_docs: int) -> None:
        data = tokens.tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.tokens += len(tokens)
        self.bytes += int(n_bytes.sum())
        self.documents += n_docs

    def add(self, tokens: np.ndarray, lengths: np.ndarray, n_bytes: np.ndarray) -> None:
        """Write the chunk's documents, closing shards at the first document boundary past their target."""
        doc, tok = 0, 0
        while doc < len(lengths):
            if self.stack is None:
                self._open()
            ends = np.cumsum(lengths[doc:])  # tokens written from ``doc`` through each document
            k = int(np.searchsorted(ends, self.target - self.tokens))  # first document reaching the target
            last = min(k, len(ends) - 1)
            self._write(tokens[tok : tok + int(ends[last])], n_bytes[doc : doc + last + 1], last + 1)
            doc, tok = doc + last + 1, tok + int(ends[last])
            if k < len(ends):
                self.close_shard()

    def close_shard(self) -> None:
        if self.stack is None or self.tokens == 0:
            return
        self.stack.close()  # flush, fsync, rename: the shard is whole
        self.stack = None
        record = {"file": self.name, "split": self.split, "tokens": self.tokens, "bytes": self.bytes}
        record["sha256"] = self.sha.hexdigest()
        self.manifest["shards"].append(record | {"documents_end": self.documents})
        write_json(self.out / MANIFEST, self.manifest)

    def abort(self) -> None:
        """Drop the shard being written (its temporary file goes; the manifest never named it)."""
        if self.stack is not None:
            self.stack.__exit__(GPT2LabError, GPT2LabError("prepare stopped"), None)
            self.stack = None


def _documents_done(manifest: dict) -> int:
    return manifest["shards"][-1]["documents_end"] if manifest["shards"] else 0


# ---------------------------------------------------------------------------------------- prepare


def _start(out: Path, settings: dict, overwrite: bool = False) -> dict:
    """The manifest to continue: the folder's own when it was made with the same settings, else a new one.
    The folder must be new, empty, or prepared data (:func:`gpt2lab.outputs.guard_output`); ``overwrite``
    starts over in a folder of prepared data, whatever its settings."""
    guard_output(out, DATA, overwrite=overwrite, resume=True)
    if overwrite:
        clear_outputs(out, DATA)
    make_folder(out)
    remove_stale_temp_files(out)  # the shard a killed prepare was writing
    if (out / MANIFEST).is_file():
        manifest = read_json(out / MANIFEST)
        if not manifest.get("shards"):  # stopped before its first shard: nothing to keep
            (out / MANIFEST).unlink()
            return _start(out, settings)
        if manifest.get("settings") != settings:
            raise GPT2LabError(
                f"{out} holds a prepare of other sources or settings ({MANIFEST}); use another --out, "
                "or pass --overwrite to start it again"
            )
        return manifest
    if (out / META_FILE).is_file():
        raise GPT2LabError(f"{out} holds prepared data already; use another --out, or pass --overwrite to replace it")
    manifest = {"format": FORMAT, "version": 1, "settings": settings, "shards": [], "complete": False}
    write_json(out / MANIFEST, manifest)
    return manifest


def _check_sizes(shard_tokens, val_tokens, workers, chunk_docs) -> None:
    for name, value in (("shard_tokens", shard_tokens), ("val_tokens", val_tokens), ("chunk_docs", chunk_docs)):
        if (value is not None or name != "val_tokens") and (not is_int(value) or value < 1):
            raise GPT2LabError(f"{name} must be an integer >= 1, got {value!r}")
    if workers is not None and (not is_int(workers) or workers < 1):
        raise GPT2LabError(f"workers must be an integer >= 1, got {workers!r}")


def prepare_shards(
    sources: list[str | Path],
    out_dir: str | Path,
    options: SourceOptions | None = None,
    shard_tokens: int = SHARD_TOKENS,
    val_tokens: int | None = None,
    workers: int | None = None,
    chunk_docs: int = 256,
    overwrite: bool = False,
) -> dict:
    """Tokenize ``sources`` into shards in ``out_dir`` (resuming a prepare stopped there, or starting over
    with ``overwrite``); returns meta.json. ``val_tokens`` None holds out min(VAL_TOKENS, 10 %) of the corpus."""
    options = options or SourceOptions()
    _check_sizes(shard_tokens, val_tokens, workers, chunk_docs)
    out = Path(out_dir)
    created = not out.exists()
    settings = {"sources": [str(s) for s in sources], **vars(options), "tokenizer": GPT2_TOKENIZER}
    total = count_documents(sources, options)  # checks every source (files, folders) before anything is written
    manifest = _start(out, settings | {"shard_tokens": shard_tokens, "val_tokens": val_tokens}, overwrite)
    if manifest["complete"]:
        return read_json(out / META_FILE)
    workers = workers or os.cpu_count() or 1
    with worker_pool(workers) as pool:  # first: the hub reader below may start threads
        done = _documents_done(manifest)
        texts = itertools.islice((t for t in iter_texts(sources, options) if t.strip()), done, None)
        bar = tqdm(total=total, initial=done, unit="doc", desc="tokenizing")
        writer, new_tokens, started = ShardWriter(out, manifest), 0, time.perf_counter()
        try:
            for tokens, lengths, n_bytes in encoded_chunks(texts, pool, workers, chunk_docs):
                writer.add(tokens, lengths, n_bytes)
                new_tokens += len(tokens)
                bar.update(len(lengths))
                bar.set_postfix(tokens=f"{new_tokens:,}", tok_s=f"{new_tokens / (time.perf_counter() - started):,.0f}")
            writer.close_shard()
        except BaseException:
            writer.abort()
            _drop_if_empty(out, manifest, created)
            raise
        finally:
            bar.close()
    try:
        return _finish(out, manifest)
    except GPT2LabError:  # refused at the end (a corpus too small to split): what this prepare wrote goes
        _discard(out, manifest, created)
        raise


def _discard(out: Path, manifest: dict, created: bool) -> None:
    for shard in manifest["shards"]:
        (out / shard["file"]).unlink(missing_ok=True)
    manifest["shards"] = []
    _drop_if_empty(out, manifest, created)


def _drop_if_empty(out: Path, manifest: dict, created: bool) -> None:
    """A prepare that failed before its first shard leaves nothing: no manifest, and no folder it made."""
    if not manifest["shards"]:
        (out / MANIFEST).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()


def _fit_val_split(out: Path, manifest: dict) -> None:
    """The default split, min(VAL_TOKENS, 10 %): a corpus under 10 x VAL_TOKENS tokens has its validation
    shard cut at the first document end past 10 % of the corpus; the rest becomes the first training shard.
    With ``--val-tokens``, a corpus whose documents all went to the validation shard is cut at that many
    tokens (at the first document end past it, or inside the one long document).
    The new files are written, then the manifest names them, then the old shard goes: a kill at any point
    leaves a manifest that names whole files."""
    shards, asked = manifest["shards"], manifest["settings"]["val_tokens"]
    val = next(s for s in shards if s["split"] == "val")
    target = asked or max(1, sum(s["tokens"] for s in shards) // 10)
    only_val = all(s["split"] == "val" for s in shards)  # with --val-tokens, split only a corpus it swallowed
    if val["tokens"] <= target or val["tokens"] < 2 or (asked and not only_val):
        return
    tokens = np.fromfile(out / val["file"], dtype=DTYPE)
    ends = np.flatnonzero(tokens == load_tokenizer().eot_token) + 1  # each document ends with <|endoftext|>
    ends = ends[(ends >= target) & (ends < len(tokens))]
    cut = int(ends[0]) if len(ends) else target
    byte_len = token_byte_lengths(load_tokenizer())
    records = []
    for name, split, part in (("val_head.bin", "val", tokens[:cut]), ("train_from_val.bin", "train", tokens[cut:])):
        with atomic_file(out / name) as tmp:
            part.tofile(tmp)
        records.append({"file": name, "split": split, "tokens": len(part), "bytes": int(byte_len[part].sum())})
        records[-1] |= {"sha256": hashlib.sha256(part).hexdigest(), "documents_end": val["documents_end"]}
    manifest["shards"] = records + [s for s in shards if s is not val]
    write_json(out / MANIFEST, manifest)
    (out / val["file"]).unlink()


def _finish(out: Path, manifest: dict) -> dict:
    """meta.json (what TokenData reads) from the manifest; the manifest is marked complete."""
    if not manifest["shards"]:
        raise GPT2LabError(f"no text found in {', '.join(manifest['settings']['sources'])}: every document is empty")
    _fit_val_split(out, manifest)
    shards = manifest["shards"]
    split = {name: [s for s in shards if s["split"] == name] for name in ("train", "val")}
    if not split["train"]:
        raise GPT2LabError(
            f"the corpus has {split['val'][0]['tokens']:,} tokens, all of them in the validation shard "
            f"(val_tokens {manifest['settings']['val_tokens']:,}); nothing was kept; prepare again with a lower "
            "--val-tokens, or without it (then 10 % of a small corpus is held out)"
        )
    meta = {
        "tokenizer": GPT2_TOKENIZER,
        "vocab_size": load_tokenizer().n_vocab,
        "dtype": np.dtype(DTYPE).name,
        "tokens": sum(s["tokens"] for s in shards),
        **{f"{name}_tokens": sum(s["tokens"] for s in part) for name, part in split.items()},
        **{f"{name}_bytes": sum(s["bytes"] for s in part) for name, part in split.items()},
        "documents": _documents_done(manifest),
        "sources": manifest["settings"]["sources"],
        "shards": {name: [s["file"] for s in part] for name, part in split.items()},
        "split": "val: the first documents (at least val_tokens tokens); train: the rest, in shards",
        "content_sha256": combine_digests(
            [
                (s["file"], s.get("sha256") or file_sha256(out / s["file"]))
                for name in ("train", "val")
                for s in split[name]
            ]
        ),
    }
    write_json(out / META_FILE, meta)
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    return meta
