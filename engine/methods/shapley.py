"""Exact Shapley values (Shapley 1953) of the text's tokens: every one of the 2^n coalitions is evaluated
(each distinct sequence once, batched with the other texts' work), then
phi_i = sum over S not holding i of |S|! (n - |S| - 1)! / n! (v(S + i) - v(S)).
Refused above `MAX_TOKENS` tokens: use `shapley_sampling` or `kernel_shap` there."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import register
from ._base import Method
from ._coalitions import CoalitionPlan, check_value, mask_bits, plan_values

MAX_TOKENS = 14  # 2^14 = 16384 coalitions per text


@dataclass(frozen=True)
class ShapleyOptions:
    value: str = "prob"  # "prob", "logit" or "log_prob" of the target at the read position

    def __post_init__(self):
        check_value(self.value)


def check_text(p, opts) -> None:
    if len(p.tokens) > MAX_TOKENS:
        raise ValueError(
            f"shapley evaluates all 2^n coalitions: the text has {len(p.tokens)} tokens, at most {MAX_TOKENS} "
            "are allowed; use shapley_sampling or kernel_shap for longer texts"
        )


def exact_weights(n: int) -> np.ndarray:
    """w[s] = s! (n - s - 1)! / n!, the weight of a coalition of size s not holding the token."""
    return np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])


def shapley_from_values(values: np.ndarray, n: int) -> np.ndarray:
    """Exact Shapley values from v over all 2^n coalitions (index = bit mask, bit i = token i present)."""
    masks = np.arange(2**n)
    sizes = np.bitwise_count(masks) if hasattr(np, "bitwise_count") else mask_bits(masks, n).sum(1)
    weights = exact_weights(n)
    phi = np.zeros(n)
    for i in range(n):
        without = masks[(masks >> i) & 1 == 0]
        phi[i] = np.sum(weights[sizes[without]] * (values[without | (1 << i)] - values[without]))
    return phi


def expand(ctx, p, opts):
    return _plan(ctx, p)[0].work


def _plan(ctx, p):
    n = len(p.input_ids)
    plan = CoalitionPlan(ctx, p)
    present = mask_bits(np.arange(2**n), n)
    return plan, np.array([plan.of(row) for row in present])


def reduce(ctx, p, opts, outputs) -> dict:
    plan, indices = _plan(ctx, p)
    values = plan_values(indices, outputs, opts.value)
    return {"scores": shapley_from_values(values, len(p.input_ids)), "n_evaluations": len(plan.work)}


def reference(model, tokenizer, text, *, target_id, read_pos, options: ShapleyOptions):
    from ..reference.shapley import shapley_values

    return shapley_values(model, tokenizer, text, target_id=target_id, value=options.value)


register(
    Method(
        "shapley",
        ShapleyOptions,
        expand,
        reduce,
        reference,
        order=7,
        check_text=check_text,
        default=False,
        perturbs_clean_text=True,
    )
)
