"""Statistics for paired multiple-choice results: bootstrap intervals and the exact McNemar test.

Every method answers the same items, so comparisons are paired: the difference of two methods is
resampled item by item (one bootstrap draw picks the same items for both), and McNemar's exact test
looks only at the items where exactly one of the two is right.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
LEVEL = 0.95


def _resampled_means(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of `resamples` bootstrap resamples of `values` [n] (drawn in blocks to bound memory)."""
    n = len(values)
    out = np.empty(resamples)
    block = max(1, min(resamples, 2_000_000 // max(n, 1)))
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        out[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def bootstrap_interval(values, rng: np.random.Generator, *, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (per-item scores, e.g. 0/1 correct)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    means = _resampled_means(values, rng, resamples)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes `a` and `b` of the same items.

    With n01 items only `a` got right and n10 only `b`, under the null each discordant item is a fair
    coin: p = min(1, 2 P[Binomial(n01 + n10, 1/2) <= min(n01, n10)]); 1 when there is no discordant item.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes of different lengths: {a.shape} and {b.shape}")
    n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(n01, n10) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # exact integers until the one division


def paired_comparison(a, b, rng: np.random.Generator, *, resamples: int = BOOTSTRAP_RESAMPLES,
                      level: float = LEVEL) -> dict:
    """mean(a) - mean(b) for paired per-item outcomes, its bootstrap interval and McNemar's exact p."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes of different lengths: {a.shape} and {b.shape}")
    if a.size == 0:
        return dict(difference=None, low=None, high=None, p_mcnemar=None, items=0, only_a=0, only_b=0)
    lo, hi = bootstrap_interval(a - b, rng, resamples=resamples, level=level)
    return dict(difference=float(np.mean(a - b)), low=lo, high=hi, p_mcnemar=mcnemar_exact(a > 0.5, b > 0.5),
                items=int(a.size), only_a=int(np.sum((a > 0.5) & (b < 0.5))),
                only_b=int(np.sum((a < 0.5) & (b > 0.5))))
