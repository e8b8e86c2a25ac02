"""Writes TensorFlow checkpoints ("tensor bundles") without TensorFlow, for tests of the reader.

TensorFlow cannot be installed here, so the end-to-end tests need another source of complete
checkpoints. This writer follows the format from the writing side, independently of
``gpt2lab.checkpoints`` (it imports nothing from it): protobuf records encoded by hand, a LevelDB
table with prefix-compressed keys, restart points every 16 entries, one index entry per data block
keyed by the shortest separator, masked CRC32C trailers and the 48-byte footer. A test rebuilds the
index of OpenAI's real GPT-2 checkpoint from its parsed entries and gets the same bytes, which
shows that writer and reader agree with TensorFlow's conventions and not only with each other.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import crc32c
import numpy as np

TABLE_MAGIC = 0xDB4775248B80FB57
DEFAULT_BLOCK_SIZE = 256 * 1024  # TensorFlow's table option block_size
RESTART_INTERVAL = 16  # ... and block_restart_interval
TF_DTYPE = {"float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6, "int64": 9, "float16": 19}


def masked_crc(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------- protobuf


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 fields: two's complement, always 10 bytes
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_varint(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def field_bytes(field: int, value: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(value)) + value


def field_fixed32(field: int, value: int) -> bytes:
    return varint(field << 3 | 5) + struct.pack("<I", value)


def bundle_header(num_shards: int = 1) -> bytes:
    """BundleHeaderProto: num_shards, endianness LITTLE (0, so left out), version {producer: 1}."""
    return field_varint(1, num_shards) + field_bytes(3, field_varint(1, 1))


def bundle_entry(dtype: str, shape, shard_id: int, offset: int, size: int, crc: int) -> bytes:
    """BundleEntryProto in field order; proto3 leaves zero scalars out (offset 0 of the first tensor)."""
    dims = b"".join(field_bytes(2, field_varint(1, d) if d else b"") for d in shape)
    out = field_varint(1, TF_DTYPE[dtype]) + field_bytes(2, dims)
    for field, value in ((3, shard_id), (4, offset), (5, size)):
        if value:
            out += field_varint(field, value)
    if crc:
        out += field_fixed32(6, crc)
    return out


# ---------------------------------------------------------------------------------------- LevelDB table


def shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key k with start <= k < limit (LevelDB's bytewise comparator)."""
    n = 0
    while n < min(len(start), len(limit)) and start[n] == limit[n]:
        n += 1
    if n < min(len(start), len(limit)) and start[n] < 0xFF and start[n] + 1 < limit[n]:
        return start[:n] + bytes([start[n] + 1])
    return start


