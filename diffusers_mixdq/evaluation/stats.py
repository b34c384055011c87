"""The statistics behind ``mixdq eval``: per-image summaries, bootstrap intervals and paired tests.

Pure functions of numbers (numpy and the standard library only), each tested against cases with known answers
(``tests/test_metrics.py``):

* :func:`percentile` - linear interpolation that stays sane with infinite values (an image identical to its
  reference has an infinite PSNR);
* :func:`bootstrap_ci` - percentile bootstrap interval of a mean (of a proportion, with booleans; of a paired
  difference, with ``a - b``), seeded;
* :func:`mcnemar_exact` - McNemar's test on paired booleans: an exact two-sided binomial test on the discordant
  pairs;
* :func:`wilcoxon_signed_rank` - Wilcoxon's signed-rank test on paired values: the exact null distribution for up
  to :data:`EXACT_MAX_N` non-zero differences without ties, else the normal approximation with the tie correction
  (zeros dropped, as ``scipy.stats.wilcoxon``'s default ``zero_method="wilcox"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: Wilcoxon's test uses the exact null distribution up to this many non-zero differences (when none are tied)
EXACT_MAX_N = 50


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated between order statistics.

    Unlike ``numpy.percentile``, interpolating between two infinite values gives infinity rather than NaN, so a
    median or 10th percentile of PSNRs where some images equal their reference is well defined. NaN when empty."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        return math.nan
    pos = (v.size - 1) * q / 100.0
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    if v[lo] == v[hi]:
        return float(v[lo])
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def bootstrap_ci(values: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (``resamples`` resamples with replacement, drawn with
    ``numpy.random.default_rng(seed)``). Booleans give an interval of a proportion; ``a - b`` of paired values, an
    interval of the mean paired difference."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    return percentile(means, tail), percentile(means, 100 - tail)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` trials with probability 1/2 (twice the smaller tail,
    at most 1); 1 when ``n == 0``."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class McNemar:
    """McNemar's test of paired booleans ``a``, ``b``: ``only_a`` pairs where only ``a`` is true, ``only_b`` where
    only ``b`` is; ``p_value`` exact (binomial on the ``only_a + only_b`` discordant pairs)."""

    only_a: int
    only_b: int
    p_value: float


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """McNemar's exact test: are ``a`` and ``b`` (paired booleans, e.g. "image ``i`` aligned") true equally often?"""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"paired values differ in length: {x.size} and {y.size}")
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    return McNemar(only_a, only_b, binomial_two_sided(only_a, only_a + only_b))


@dataclass(frozen=True)
class Wilcoxon:
    """Wilcoxon's signed-rank test of paired ``x``, ``y``. ``statistic``: the smaller of the rank sums of the
    positive and negative differences (as ``scipy.stats.wilcoxon`` reports it, two-sided); ``n``: non-zero
    differences; ``exact``: the exact null distribution was used; ``rank_biserial``: the matched-pairs
    rank-biserial correlation ``(W+ - W-) / (W+ + W-)`` in [-1, 1] (positive: ``x`` tends to be larger);
    ``median_difference``: median of ``x - y`` over all pairs."""

    statistic: float
    p_value: float
    n: int
    exact: bool
    rank_biserial: float
    median_difference: float


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (ties get their average rank); infinite values rank highest."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, dtype=np.float64)
    start = 0
    while start < values.size:
        end = start
        while end + 1 < values.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _signed_rank_counts(n: int) -> list[int]:
    """How many of the ``2**n`` sign patterns of ranks 1..n give each positive-rank sum 0..n(n+1)/2."""
    counts = [1] + [0] * (n * (n + 1) // 2)
    for r in range(1, n + 1):
        for s in range(len(counts) - 1, r - 1, -1):
            counts[s] += counts[s - r]
    return counts


def _paired_differences(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.size} and {b.size}")
    with np.errstate(invalid="ignore"):
        d = a - b
    return np.where(np.isnan(d) & (a == b), 0.0, d)  # inf - inf: the pair is equal


def wilcoxon_signed_rank(x: Sequence[float], y: Sequence[float]) -> Wilcoxon:
    """Two-sided Wilcoxon signed-rank test of the paired samples ``x`` and ``y`` (e.g. per-image PSNRs of two
    variants on the same prompts and seeds). Zero differences are dropped; p is 1 when none are left."""
    d_all = _paired_differences(x, y)
    if np.isnan(d_all).any():
        raise ValueError("paired values contain NaN")
    median_difference = percentile(d_all, 50)
    d = d_all[d_all != 0]
    n = int(d.size)
    if n == 0:
        return Wilcoxon(0.0, 1.0, 0, True, 0.0, median_difference)
    ranks = _ranks(np.abs(d))
    w_plus, w_minus = float(ranks[d > 0].sum()), float(ranks[d < 0].sum())
    statistic = min(w_plus, w_minus)
    ties = np.unique(np.abs(d), return_counts=True)[1]
    exact = n <= EXACT_MAX_N and bool((ties == 1).all())
    if exact:
        counts = _signed_rank_counts(n)
        p = min(1.0, 2 * sum(counts[: int(statistic) + 1]) / 2**n)
    else:
        mean = n * (n + 1) / 4
        var = n * (n + 1) * (2 * n + 1) / 24 - float((ties**3 - ties).sum()) / 48
        z = (w_plus - mean) / math.sqrt(var) if var > 0 else 0.0
        p = min(1.0, math.erfc(abs(z) / math.sqrt(2)))
    return Wilcoxon(statistic, p, n, exact, (w_plus - w_minus) / (w_plus + w_minus), median_difference)
