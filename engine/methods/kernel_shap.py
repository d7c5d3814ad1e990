"""KernelSHAP (Lundberg & Lee 2017): Shapley values as the weighted least-squares fit of a linear model
to coalition values, under the efficiency constraint sum(phi) = v(all) - v(none).

Sampling (Leverage SHAP's scheme, Musco & Witter 2025): a coalition's size is drawn uniformly from
1..n-1, its tokens uniformly among those of that size, and each draw is paired with its complement;
draws are with replacement and weighted by the Shapley kernel over the sampling probability,
(n - 1) / (s (n - s)). When `n_samples` covers every coalition (2^n - 2 of them, the empty and full
ones excluded) they are all enumerated with the kernel's own weights: the fit is then exactly `shapley`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..options import check_int, normalize
from . import register
from ._base import Method
from ._coalitions import CoalitionPlan, check_value, mask_bits, plan_values


@dataclass(frozen=True)
class KernelShapOptions:
    n_samples: int = 64  # coalitions drawn (rounded up to pairs); all of them when that is fewer
    seed: int = 0
    value: str = "prob"

    def __post_init__(self):
        normalize(self, "n_samples", check_int("n_samples", self.n_samples, minimum=2))
        normalize(self, "seed", check_int("seed", self.seed, minimum=0))
        check_value(self.value)


def coalitions(n: int, n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(coalitions (m, n) bool, regression weights (m,)): all of them with kernel weights, or paired draws."""
    if n < 2:
        return np.zeros((0, n), dtype=bool), np.zeros(0)
    if n_samples >= 2**n - 2:
        present = mask_bits(np.arange(1, 2**n - 1), n)
        sizes = present.sum(1)
        weights = np.array([(n - 1) / (math.comb(n, s) * s * (n - s)) for s in sizes])
        return present, weights
    rng = np.random.default_rng(seed)
    pairs = -(-n_samples // 2)
    rows = []
    for _ in range(pairs):
        size = int(rng.integers(1, n))
        present = np.zeros(n, dtype=bool)
        present[rng.choice(n, size=size, replace=False)] = True
        rows += [present, ~present]
    present = np.array(rows)
    sizes = present.sum(1)
    return present, (n - 1) / (sizes * (n - sizes))


def constrained_fit(present: np.ndarray, weights: np.ndarray, y: np.ndarray, total: float) -> np.ndarray:
    """argmin_phi sum_z w_z (y_z - z . phi)^2 subject to sum(phi) = total, from the KKT system
    (least squares: a rank-deficient sample gives the minimum-norm solution)."""
    n = present.shape[1]
    if n == 1 or len(present) == 0:
        return np.full(n, total / n)
    a = present.astype(np.float64)
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = a.T @ (weights[:, None] * a)
    kkt[:n, n] = kkt[n, :n] = 1.0
    rhs = np.append(a.T @ (weights * y), total)
    return np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]


def _plan(ctx, p, opts):
    n = len(p.input_ids)
    plan = CoalitionPlan(ctx, p)
    empty, full = plan.of(np.zeros(n, dtype=bool)), plan.of(np.ones(n, dtype=bool))
    present, weights = coalitions(n, opts.n_samples, opts.seed)
    return plan, empty, full, present, weights, np.array([plan.of(row) for row in present], dtype=int)


def expand(ctx, p, opts):
    return _plan(ctx, p, opts)[0].work


def reduce(ctx, p, opts, outputs) -> dict:
    plan, empty, full, present, weights, indices = _plan(ctx, p, opts)
    ends = plan_values(np.array([empty, full]), outputs, opts.value)
    y = plan_values(indices, outputs, opts.value) - ends[0] if len(indices) else np.zeros(0)
    phi = constrained_fit(present, weights, y, ends[1] - ends[0])
    return {"scores": phi, "n_evaluations": len(plan.work)}


def reference(model, tokenizer, text, *, target_id, read_pos, options: KernelShapOptions):
    from ..reference.shapley import kernel_shap

    return kernel_shap(
        model, tokenizer, text, options.n_samples, options.seed, target_id=target_id, value=options.value
    )


register(Method("kernel_shap", KernelShapOptions, expand, reduce, reference, order=9, perturbs_clean_text=True))
