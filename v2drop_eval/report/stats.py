"""Uncertainty of benchmark scores from per-item results: intervals and paired comparisons.

A 300-item benchmark at 90% accuracy has a binomial standard error of about 1.7 points, so two
methods 0.4 points apart are a tie. Every figure here is computed from the per-item scores that
lmms-eval logs with ``--log_samples``:

- :func:`mean_interval`: the percentile bootstrap 95% interval of the mean score.
- :func:`paired_difference`: the mean of ``a - b`` over the items both methods answered, with its
  paired bootstrap 95% interval (items resampled together, so per-item difficulty cancels).
- :func:`mcnemar_p`: the exact McNemar test for 0/1 scores (two-sided binomial on the discordant items).
- :func:`median_interval`: the median with its percentile bootstrap 95% interval (the bench's paired
  timing ratios, where one slow outlier must not move the figure).

Bootstraps use a fixed seed, so tables rebuild identically.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["mean_interval", "median_interval", "paired_difference", "mcnemar_p", "RESAMPLES", "LEVEL"]

RESAMPLES = 2000
LEVEL = 0.95


def _bootstrap(values: np.ndarray, seed: int, statistic) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(RESAMPLES, len(values)))
    return statistic(values[idx], axis=1)


def _interval(values: np.ndarray, seed: int, statistic) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    lo, hi = np.quantile(_bootstrap(values, seed, statistic), [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(statistic(values)), float(lo), float(hi)


def mean_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``values`` with the 95% percentile bootstrap interval; NaNs if empty."""
    return _interval(values, seed, np.mean)


def median_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """``(median, low, high)`` of ``values`` with the 95% percentile bootstrap interval; NaNs if empty."""
    return _interval(values, seed, np.median)


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """``(mean(a - b), low, high)`` over paired items with the 95% paired bootstrap interval."""
    return mean_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), seed)


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Exact two-sided McNemar p-value for paired 0/1 scores; None unless every score is 0 or 1."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        return None
    only_a = int(((a == 1) & (b == 0)).sum())
    only_b = int(((a == 0) & (b == 1)).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)
