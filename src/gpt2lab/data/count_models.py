"""Count models, the reference points that give a validation loss its meaning.

A unigram model predicts every token from its frequency alone (no context at all); a bigram model
from the one token before it. A language model that does not beat the unigram's loss has learned
nothing but token frequencies; one that beats the bigram's uses more than one token of context.

Both are estimated from the train split's counts with add-one (Laplace) smoothing, so that every
token of the vocabulary has a probability and an unseen validation token costs a finite loss. Both
score the targets ``tokens[1:]`` of a validation stream (the first token has nothing before it), in
mean nats per token, like a model's loss on the same stream. The study's reference line is the
interpolated bigram (:func:`ngram_references`), a stronger baseline than add-one smoothing.
"""

from __future__ import annotations

import numpy as np


def unigram_loss(train: np.ndarray, tokens: np.ndarray, vocab_size: int) -> float:
    """Mean -log p(t) over ``tokens[1:]``, p(t) = (count(t) + 1) / (len(train) + vocab_size)."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size)
    log_p = np.log(counts + 1.0) - np.log(len(train) + vocab_size)
    return float(-log_p[np.asarray(tokens[1:], dtype=np.int64)].mean())


def _pair_and_context_counts(train: np.ndarray, tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each pair (a, b) of ``tokens``: count(a b) and count(a ·) in ``train``.

    Pairs are counted sparsely (one int64 key a * V + b per distinct pair), so a 50,257-token vocabulary
    costs the number of distinct pairs in the train split, not vocab_size squared.
    """
    keys, pair_counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    wanted = tokens[:-1] * vocab_size + tokens[1:]
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    seen = np.where(keys[at] == wanted, pair_counts[at], 0)
    return seen, np.bincount(train[:-1], minlength=vocab_size)[tokens[:-1]]


def bigram_loss(train: np.ndarray, tokens: np.ndarray, vocab_size: int) -> float:
    """Mean -log p(b | a) over the pairs (a, b) of ``tokens``, add-one smoothed:
    p(b | a) = (count(a b) + 1) / (count(a ·) + vocab_size)."""
    train, tokens = np.asarray(train, dtype=np.int64), np.asarray(tokens, dtype=np.int64)
    seen, context = _pair_and_context_counts(train, tokens, vocab_size)
    return float(-(np.log(seen + 1.0) - np.log(context + vocab_size)).mean())


def interpolated_bigram_loss(train: np.ndarray, tokens: np.ndarray, vocab_size: int, weight: float) -> float:
    """Mean -log p(b | a), p = weight * count(a b) / count(a ·) + (1 - weight) * add-one unigram p(b):
    the bigram where its counts speak, the unigram where they are thin or absent."""
    train, tokens = np.asarray(train, dtype=np.int64), np.asarray(tokens, dtype=np.int64)
    unigram = (np.bincount(train, minlength=vocab_size) + 1.0) / (len(train) + vocab_size)
    seen, context = _pair_and_context_counts(train, tokens, vocab_size)
    bigram = np.divide(seen, context, out=np.zeros(len(seen)), where=context > 0)
    return float(-np.log(weight * bigram + (1 - weight) * unigram[tokens[1:]]).mean())


def ngram_references(train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Validation loss (nats/token) of the unigram and of the interpolated bigram, whose weight is chosen
    on the last 10% of the training tokens (counted from the first 90%), never on the validation split."""
    train, val = np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)
    cut = int(len(train) * 0.9)
    weights = np.linspace(0.05, 0.95, 19)
    best = float(min(weights, key=lambda w: interpolated_bigram_loss(train[:cut], train[cut:], vocab_size, w)))
    return {
        "unigram": unigram_loss(train, val, vocab_size),
        "bigram": interpolated_bigram_loss(train, val, vocab_size, best),
        "bigram_weight": best,
    }
