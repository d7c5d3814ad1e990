"""Small formulas on score vectors, shared by the reference, the facade and the reports (one copy each)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def min_max_normalize(scores: np.ndarray) -> np.ndarray:
    """The seed's normalization to [0, 1]; a constant vector becomes all zeros."""
    scores = np.asarray(scores, dtype=np.float64)
    lo, hi = scores.min(), scores.max()
    if hi > lo:
        return (scores - lo) / (hi - lo)
    return np.zeros_like(scores)


def rank_tokens(scores: np.ndarray) -> np.ndarray:
    """Token indices from most to least important.

    Ties are broken by position (earlier token first), so equal scores never get an order from an
    accident of the sort algorithm.
    """
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    return rank_tokens(scores)[:k]


def spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Spearman's rho and its p-value (scipy); NaN when either vector is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    result = stats.spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)
