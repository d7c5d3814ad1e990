"""Layer-wise relevance propagation: AttnLRP (Achtibat et al. 2024) or CP-LRP (Ali et al. 2022), as
gradient x input under the rules of `_lrp_rules`; one forward and one backward per batch, each text
seeded from its own target logit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import check_choice
from ..runtime.runner import frozen_weights
from . import register
from ._base import Method
from ._lrp_rules import LRP_RULES, check_supported, gradient_times_input, lrp_rules
from ._text_batches import clean_forward, embeds_requiring_grad, only_output, score, scored_fields, text_work


@dataclass(frozen=True)
class LRPOptions:
    rule: str = "attnlrp"  # "attnlrp" (Achtibat et al. 2024) or "cplrp" (Ali et al. 2022)

    def __post_init__(self):
        check_choice("rule", self.rule, LRP_RULES)


def check_model(ctx, opts: LRPOptions) -> None:
    check_supported(ctx.model, opts.rule)


def run_batch(ctx, inputs) -> list[dict]:
    """Each text's relevance is cut from its row of the batch; the forward also scores the clean text."""
    batch = [p for p, _ in inputs]
    rule = inputs[0][1].rule
    holder, slices = {}, []
    with frozen_weights(ctx.model), lrp_rules(ctx.model, rule), torch.enable_grad():
        scores = score(batch, clean_forward(ctx, batch, slices, embeds_requiring_grad(ctx, holder)))
        (grad,) = torch.autograd.grad(scores.logit.sum(), holder["embeds"])
    per_token = gradient_times_input(holder["embeds"], grad).cpu().numpy()
    return [
        {"scores": per_token[row, query_at : query_at + len(p.input_ids)], **fields}
        for p, (row, _, query_at), fields in zip(batch, slices, scored_fields(batch, scores), strict=True)
    ]


def expand(ctx, p, opts):
    return [text_work(ctx, p, run_batch, opts)]


def reference(model, tokenizer, text, *, target_id, read_pos, options: LRPOptions):
    from ..reference.lrp import lrp_reference

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return lrp_reference(model, ids, target_id, options.rule, dtype=next(model.parameters()).dtype)[0]


register(
    Method("lrp", LRPOptions, expand, only_output, reference, order=6, scores_itself=True, check_model=check_model)
)
