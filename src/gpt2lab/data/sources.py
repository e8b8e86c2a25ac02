"""Documents from the formats large corpora ship in: parquet, jsonl and arrow files (or folders of them),
and Hugging Face hub datasets streamed with ``datasets`` (``hf:NAME``).

Every reader yields one document's text at a time from a column (``text`` unless told otherwise) and
reads in record batches, so memory stays one batch whatever the file size. Other sources (text files,
folders of text, the named datasets) are read by :func:`gpt2lab.data.tokens.iter_documents`.
``pyarrow`` (parquet, arrow) and ``datasets`` (hf:) are optional extras: ``pip install 'gpt2lab[corpora]'``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2lab.data.tokens import TEXT_SUFFIXES, folder_files, iter_documents, read_text_file
from gpt2lab.errors import GPT2LabError

TABLE_SUFFIXES = (".parquet", ".jsonl", ".arrow")
HF_PREFIX = "hf:"
BATCH_ROWS = 1024


@dataclass(frozen=True)
class SourceOptions:
    text_column: str = "text"
    hf_config: str | None = None
    split: str = "train"
    hf_revision: str | None = None  # e.g. refs/convert/parquet: the hub's parquet export of a script dataset


def is_table_source(source: str | Path) -> bool:
    """A hub dataset, a parquet/jsonl/arrow file, or a folder holding such files."""
    if str(source).startswith(HF_PREFIX):
        return True
    path = Path(source)
    return path.suffix.lower() in TABLE_SUFFIXES or (path.is_dir() and bool(_table_files(path)))


def _table_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)


def _source_files(folder: Path) -> list[Path]:
    """A folder of tables: every file, tables and text files alike (one document each); any other is refused."""
    return folder_files(folder, (*TABLE_SUFFIXES, *TEXT_SUFFIXES))


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet
    except ImportError:
        raise GPT2LabError("reading parquet and arrow files needs pyarrow: pip install 'gpt2lab[corpora]'") from None
    return pyarrow


def _check_column(schema, column: str, path: Path) -> None:
    """The column must exist and hold strings (a wrong column would otherwise read as empty documents)."""
    if column not in schema.names:
        raise GPT2LabError(f"{path} has no column '{column}' (columns: {', '.join(schema.names)}); use --text-column")
    kind = schema.field(column).type
    if not str(kind).startswith(("string", "large_string")):
        raise GPT2LabError(f"{path}: column '{column}' holds {kind}, not text; use --text-column")


def _column_texts(batches, column: str) -> Iterator[str]:
    for batch in batches:
        for text in batch.column(column).to_pylist():
            yield text if isinstance(text, str) else ""


def _parquet_texts(path: Path, column: str) -> Iterator[str]:
    pa = _pyarrow()
    try:
        table = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise GPT2LabError(f"{path} is not a readable parquet file ({e})") from None
    _check_column(table.schema_arrow, column, path)
    yield from _column_texts(table.iter_batches(batch_size=BATCH_ROWS, columns=[column]), column)


def _arrow_texts(path: Path, column: str) -> Iterator[str]:
    """Arrow IPC in the file format, or the stream format that ``datasets`` writes in its cache."""
    pa = _pyarrow()
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid as e:
            raise GPT2LabError(f"{path} is not an arrow file ({e})") from None
        batches = iter(reader)
    _check_column(reader.schema, column, path)
    yield from _column_texts(batches, column)


def _jsonl_texts(path: Path, column: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GPT2LabError(f"{path} line {number}: not UTF-8 text (invalid byte at column {e.start})") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise GPT2LabError(f"{path} line {number}: not JSON ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get(column, ""), str | None):
                raise GPT2LabError(f"{path} line {number}: '{column}' is not text; use --text-column")
            if column not in item:
                raise GPT2LabError(f"{path} line {number}: no '{column}' field; use --text-column")
            yield item[column] or ""


def _hf_dataset(name: str, options: SourceOptions):
    try:
        import datasets
    except ImportError:
        raise GPT2LabError("hf: datasets need the datasets library: pip install 'gpt2lab[corpora]'") from None
    try:
        return datasets.load_dataset(
            name, options.hf_config, split=options.split, revision=options.hf_revision, streaming=True
        )
    except Exception as e:  # the hub, the network and the dataset's own code raise many kinds
        raise GPT2LabError(f"cannot open {HF_PREFIX}{name} ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _hf_texts(name: str, options: SourceOptions) -> Iterator[str]:
    for row in _hf_dataset(name, options):
        if options.text_column not in row:
            raise GPT2LabError(f"{HF_PREFIX}{name} has no column '{options.text_column}' (columns: {', '.join(row)})")
        text = row[options.text_column]
        if not isinstance(text, str | None):
            raise GPT2LabError(f"{HF_PREFIX}{name}: column '{options.text_column}' is not text; use --text-column")
        yield text or ""


READERS = {".parquet": _parquet_texts, ".arrow": _arrow_texts, ".jsonl": _jsonl_texts}


def iter_texts(sources: list[str | Path], options: SourceOptions) -> Iterator[str]:
    """Every document's text, source after source, in a fixed order (so a resumed prepare can skip)."""
    for source in sources:
        if str(source).startswith(HF_PREFIX):
            yield from _hf_texts(str(source)[len(HF_PREFIX) :], options)
            continue
        path = Path(source)
        if not (path.is_dir() and is_table_source(path)):
            if path.suffix.lower() in READERS:
                if not path.is_file():
                    raise GPT2LabError(f"no such file: {path}")
                yield from READERS[path.suffix.lower()](path, options.text_column)
            else:
                yield from (text for _, text in iter_documents([source]))
            continue
        for file in _source_files(path):
            reader = READERS.get(file.suffix.lower())
            yield from reader(file, options.text_column) if reader else [read_text_file(file)]


def count_documents(sources: list[str | Path], options: SourceOptions) -> int | None:
    """How many documents the sources hold, where that is cheap to know (for the ETA); else None."""
    total = 0
    for source in sources:
        if str(source).startswith(HF_PREFIX):
            splits = _hf_dataset(str(source)[len(HF_PREFIX) :], options).info.splits  # the card's metadata
            split = splits.get(options.split) if splits else None
            if split is None or not split.num_examples:
                return None
            total += split.num_examples
            continue
        path = Path(source)
        files = _source_files(path) if path.is_dir() else [path]
        for file in files:
            if file.suffix.lower() == ".parquet" and file.is_file():
                try:
                    total += _pyarrow().parquet.ParquetFile(file).metadata.num_rows
                except Exception:  # not a parquet file after all: its reader says so, in one line, when it opens it
                    return None
            elif file.suffix.lower() == ".jsonl" and file.is_file():
                with open(file, "rb") as f:
                    total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
            else:
                return None
    return total
