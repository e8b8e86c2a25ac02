"""Count models, the reference points that give a validation loss its meaning.

A unigram model predicts every token from its frequency alone (no context at all); a bigram model
from the one token before it. A language model that does not beat the unigram's loss has learned
nothing but token frequencies; one that beats the bigram's uses more than one token of context.

Both are estimated from the train split's counts with add-one (Laplace) smoothing, so that every
token of the vocabulary has a probability and an unseen validation token costs a finite loss. Both
score the targets ``tokens[1:]`` of a validation stream (the first token has nothing before it), in
mean nats per token, like a model's loss on the same stream.
"""

from __future__ import annotations

import numpy as np


def unigram_loss(train: np.ndarray, tokens: np.ndarray, vocab_size: int) -> float:
    """Mean -log p(t) over ``tokens[1:]``, p(t) = (count(t) + 1) / (len(train) + vocab_size)."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size)
    log_p = np.log(counts + 1.0) - np.log(len(train) + vocab_size)
    return float(-log_p[np.asarray(tokens[1:], dtype=np.int64)].mean())


def bigram_loss(train: np.ndarray, tokens: np.ndarray, vocab_size: int) -> float:
    """Mean -log p(b | a) over the pairs (a, b) of ``tokens``, p(b | a) = (count(a b) + 1) / (count(a ·) + vocab_size).

    Pairs are counted sparsely (one int64 key per distinct pair), so a 50,257-token vocabulary costs the
    number of distinct pairs in the train split, not vocab_size squared.
    """
    train = np.asarray(train, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    keys, pair_counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    context_counts = np.bincount(train[:-1], minlength=vocab_size)
    wanted = tokens[:-1] * vocab_size + tokens[1:]
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    counts = np.where(keys[at] == wanted, pair_counts[at], 0)
    log_p = np.log(counts + 1.0) - np.log(context_counts[tokens[:-1]] + vocab_size)
    return float(-log_p.mean())
