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


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (scipy); NaN when either vector is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.kendalltau(a, b).statistic)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top-k(a) ∩ top-k(b)| / k, each top-k by `rank_tokens` (ties by position)."""
    k = min(k, len(a))
    return len(set(top_k_indices(a, k).tolist()) & set(top_k_indices(b, k).tolist())) / k


def gini(scores: np.ndarray) -> float:
    """Gini index of |scores| (Hurley & Rickard 2009): 0 when all tokens share the mass equally, -> 1 when
    one token holds all of it. NaN for an all-zero vector (no mass to distribute)."""
    a = np.sort(np.abs(np.asarray(scores, dtype=np.float64)))
    total = a.sum()
    if total == 0:
        return float("nan")
    n = len(a)
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * a).sum() / (n * total))


def normalized_entropy(scores: np.ndarray) -> float:
    """Shannon entropy of |scores| / sum |scores|, divided by log(n): 1 = uniform, 0 = one token.
    0 for a single token; NaN for an all-zero vector."""
    a = np.abs(np.asarray(scores, dtype=np.float64))
    total = a.sum()
    if total == 0:
        return float("nan")
    if len(a) == 1:
        return 0.0
    return float(stats.entropy(a / total) / np.log(len(a)))


def curve_area(values: np.ndarray) -> float:
    """Area under a perturbation curve sampled at evenly spaced fractions 0..1 of the tokens perturbed
    (trapezoid rule, so the area is on the curve's own scale)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 1:
        return float(values[0])
    return float(np.trapezoid(values, dx=1.0 / (len(values) - 1)))


def require_sklearn() -> None:
    """Plausibility's AUPRC is scikit-learn's; checked before any work is done, not after it."""
    try:
        import sklearn.metrics  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "plausibility (rationales) needs scikit-learn: pip install 'attribution-engine[report]' "
            "(or pip install scikit-learn)"
        ) from err


def auprc(rationale: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve of `scores` against a 0/1 human rationale (ferret's
    `AUPRC_PlausibilityEvaluation`: scikit-learn's `precision_recall_curve` and `auc`). NaN when the
    rationale marks no token."""
    from sklearn.metrics import auc, precision_recall_curve

    rationale = np.asarray(rationale, dtype=int)
    if rationale.sum() == 0:
        return float("nan")
    precision, recall, _ = precision_recall_curve(rationale, np.asarray(scores, dtype=np.float64))
    return float(auc(recall, precision))


def token_f1(rationale: np.ndarray, scores: np.ndarray, k: int) -> float:
    """F1 between the top-k tokens (as a 0/1 mask) and a 0/1 human rationale (ferret's token-F1)."""
    rationale = np.asarray(rationale, dtype=bool)
    predicted = np.zeros(len(rationale), dtype=bool)
    predicted[top_k_indices(scores, min(k, len(rationale)))] = True
    tp = int((predicted & rationale).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / predicted.sum(), tp / rationale.sum()
    return float(2 * precision * recall / (precision + recall))


def normalize_token(token: str) -> str:
    """A token's surface form for alignment across texts: byte-level BPE (Ġ), SentencePiece (▁) and
    WordPiece (##) markers stripped, lower-cased."""
    return token.replace("Ġ", "").replace("▁", "").removeprefix("##").strip().lower()


def align_tokens(tokens_a: list[str], tokens_b: list[str]) -> list[tuple[int, int]]:
    """Pairs (i, j) of tokens with the same normalized form, matched left to right: each token of `a`
    takes the first unused equal token of `b`. Tokens with no partner (the paraphrased words) drop out."""
    free: dict[str, list[int]] = {}
    for j, tok in enumerate(tokens_b):
        free.setdefault(normalize_token(tok), []).append(j)
    pairs = []
    for i, tok in enumerate(tokens_a):
        key = normalize_token(tok)
        if key and free.get(key):
            pairs.append((i, free[key].pop(0)))
    return pairs


def sufficiency(p_kept: float, p_clean: float) -> float:
    """The seed's sufficiency: p(target | only the top-k kept) / p(target | the clean text)."""
    return p_kept / p_clean


def comprehensiveness(p_removed: float, p_clean: float) -> float:
    """The seed's comprehensiveness: 1 - p(target | the top-k replaced) / p(target | the clean text)."""
    return 1 - p_removed / p_clean
