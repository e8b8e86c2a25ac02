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
        blank = dict.fromkeys(
            ("sd_diff", "low", "high", "detection_limit", "p_value", "unpaired_low", "unpaired_high"), ""
        )
        return {**row, **blank, "seed_correlation": "", "verdict": "too few seeds"}
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * se
    mean = float(row["mean_diff"])
    low, high = mean - half, mean + half
    verdict = "lower" if high < 0 else "higher" if low > 0 else "no difference shown"
    limit = (t_quantile(0.5 + CONFIDENCE / 2, n - 1) + t_quantile(POWER, n - 1)) * se
    p_value = 1.0 if se == 0 and mean == 0 else 0.0 if se == 0 else 2 * (1 - t_cdf(abs(mean) / se, n - 1))
    return {
        **row,
        "sd_diff": sd,
        "low": low,
        "high": high,
        "detection_limit": limit,
        "verdict": verdict,
        "p_value": p_value,
        **unpaired_interval([values[s] for s in seeds], [reference[s] for s in seeds]),
    }


def unpaired_interval(mine: list[float], theirs: list[float]) -> dict[str, float]:
    """The same difference as if the seeds were not matched (Welch's t interval), and the seeds'
    correlation r: pairing narrows the interval only when r > 0 (var(a - b) = var a + var b - 2 cov)."""
    va, vb = statistics.variance(mine), statistics.variance(theirs)
    na, nb = len(mine), len(theirs)
    se = math.sqrt(va / na + vb / nb)
    df = (va / na + vb / nb) ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1)) if se > 0 else na - 1
    half = t_quantile(0.5 + CONFIDENCE / 2, max(1, int(df))) * se  # df rounded down: the wider interval
    mean = statistics.fmean(mine) - statistics.fmean(theirs)
    corr = statistics.correlation(mine, theirs) if va > 0 and vb > 0 else math.nan
    return {"unpaired_low": mean - half, "unpaired_high": mean + half, "seed_correlation": corr}


def holm(rows: list[dict], alpha: float = 1 - CONFIDENCE) -> list[dict]:
    """Holm's step-down correction across a suite's comparisons (rows with a ``p_value``): sorted by p,
    the i-th smallest (0-based) of m is significant if p <= alpha / (m - i) and all smaller ones were.
    Adds ``p_holm`` (the adjusted p-value, monotone) and ``holm_significant`` to each row."""
    tested = sorted((r for r in rows if r.get("p_value", "") != ""), key=lambda r: r["p_value"])
    m, running = len(tested), 0.0
    for i, row in enumerate(tested):
        running = max(running, min(1.0, (m - i) * row["p_value"]))
        row["p_holm"] = running
        row["holm_significant"] = running <= alpha
    for row in rows:
        row.setdefault("p_holm", "")
        row.setdefault("holm_significant", "")
    return rows
