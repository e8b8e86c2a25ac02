"""The demo's reference losses: unigram and bigram count models with add-one smoothing, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpt2lab.data.count_models import bigram_loss, unigram_loss
from gpt2lab.tokenizer import CharTokenizer

TRAIN, VAL = "abab", "abca"  # vocabulary "abc": 'c' never occurs in the train split


def _ids(tok, text):
    return np.array(tok.encode(text))


def test_unigram_and_bigram_by_hand():
    tok = CharTokenizer("abc")
    train, val = _ids(tok, TRAIN), _ids(tok, VAL)
    # Counts a=2, b=2, c=0 of 4 characters, add-one over 3 symbols: p(a) = p(b) = 3/7, p(c) = 1/7.
    # The targets are val[1:] = "bca".
    expected_unigram = -(math.log(3 / 7) + math.log(1 / 7) + math.log(3 / 7)) / 3
    assert unigram_loss(train, val, 3) == pytest.approx(expected_unigram, rel=1e-12)
    # Pairs of the train split: ab, ba, ab. count(a.) = 2, count(b.) = 1 (the last b has no successor).
    # p(b|a) = (2+1)/(2+3) = 3/5; p(c|b) = (0+1)/(1+3) = 1/4; p(a|c) = (0+1)/(0+3) = 1/3.
    expected_bigram = -(math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 3)) / 3
    assert bigram_loss(train, val, 3) == pytest.approx(expected_bigram, rel=1e-12)


def test_bigram_beats_unigram_on_structured_text():
    tok = CharTokenizer.from_texts(["abcd"])
    text = _ids(tok, "abcd" * 50)
    assert unigram_loss(text, text, 4) == pytest.approx(math.log(4), abs=0.01)  # uniform frequencies
    assert bigram_loss(text, text, 4) < 0.1  # the next character is determined by the previous one
