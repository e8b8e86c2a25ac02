"""TensorFlow checkpoints ("tensor bundles") read without TensorFlow: the index, its entries, the data.

Owns the generic format only (a LevelDB-style table of protobuf records, masked CRC32C checks), not
what any tensor means: :mod:`gpt2lab.checkpoints.openai_tf` maps OpenAI's GPT-2 tensors onto gpt2lab.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2lab.errors import GPT2LabError, closest_hint
from gpt2lab.files import inside

__all__ = ["TFCheckpointReader", "TFTensorEntry", "masked_crc32c", "tf_prefix"]

# A TF checkpoint ("tensor bundle") is an index file plus data shards. The index is a LevelDB table:
#   data blocks | metaindex block | index block | footer (48 bytes)
# The footer holds two block handles (varint offset, varint size), zero padding to 40 bytes, and the
# magic number. A block is a run of prefix-compressed key/value entries, then restart offsets (uint32
# each) and their count; every block is followed by a 1-byte compression type and a masked CRC32C of
# block + type. Keys are tensor names in byte order; the empty key holds the BundleHeaderProto and
# every other value is a BundleEntryProto telling where a tensor's raw bytes are in the data shard.

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5

# tensorflow/core/framework/types.proto: DataType enum values and their little-endian numpy types.
_TF_DTYPES = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    7: "string",
    9: "int64",
    10: "bool",
    14: "bfloat16",
    17: "uint16",
    19: "float16",
    22: "uint32",
    23: "uint64",
}


def masked_crc32c(data: bytes) -> int:
    """CRC32C as TensorFlow and LevelDB store it: rotated and offset, so that a CRC of bytes that
    themselves contain CRCs does not degenerate."""
    crc = _crc32c()(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.cache
def _crc32c():
    """The ``crc32c`` package's function, imported when a TF file is first read: nothing else needs it, so
    gpt2lab imports on a machine without it (a bare GPU image, where only the check's packages are installed)."""
    try:
        import crc32c
    except ImportError:
        raise GPT2LabError("reading a TensorFlow checkpoint needs the crc32c package: pip install crc32c") from None
    return crc32c.crc32c


class _Corrupt(Exception):
    """Raised inside the index parser; the reader turns it into a GPT2LabError naming the file."""


# ---------------------------------------------------------------------------------------- protobuf wire format


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise _Corrupt("varint runs past the end of its buffer")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Corrupt("varint longer than 10 bytes")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for each field of a serialised protobuf message.

    Varints come back as unsigned ints, fixed32/fixed64 as little-endian unsigned ints and
    length-delimited fields as bytes (strings, packed arrays and nested messages alike).
    """
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise _Corrupt(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise _Corrupt("protobuf field runs past the end of its message")
        yield field, value


def _int64(value: int) -> int:
    """A varint decoded as unsigned, read back as the two's-complement int64 protobuf meant."""
    return value - (1 << 64) if value >= 1 << 63 else value


# ---------------------------------------------------------------------------------------- table (index file)


@dataclass(frozen=True)
class TFTensorEntry:
    """Where one tensor lives in a TF checkpoint (a decoded BundleEntryProto)."""

    name: str
    dtype: str  # numpy name, e.g. "float32"
    shape: tuple[int, ...]
    shard_id: int
    offset: int  # byte offset in the data shard
    size: int  # bytes
    crc32c: int  # masked CRC32C of the tensor's bytes
    sliced: bool = False  # a partitioned variable, stored as slices under other keys


def _block(data: bytes, handle: bytes) -> bytes:
    """The contents of the block a BlockHandle points at, after checking its trailer."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + _BLOCK_TRAILER_SIZE > len(data):
        raise _Corrupt(f"block at {offset} (+{size} bytes) runs past the end of the file")
    contents, compression = data[offset:end], data[end]
    (stored_crc,) = struct.unpack_from("<I", data, end + 1)
    if masked_crc32c(data[offset : end + 1]) != stored_crc:
        raise _Corrupt(f"CRC mismatch in the block at byte {offset}")
    if compression != 0:
        raise _Corrupt(f"block at {offset} uses compression type {compression} (only uncompressed is supported)")
    return contents


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs of a block. Each entry stores how many leading bytes its key shares with the
    previous key, then the rest of the key and the value; the restart array only speeds up seeks."""
    if len(block) < 4:
        raise _Corrupt("block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 * (num_restarts + 1)
    if end < 0:
        raise _Corrupt("restart array larger than its block")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_size > end:
            raise _Corrupt(f"malformed block entry at byte {pos}")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_size]
        pos += value_size


def _table_entries(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB table file, in key order: the index block maps each data
    block's last key (or a shorter separator) to the block's handle."""
    if len(data) < _FOOTER_SIZE:
        raise _Corrupt(f"{len(data)} bytes is shorter than the table footer")
    footer = data[-_FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)
    if magic != _TABLE_MAGIC:
        raise _Corrupt(f"bad magic number {magic:#x} (not a TensorFlow checkpoint index)")
    _, pos = _varint(footer, 0)  # metaindex handle: offset, size (the metaindex is unused by bundles)
    _, pos = _varint(footer, pos)
    for _, handle in _block_entries(_block(data, footer[pos:])):
        yield from _block_entries(_block(data, handle))


def _parse_header(value: bytes) -> tuple[int, int]:
    """(num_shards, endianness) of a BundleHeaderProto; proto3 leaves zero fields out."""
    num_shards, endianness = 1, 0
    for field, v in _proto_fields(value):
        if field == 1:
            num_shards = v
        elif field == 2:
            endianness = v
    return num_shards, endianness


def _parse_shape(value: bytes) -> tuple[int, ...]:
    """TensorShapeProto: repeated ``dim`` (field 2), each a Dim message with ``size`` (field 1)."""
    dims = []
    for field, dim in _proto_fields(value):
        if field == 2:
            size = 0
            for f, v in _proto_fields(dim):
                if f == 1:
                    size = _int64(v)
            dims.append(size)
        elif field == 3 and dim:
            raise _Corrupt("tensor of unknown rank")
    return tuple(dims)


def _parse_entry(name: str, value: bytes) -> TFTensorEntry:
    """A BundleEntryProto: dtype (1), shape (2), shard_id (3), offset (4), size (5), crc32c (6, fixed32),
    slices (7)."""
    fields: dict[str, Any] = dict(dtype=0, shape=(), shard_id=0, offset=0, size=0, crc32c=0, sliced=False)
    for field, v in _proto_fields(value):
        if field == 1:
            fields["dtype"] = v
        elif field == 2:
            fields["shape"] = _parse_shape(v)
        elif field in (3, 4, 5):
            fields[("shard_id", "offset", "size")[field - 3]] = _int64(v)
        elif field == 6:
            fields["crc32c"] = v
        elif field == 7:
            fields["sliced"] = True
    dtype = _TF_DTYPES.get(fields.pop("dtype"), "unknown")
    return TFTensorEntry(name=name, dtype=dtype, **fields)


# ---------------------------------------------------------------------------------------- reader


def tf_prefix(path: Path) -> Path:
    """The checkpoint prefix (``.../model.ckpt``) for a folder, a prefix or an ``.index`` path."""
    if path.suffix == ".index" and path.is_file():
        return path.with_suffix("")
    if not path.is_dir():
        if Path(f"{path}.index").is_file():
            return path
        raise GPT2LabError(f"no TensorFlow checkpoint at {path} (no {path.name}.index)")
    pointer = path / "checkpoint"  # text proto: model_checkpoint_path: "model.ckpt"
    if pointer.is_file():
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"', pointer.read_text(errors="replace"), re.MULTILINE)
        if m:
            named = Path(m.group(1))
            for prefix in (path / named, path / named.name):  # absolute paths from another machine: basename
                if Path(f"{prefix}.index").is_file() and _within(path, Path(f"{prefix}.index")):
                    return prefix  # a pointer out of the folder (../, /abs, a link) is never followed
    indexes = sorted(path.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    if not indexes:
        raise GPT2LabError(f"no TensorFlow checkpoint index (*.index) in {path}")
    raise GPT2LabError(f"{path} holds several checkpoints ({', '.join(p.name for p in indexes)}); pass one prefix")


def _within(folder: Path, path: Path) -> bool:
    root = folder.resolve()
    return root in path.resolve().parents


class TFCheckpointReader:
    """Reads a TensorFlow checkpoint without TensorFlow.

    ``TFCheckpointReader(folder_or_prefix)`` parses the index at once: ``entries`` maps each tensor
    name to its :class:`TFTensorEntry` (in the index's byte order), ``num_shards`` and ``prefix`` describe
    the bundle. :meth:`read` returns one tensor as a numpy array after checking its size and CRC32C.
    """

    def __init__(self, folder_or_prefix: str | os.PathLike) -> None:
        self.prefix = tf_prefix(Path(folder_or_prefix))
        self.index_path = Path(f"{self.prefix}.index")
        try:
            self.num_shards, self.entries = self._parse_index(self.index_path.read_bytes())
        except _Corrupt as err:
            raise GPT2LabError(f"{self.index_path} is not a valid TensorFlow checkpoint index: {err}") from None

    @staticmethod
    def _parse_index(data: bytes) -> tuple[int, dict[str, TFTensorEntry]]:
        num_shards, entries = None, {}
        for key, value in _table_entries(data):
            if key == b"":
                num_shards, endianness = _parse_header(value)
                if endianness != 0:
                    raise _Corrupt("big-endian bundles are not supported")
            else:
                name = key.decode("utf-8", errors="replace")
                entries[name] = _parse_entry(name, value)
        if num_shards is None:
            raise _Corrupt("no bundle header (the empty key)")
        return num_shards, entries

    def data_path(self, shard_id: int) -> Path:
        path = Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")
        return inside(self.prefix.parent, path, "the data shard")

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name``, checked against the size and CRC32C recorded in the index."""
        entry = self.entries.get(name)
        if entry is None:
            raise GPT2LabError(f"no tensor '{name}' in {self.index_path}{closest_hint(name, self.entries)}")
        if entry.sliced:
            raise GPT2LabError(f"{name} is a partitioned variable (stored as slices), which is not supported")
        if entry.dtype in ("string", "bfloat16", "unknown"):
            raise GPT2LabError(f"{name} has dtype {entry.dtype}, which this reader does not support")
        dtype = np.dtype(entry.dtype).newbyteorder("<")
        expected = int(np.prod(entry.shape, dtype=np.int64)) * dtype.itemsize
        if entry.size != expected:
            raise GPT2LabError(f"{name}: the index records {entry.size} bytes, but {entry.shape} {dtype} is {expected}")
        array = np.empty(entry.shape, dtype=dtype)
        raw = array.reshape(-1).view(np.uint8)  # the array's own bytes: read in place, no copy
        self._read_into(entry, raw)
        if masked_crc32c(raw) != entry.crc32c:
            raise GPT2LabError(
                f"CRC32C mismatch for {name} in {self.data_path(entry.shard_id)}: the data file is corrupt"
            )
        return array

    def _read_into(self, entry: TFTensorEntry, out: np.ndarray) -> None:
        path = self.data_path(entry.shard_id)
        if not path.is_file():
            raise GPT2LabError(f"missing data file {path} (holds {entry.name})")
        with path.open("rb") as f:
            available = os.fstat(f.fileno()).st_size
            if available < entry.offset + entry.size:
                raise GPT2LabError(
                    f"truncated data file {path}: {entry.name} needs bytes {entry.offset}..{entry.offset + entry.size} "
                    f"but the file has {available}"
                )
            f.seek(entry.offset)
            if f.readinto(out) != entry.size:
                raise GPT2LabError(f"short read of {entry.name} from {path}")
