"""What the Shapley methods share: the value of a coalition (the tokens present; the absent ones replaced
by the replacement token, length and positions unchanged, as leave-one-out), its options, and the plan
that turns coalitions into work items, each distinct sequence once."""

from __future__ import annotations

import math

import numpy as np

from ..options import check_choice
from ..runtime.context import ModelContext
from ..runtime.types import ForwardOutput, Work
from ._base import PreparedText, perturbation_work, replaced

VALUES = ("prob", "logit", "log_prob")


def check_value(value: str) -> None:
    check_choice("value", value, VALUES)


def value_of(out: ForwardOutput, value: str) -> float:
    """A coalition's value: the target's probability, logit or log-probability at the read position."""
    if value == "prob":
        return out.prob
    if value == "logit":
        return out.logit
    return math.log(out.prob) if out.prob > 0 else -math.inf


class CoalitionPlan:
    """The distinct perturbed sequences of one text's coalitions, as work (clean-prefix reuse applies:
    a coalition runs from its first absent token over the clean text's cache)."""

    def __init__(self, ctx: ModelContext, p: PreparedText):
        self.ctx, self.p = ctx, p
        self.work: list[Work] = []
        self._index: dict[bytes, int] = {}

    def of(self, present: np.ndarray) -> int:
        """Work index of the coalition `present` (bool per token)."""
        key = np.packbits(present).tobytes()
        if key not in self._index:
            absent = np.flatnonzero(~present).tolist()
            ids = replaced(self.p.input_ids, absent, self.ctx.replacement_id)
            self._index[key] = len(self.work)
            self.work.append(perturbation_work(self.ctx, self.p, ids, need_prob=True))
        return self._index[key]


def mask_bits(masks: np.ndarray, n: int) -> np.ndarray:
    """(m,) integer masks -> (m, n) bool: bit i set = token i present."""
    return ((masks[:, None] >> np.arange(n)) & 1).astype(bool)


def plan_values(plan_work_indices: np.ndarray, outputs: list, value: str) -> np.ndarray:
    """The values of the coalitions, in the order their work indices are given (float64)."""
    per_work = np.array([value_of(o, value) for o in outputs], dtype=np.float64)
    return per_work[plan_work_indices]
