"""Leave-one-out (the seed's): each token replaced by the replacement token in turn; its score is the
drop in the target's probability."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import register
from ._base import Method, perturbation_work, replaced


@dataclass(frozen=True)
class LeaveOneOutOptions:
    pass


def expand(ctx, p, opts):
    fill = ctx.replacement_id
    return [perturbation_work(ctx, p, replaced(p.input_ids, [i], fill), True) for i in range(len(p.input_ids))]


def reduce(ctx, p, opts, outputs) -> dict:
    return {"scores": np.array([p.target_prob - o.prob for o in outputs])}


def reference(model, tokenizer, text, *, target_id, read_pos, options):
    from ..reference import leave_one_out_attribution

    return leave_one_out_attribution(model, tokenizer, text, target_id=target_id)[0]


register(Method("leave_one_out", LeaveOneOutOptions, expand, reduce, reference, order=4, perturbs_clean_text=True))