def short_successor(key: bytes) -> bytes:
    """A short key >= ``key``: its first byte that can be incremented, incremented, and nothing after."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


class BlockBuilder:
    def __init__(self, restart_interval: int) -> None:
        self.restart_interval = restart_interval
        self.buffer = bytearray()
        self.restarts = [0]
        self.count = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count == self.restart_interval:
            self.restarts.append(len(self.buffer))
            self.count = 0
        else:
            while shared < min(len(key), len(self.last_key)) and key[shared] == self.last_key[shared]:
                shared += 1
        self.buffer += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        self.last_key = key
        self.count += 1

    def size_estimate(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def empty(self) -> bool:
        return not self.buffer

    def finish(self) -> bytes:
        # the entries, then each restart offset and their count, as little-endian uint32
        return bytes(self.buffer) + struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts, len(self.restarts))


def build_table(items: list[tuple[bytes, bytes]], block_size: int = DEFAULT_BLOCK_SIZE) -> bytes:
    """A table file holding ``items`` (sorted by key)."""
    assert [k for k, _ in items] == sorted(k for k, _ in items), "keys must be in byte order"
    out = bytearray()

    def write_block(contents: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        out.extend(contents + b"\x00" + struct.pack("<I", masked_crc(contents + b"\x00")))
        return handle

    index = BlockBuilder(restart_interval=1)
    block = BlockBuilder(RESTART_INTERVAL)
    pending, block_last = None, b""  # a flushed block's handle and last key wait for the next key
    for key, value in items:
        if pending is not None:
            index.add(shortest_separator(block_last, key), pending)
            pending = None
        block.add(key, value)
        if block.size_estimate() >= block_size:
            block_last, pending = block.last_key, write_block(block.finish())
            block = BlockBuilder(RESTART_INTERVAL)
    if not block.empty():
        block_last, pending = block.last_key, write_block(block.finish())
    if pending is not None:
        index.add(short_successor(block_last), pending)
    metaindex = write_block(BlockBuilder(RESTART_INTERVAL).finish())
    index_handle = write_block(index.finish())
    footer = (metaindex + index_handle).ljust(40, b"\x00") + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out + footer)


# ---------------------------------------------------------------------------------------- checkpoints


def write_bundle(prefix: Path, tensors: dict[str, np.ndarray], block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """``prefix.index`` + ``prefix.data-00000-of-00001``; tensors stored in name order, as TF's Saver does."""
    data = bytearray()
    items = [(b"", bundle_header())]
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<")).tobytes()
        entry = bundle_entry(str(tensors[name].dtype), tensors[name].shape, 0, len(data), len(raw), masked_crc(raw))
        items.append((name.encode(), entry))
        data += raw
    items.sort(key=lambda kv: kv[0])
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    Path(f"{prefix}.index").write_bytes(build_table(items, block_size))


# gpt2lab name (within a block) -> OpenAI name; Conv1D weights are stored [1, in, out].
_BLOCK_NAMES = {
    "ln_1.weight": "ln_1/g",
    "ln_1.bias": "ln_1/b",
    "attn.c_attn.weight": "attn/c_attn/w",
    "attn.c_attn.bias": "attn/c_attn/b",
    "attn.c_proj.weight": "attn/c_proj/w",
    "attn.c_proj.bias": "attn/c_proj/b",
    "ln_2.weight": "ln_2/g",
    "ln_2.bias": "ln_2/b",
    "mlp.c_fc.weight": "mlp/c_fc/w",
    "mlp.c_fc.bias": "mlp/c_fc/b",
    "mlp.c_proj.weight": "mlp/c_proj/w",
    "mlp.c_proj.bias": "mlp/c_proj/b",
}
_TOP_NAMES = {
    "transformer.wte.weight": "model/wte",
    "transformer.wpe.weight": "model/wpe",
    "transformer.ln_f.weight": "model/ln_f/g",
    "transformer.ln_f.bias": "model/ln_f/b",
}


def openai_tensors(model) -> dict[str, np.ndarray]:
    """The state of a plain GPT-2 gpt2lab model under OpenAI's names and layouts."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        array = t.detach().cpu().numpy()
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = array
            continue
        _, _, layer, rest = name.split(".", 3)  # transformer.h.<i>.<rest>
        if rest.endswith(".weight") and rest.split(".")[-2] in ("c_attn", "c_proj", "c_fc"):
            array = array.T[None]  # (out, in) -> [1, in, out]
        out[f"model/h{layer}/{_BLOCK_NAMES[rest]}"] = np.ascontiguousarray(array)
    return out


def write_gpt2_checkpoint(model, folder: Path, block_size: int = DEFAULT_BLOCK_SIZE, extra=None) -> Path:
    """A folder laid out like OpenAI's release (checkpoint, hparams.json, model.ckpt.*)."""
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    hparams = {"n_vocab": c.vocab_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_head": c.n_head}
    (folder / "hparams.json").write_text(json.dumps({**hparams, "n_layer": c.n_layer}, indent=2))
    (folder / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    )
    write_bundle(folder / "model.ckpt", {**openai_tensors(model), **(extra or {})}, block_size)
    return folder
