"""Statistics of a variant study that say what they can: paired differences to a reference variant by
seed with t-based 95% intervals, the design's detection limit, and n-gram reference losses.

Runs with the same seed share their data order and evaluation tokens, so the difference between two
variants is taken seed by seed (a paired design): the seed-to-seed spread that both share cancels.
scipy is not a dependency; Student's t quantile is found by integrating the density numerically.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

CONFIDENCE = 0.95
POWER = 0.8  # the detection limit: the true difference an interval excludes zero for in 80% of studies


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    grid = np.linspace(0.0, x, 4001)  # an even number of intervals
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
    weights = np.ones_like(grid)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    return 0.5 + float((weights * density).sum()) * (x / 4000) / 3


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` >= 1 degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> dict[str, float | int | str]:
    """Mean of ``values[s] - reference[s]`` over the seeds both have, with its t-based 95% interval.

    ``detection_limit`` is the smallest true difference this design finds (interval excluding zero) with
    80% power, if the paired spread is what was observed: (t_0.975 + t_0.8) * sd / sqrt(n).
    """
    seeds = sorted(set(values) & set(reference))
    diffs = [values[s] - reference[s] for s in seeds]
    n = len(diffs)
    row: dict[str, float | int | str] = {"seeds": n, "mean_diff": statistics.fmean(diffs) if diffs else math.nan}
    if n < 2:
        return {**row, "sd_diff": "", "low": "", "high": "", "detection_limit": "", "verdict": "too few seeds"}
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * se
    mean = float(row["mean_diff"])
    low, high = mean - half, mean + half
    verdict = "lower" if high < 0 else "higher" if low > 0 else "no difference shown"
    limit = (t_quantile(0.5 + CONFIDENCE / 2, n - 1) + t_quantile(POWER, n - 1)) * se
    return {**row, "sd_diff": sd, "low": low, "high": high, "detection_limit": limit, "verdict": verdict}


def ngram_references(train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Validation loss (nats/token) of a unigram and an interpolated bigram count model of ``train``.

    The unigram is add-one smoothed; the bigram mixes its counts with the unigram, the weight chosen on
    the last 10% of the training tokens (counted from the first 90%), never on the validation split.
    Pairs are counted sparsely (a * V + b), so a 50,257-token vocabulary needs no V x V table.
    """
    train = np.asarray(train, dtype=np.int64)
    val = np.asarray(val, dtype=np.int64)
    cut = int(len(train) * 0.9)
    best = min(np.linspace(0.05, 0.95, 19), key=lambda lam: _bigram_loss(train[:cut], train[cut:], vocab_size, lam))
    return {
        "unigram": _unigram_loss(train, val, vocab_size),
        "bigram": _bigram_loss(train, val, vocab_size, float(best)),
        "bigram_weight": float(best),
    }


def _unigram_probs(train: np.ndarray, vocab_size: int) -> np.ndarray:
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    return counts / counts.sum()


def _unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    return float(-np.log(_unigram_probs(train, vocab_size)[val[1:]]).mean())


def _bigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int, weight: float) -> float:
    unigram = _unigram_probs(train, vocab_size)
    pairs, pair_counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    context_counts = np.bincount(train[:-1], minlength=vocab_size)
    query = val[:-1] * vocab_size + val[1:]
    at = np.minimum(np.searchsorted(pairs, query), len(pairs) - 1)
    seen = np.where(pairs[at] == query, pair_counts[at], 0)
    context = context_counts[val[:-1]]
    bigram = np.divide(seen, context, out=np.zeros(len(query)), where=context > 0)
    return float(-np.log(weight * bigram + (1 - weight) * unigram[val[1:]]).mean())
