"""Plan: the perturbations every metric needs for one text, as work items, deduplicated.

Identical perturbed sequences of one text (the same top-k set chosen by two methods, the fully deleted
text of every curve) are one work item; `TextPlan.refs[method]` says which item each metric reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import metrics
from ..methods._base import PreparedText, perturbation_work, replaced, zeroed_work
from ..options import resolve_k
from ..runtime.context import ModelContext
from ..runtime.types import Work

DELETIONS = ("replacement", "zero_embedding")


@dataclass
class TextPlan:
    """One text's unique perturbations (`work`) and, per method, the work index each metric reads."""

    p: PreparedText
    work: list[Work] = field(default_factory=list)
    refs: dict[str, dict] = field(default_factory=dict)  # method -> ("suff", k) / ("comp", k) / "morf" / "lerf"
    _index: dict[tuple, int] = field(default_factory=dict)

    def replaced(self, ctx: ModelContext, positions) -> int:
        """Work index of the text with `positions` replaced by the replacement token."""
        positions = tuple(sorted(set(int(i) for i in positions)))
        key = ("replacement", positions)
        if key not in self._index:
            ids = replaced(self.p.input_ids, positions, ctx.replacement_id)
            self._add(key, perturbation_work(ctx, self.p, ids, True))
        return self._index[key]

    def deleted(self, ctx: ModelContext, positions, deletion: str) -> int:
        """Work index of the text with `positions` deleted the curves' way (`deletion`)."""
        if deletion == "replacement":
            return self.replaced(ctx, positions)
        positions = tuple(sorted(set(int(i) for i in positions)))
        key = ("zero", positions)
        if key not in self._index:
            self._add(key, zeroed_work(self.p, positions))
        return self._index[key]

    def _add(self, key, work: Work) -> None:
        self._index[key] = len(self.work)
        self.work.append(work)


def curve_counts(m: int, steps: int) -> list[int]:
    """Tokens deleted at each of the `steps` + 1 evenly spaced fractions 0, 1/steps, ..., 1 of the m
    perturbable tokens (rounded; on a short text several points delete the same tokens and run once)."""
    return [int(math.floor(j / steps * m + 0.5)) for j in range(steps + 1)]


def plan_text(
    ctx: ModelContext,
    p: PreparedText,
    scores_by_method: dict[str, np.ndarray],
    ks,
    curves: bool,
    curve_steps: int,
    deletion: str,
    protect_target: bool,
) -> TextPlan:
    """Every perturbation the metrics of `p` need, for each method's scores."""
    plan = TextPlan(p)
    n = len(p.input_ids)
    perturbable = [j for j in range(n) if not (protect_target and j == p.read_pos)]
    counts = curve_counts(len(perturbable), curve_steps)
    for m, scores in scores_by_method.items():
        order = metrics.rank_tokens(scores)
        refs = {}
        for k in ks:
            top = order[: resolve_k(k, n)].tolist()
            refs[("suff", str(k))] = plan.replaced(ctx, [j for j in range(n) if j not in set(top)])
            refs[("comp", str(k))] = plan.replaced(ctx, top)
        if curves:
            sub = np.asarray(perturbable, dtype=int)
            morf = sub[metrics.rank_tokens(scores[sub])]
            lerf = sub[metrics.rank_tokens(-scores[sub])]
            refs["morf"] = [plan.deleted(ctx, morf[:c], deletion) if c else None for c in counts]
            refs["lerf"] = [plan.deleted(ctx, lerf[:c], deletion) if c else None for c in counts]
        plan.refs[m] = refs
    return plan
