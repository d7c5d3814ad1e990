"""Aggregate: running sums over texts, so a corpus's summary needs memory for the sums only."""

from __future__ import annotations

import math

import numpy as np

from .. import metrics

AGREEMENTS = ("spearman", "kendall", "top_k_overlap")


class MethodMeans:
    """Per method, the NaN-aware mean of every numeric metric of its records (NaN where no record
    has a finite value), accumulated record by record with compensated sums."""

    def __init__(self, methods: list[str]):
        self.methods = methods
        self._sums: dict[str, dict[str, list[float]]] = {m: {} for m in methods}  # key -> [sum, compensation]
        self._counts: dict[str, dict[str, int]] = {m: {} for m in methods}
        self._finite: dict[str, dict[str, bool]] = {m: {} for m in methods}
        self._keys: dict[str, list[str]] = {}  # method -> numeric keys, from its first record
        self._n: dict[str, int] = dict.fromkeys(methods, 0)

    def add(self, record: dict) -> None:
        m = record["method"]
        self._n[m] += 1
        if m not in self._keys:
            self._keys[m] = [k for k, v in record.items() if isinstance(v, float) and k != "target_prob"]
        for key in self._keys[m]:
            value = record.get(key, float("nan"))
            if math.isnan(value):
                continue
            total = self._sums[m].setdefault(key, [0.0, 0.0])
            _neumaier_add(total, value)
            self._counts[m][key] = self._counts[m].get(key, 0) + 1
            self._finite[m][key] = self._finite[m].get(key, False) or math.isfinite(value)

    def means(self, consistency: dict[str, list[float]] | None = None) -> dict[str, dict]:
        summary = {}
        for m in self.methods:
            values = {"n_texts": self._n[m]}
            for key in self._keys.get(m, []):
                if self._finite[m].get(key):
                    total = self._sums[m][key]
                    values[key] = (total[0] + total[1]) / self._counts[m][key]
                else:
                    values[key] = float("nan")
            if consistency is not None:
                column = np.array(consistency[m], dtype=np.float64)
                values["consistency"] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
            summary[m] = values
        return summary


def _neumaier_add(total: list[float], value: float) -> None:
    if not (math.isfinite(total[0]) and math.isfinite(value)):  # an infinite mean stays infinite (or NaN)
        total[0] += value
        total[1] = 0.0
        return
    s = total[0] + value
    if abs(total[0]) >= abs(value):
        total[1] += (total[0] - s) + value
    else:
        total[1] += (value - s) + total[0]
    total[0] = s


class Agreement:
    """Spearman, Kendall tau-b and top-k overlap for every pair of methods, averaged over the texts
    where both succeeded; accumulated text by text."""

    def __init__(self, methods: list[str], k: int):
        n = len(methods)
        self.k = k
        self._sums = {name: np.zeros((n, n)) for name in AGREEMENTS}
        self._counts = {name: np.zeros((n, n)) for name in AGREEMENTS}

    def add(self, scores: list) -> None:
        """One text: each method's scores, or None where the method failed on it."""
        n = len(scores)
        for a in range(n):
            for b in range(n):
                if scores[a] is None or scores[b] is None:
                    continue
                values = {
                    "spearman": metrics.spearman(scores[a], scores[b])[0] if a != b else 1.0,
                    "kendall": metrics.kendall(scores[a], scores[b]) if a != b else 1.0,
                    "top_k_overlap": metrics.top_k_overlap(scores[a], scores[b], self.k),
                }
                for name, v in values.items():
                    if not np.isnan(v):
                        self._sums[name][a, b] += v
                        self._counts[name][a, b] += 1

    def means(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                name: np.where(self._counts[name] > 0, self._sums[name] / self._counts[name], np.nan)
                for name in AGREEMENTS
            }
