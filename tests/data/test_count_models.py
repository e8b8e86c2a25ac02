"""The demo's reference losses: unigram and bigram count models with add-one smoothing, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpt2lab.data.count_models import WittenBell, bigram_loss, unigram_loss, windowed_ngram_losses
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


def _witten_bell_brute_force(train: list[int], vocab: int, history: tuple[int, ...], token: int) -> float:
    """The interpolated Witten-Bell recursion written directly from its definition, by counting tuples."""
    if history is None:
        return 1.0 / vocab
    lower = _witten_bell_brute_force(train, vocab, history[1:] if history else None, token)
    k = len(history)
    follows = [tuple(train[i + k : i + k + 1]) for i in range(len(train) - k) if tuple(train[i : i + k]) == history]
    total, types = len(follows), len(set(follows))
    if total == 0:
        return lower
    seen = sum(1 for f in follows if f == (token,))
    return (seen + types * lower) / (total + types)


def test_witten_bell_by_hand():
    tok = CharTokenizer("abc")
    train = _ids(tok, "abab")
    probs = WittenBell(train, 3, order=2).probabilities(_ids(tok, "abc"))
    # Unigram: counts a=2, b=2, c=0 of 4, 2 types seen: P1(w) = (c(w) + 2 * 1/3) / (4 + 2).
    assert probs[0] == pytest.approx([8 / 18, 8 / 18, 2 / 18])
    # Bigram after 'a': c(a .) = 2 (ab twice), one type: P(b | a) = (2 + 1 * 8/18) / (2 + 1) = 22/27.
    assert probs[1, 1] == pytest.approx(22 / 27)
    # After 'b': c(b .) = 1 (ba; the last b has no successor), one type: P(c | b) = (0 + 2/18) / 2.
    assert probs[1, 2] == pytest.approx(1 / 18)


def test_witten_bell_matches_brute_force_up_to_the_5_gram():
    rng = np.random.default_rng(0)
    text = "the cat sat on the mat. the bat ate the hat; that cat sat. "
    tok = CharTokenizer.from_texts([text + "r"])  # 'r' only in the validation text: an unseen unigram
    vocab = len(set(text + "r"))
    train = [int(t) for t in _ids(tok, text * 3)[:150]] + [int(t) for t in rng.integers(0, vocab, 30)]
    val = _ids(tok, "the rat sat on that hat. a cat")
    probs = WittenBell(np.array(train), vocab, order=5).probabilities(val)
    for i in range(len(val)):
        for k in range(min(5, i + 1)):  # history length k: the k tokens before position i
            expected = _witten_bell_brute_force(train, vocab, tuple(int(t) for t in val[i - k : i]), val[i])
            assert probs[k, i] == pytest.approx(expected, rel=1e-12), (i, k)


def test_windowed_losses_cut_the_history_at_the_window_start():
    tok = CharTokenizer.from_texts(["abcd"])
    train = _ids(tok, "abcd" * 40)
    tokens = _ids(tok, "abcd" * 4 + "a")  # 16 targets: 4 windows of 4
    probs = WittenBell(train, 4, order=3).probabilities(tokens)
    losses = windowed_ngram_losses(train, tokens, 4, context=4, max_order=3)
    # position p of a window may use p + 1 tokens of history: the 3-gram uses 1 at p = 0, then 2
    targets = np.arange(1, 17)
    history = np.minimum(2, (targets - 1) % 4 + 1)
    assert losses["3-gram"] == pytest.approx(-np.log(probs[history, targets]).mean())
    assert losses["1-gram"] == pytest.approx(-np.log(probs[0, 1:]).mean())
    assert losses["3-gram"] < losses["2-gram"] < losses["1-gram"]  # the text is deterministic given 1 token
    # with one-token windows every n-gram can use exactly one token of history: all n >= 2 agree
    short = windowed_ngram_losses(train, tokens, 4, context=1, max_order=3)
    assert short["3-gram"] == pytest.approx(short["2-gram"])
