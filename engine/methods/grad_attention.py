"""Attention x gradient (the seed's): mean over layers and heads of A * d logit / dA, the row of the
read position; one forward and one backward per batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.common import upcast

from ..models import eager_attention
from ..runtime.attention_capture import attention_modules
from ..runtime.runner import frozen_weights
from . import register
from ._base import Method
from ._text_batches import (
    clean_forward,
    embeds_requiring_grad,
    only_output,
    score,
    scored_fields,
    text_block,
    text_work,
)


@dataclass(frozen=True)
class GradAttentionOptions:
    pass


def _gradient_weighted_blocks(ctx, batch):
    """Per text, mean over layers and heads of A * dlogit/dA, (n, n). Texts are independent, so the
    gradient of the sum of every text's target logit gives each its own gradient w.r.t. every layer's
    attention; the probabilities are taken from the attention modules by scoped hooks."""
    model = ctx.model
    probs, slices = [], []

    def keeper(index):
        return lambda module, args, output: probs.append(output[index])

    handles = [module.register_forward_hook(keeper(index)) for module, index in attention_modules(model)]
    try:
        with eager_attention(model), frozen_weights(model), torch.enable_grad():
            scores = score(batch, clean_forward(ctx, batch, slices, embeds_requiring_grad(ctx, {})))
            grads = torch.autograd.grad(scores.logit.sum(), probs)
    finally:
        for handle in handles:
            handle.remove()
    weighted = torch.stack([upcast(a * g).mean(dim=1) for a, g in zip(probs, grads, strict=True)]).mean(0)
    weighted = weighted.detach().cpu().numpy()
    return [text_block(weighted, where, len(p.input_ids)) for p, where in zip(batch, slices, strict=True)], scores


def run_batch(ctx, inputs) -> list[dict]:
    batch = [p for p, _ in inputs]
    matrices, scores = _gradient_weighted_blocks(ctx, batch)
    return [
        {"scores": matrix[p.read_pos], "matrix": matrix, **fields}
        for p, matrix, fields in zip(batch, matrices, scored_fields(batch, scores), strict=True)
    ]


def expand(ctx, p, opts):
    return [text_work(ctx, p, run_batch, opts)]


def reference(model, tokenizer, text, *, target_id, read_pos, options):
    from ..reference import gradient_weighted_attention

    return gradient_weighted_attention(model, tokenizer, text, read_pos, target_id=target_id)[0][read_pos]


register(Method("grad_attention", GradAttentionOptions, expand, only_output, reference, order=2, scores_itself=True))
