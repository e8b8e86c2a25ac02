"""Count models, the reference points that give a validation loss its meaning.

A unigram model predicts every token from its frequency alone (no context at all); a bigram model
from the one token before it. A language model that does not beat the unigram's loss has learned
nothing but token frequencies; one that beats the bigram's uses more than one token of context.

Both are estimated from the train split's counts with add-one (Laplace) smoothing, so that every
token of the vocabulary has a probability and an unseen validation token costs a finite loss. Both
score the targets ``tokens[1:]`` of a validation stream (the first token has nothing before it), in
mean nats per token, like a model's loss on the same stream.

The study's references are stronger: interpolated Witten-Bell n-gram models for n = 1..5
(:class:`WittenBell`, :func:`ngram_references`), scored window by window exactly as the study scores a
GPT, so a target at window position p uses at most the p + 1 tokens of its window before it.
Witten-Bell (Witten & Bell 1991; the interpolated form as in Chen & Goodman 1998) needs no tuned
discount: for a history h of length k,

    P_k(w | h) = (c(h w) + N1+(h ·) P_{k-1}(w | h')) / (c(h ·) + N1+(h ·)),

h' = h without its oldest token, c(h ·) = sum over w of c(h w), N1+(h ·) = the number of distinct w
seen after h; a history never seen in training backs off entirely, P_k = P_{k-1}; the recursion ends
in the uniform 1 / vocab_size, so every token has a probability.
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


def ngram_references(train: np.ndarray, val: np.ndarray, vocab_size: int, context: int, max_order: int = 5):
    """The study's reference lines: Witten-Bell n-gram losses, n = 1..max_order, counted on ``train`` and
    scored on the study's evaluation tokens ``val`` in its windows of ``context`` (see
    :func:`windowed_ngram_losses`); nothing is tuned on the validation split (Witten-Bell has no parameter)."""
    return windowed_ngram_losses(train, val, vocab_size, context, max_order)


class WittenBell:
    """Interpolated Witten-Bell n-gram counts of ``train`` up to order ``order``.

    N-grams are numbered order by order without ever forming a vocab_size ** n key: the j-gram ending at
    position i is the rank of ``id(j-1-gram ending at i-1) * vocab_size + token[i]`` among the distinct
    such keys of the train split, which fits in int64 for any vocabulary the study uses.
    """

    def __init__(self, train: np.ndarray, vocab_size: int, order: int = 5) -> None:
        self.vocab_size, self.order = vocab_size, order
        train = np.asarray(train, dtype=np.int64)
        self.keys: list[np.ndarray] = [np.arange(vocab_size, dtype=np.int64)]  # unigram ids are the tokens
        self.counts: list[np.ndarray] = [np.bincount(train, minlength=vocab_size)]
        ids = train  # ids[i]: the j-gram ending at train position i + j - 1
        for _ in range(1, order):
            keys, inverse, counts = np.unique(ids[:-1] * vocab_size + train[len(train) - len(ids) + 1 :],
                                              return_inverse=True, return_counts=True)  # fmt: skip
            self.keys.append(keys)
            self.counts.append(counts)
            ids = inverse.astype(np.int64)
        # per history (a (j-1)-gram id): c(h .) and N1+(h .), from the j-grams that extend it
        self.history_total = [np.array([len(train)])] + [
            np.bincount(k // vocab_size, weights=c, minlength=len(prev)) for k, c, prev in
            zip(self.keys[1:], self.counts[1:], self.keys[:-1], strict=True)
        ]  # fmt: skip
        self.history_types = [np.array([np.count_nonzero(self.counts[0])])] + [
            np.bincount(k // vocab_size, minlength=len(prev))
            for k, prev in zip(self.keys[1:], self.keys[:-1], strict=True)
        ]

    def _lookup(self, tokens: np.ndarray) -> list[np.ndarray]:
        """ids[j-1][i]: the train id of the j-gram of ``tokens`` ending at i, -1 if unseen (or too early)."""
        ids = [tokens.copy()]
        for j in range(1, self.order):
            prev = np.concatenate([[-1], ids[-1][:-1]])  # the (j)-gram ending one token earlier
            wanted = np.where(prev >= 0, prev * self.vocab_size + tokens, -1)
            at = np.minimum(np.searchsorted(self.keys[j], wanted), len(self.keys[j]) - 1)
            ids.append(np.where((wanted >= 0) & (self.keys[j][at] == wanted), at, -1))
        return ids

    def probabilities(self, tokens: np.ndarray) -> np.ndarray:
        """P_k(tokens[i] | the k tokens before it) for k = 0..order-1: shape (order, len(tokens)).
        Row k at positions i < k uses a history that reaches before the stream: it is not meaningful."""
        tokens = np.asarray(tokens, dtype=np.int64)
        ids = self._lookup(tokens)
        prob = np.full(len(tokens), 1.0 / self.vocab_size)
        rows = []
        for k in range(self.order):  # history length k
            if k == 0:
                history = np.zeros(len(tokens), dtype=np.int64)
            else:
                history = np.concatenate([[-1], ids[k - 1][:-1]])
            known = history >= 0
            safe = np.where(known, history, 0)
            total, types = self.history_total[k][safe], self.history_types[k][safe]
            seen = np.where(ids[k] >= 0, self.counts[k][np.maximum(ids[k], 0)], 0)
            mixed = (seen + types * prob) / np.maximum(total + types, 1)
            prob = np.where(known & (total > 0), mixed, prob)
            rows.append(prob)
        return np.stack(rows)


def windowed_ngram_losses(train: np.ndarray, tokens: np.ndarray, vocab_size: int, context: int,
                          max_order: int = 5) -> dict[str, float]:  # fmt: skip
    """Mean loss (nats/token) of the n-gram models n = 1..max_order on ``tokens`` scored as the study
    scores a GPT: non-overlapping windows of ``context`` targets, ``tokens[r*context + p + 1]`` predicted
    at window position p from at most the p + 1 window tokens before it (so the n-gram's history is cut
    at the window's start, like the GPT's)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n_windows = (len(tokens) - 1) // context
    targets = np.arange(1, n_windows * context + 1)
    position = (targets - 1) % context
    probs = WittenBell(train, vocab_size, max_order).probabilities(tokens[: n_windows * context + 1])
    out = {}
    for n in range(1, max_order + 1):
        history = np.minimum(n - 1, position + 1)  # history length the window allows
        out[f"{n}-gram"] = float(-np.log(probs[history, targets]).mean())
    return out
