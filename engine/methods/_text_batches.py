"""Methods that run one forward (and maybe one backward) per batch of whole clean texts: the
attention methods and LRP. Each text is one "call" work item; the method's batch function receives the
batch's texts and returns one fields dict per text (its own forward also scores the clean text, so
these methods need no separate clean pass).

Causal LMs pack texts of any length end to end (block-causal rows, no padding, as the clean pass);
classifiers (bidirectional) and `prefix_reuse=False` stack texts of equal length.
"""

from __future__ import annotations

import torch

from ..runtime.attention_capture import fused_attention
from ..runtime.context import ModelContext
from ..runtime.forward import Suffix, head_logits, packed_suffix_forward, read_logits, score_logits
from ..runtime.types import CallPayload, Work, call_group
from ._base import PreparedText


def text_work(ctx: ModelContext, p: PreparedText, batch_fn, opts) -> Work:
    """`p` as the input of `batch_fn(context, [(text, options), ...])`, batched with texts of the same
    options (and, where texts stack, the same length)."""
    n = len(p.input_ids)
    shape = "packed" if ctx.packs_texts else n
    return Work(call_group(batch_fn, opts, shape, shares_rows=ctx.packs_texts), n, CallPayload((p, opts)))


def clean_forward(ctx: ModelContext, batch: list[PreparedText], slices: list, embeds_fn=None):
    """One forward of the clean texts of `batch`; returns the logits read (one row per text).

    `slices` receives, before the forward starts (hooks running inside it may read it), each text's
    (row, first key column, first query column) in the forward's layout, so a per-text block of
    anything the forward produces is `x[row, query : query + n, key : key + n]`. `embeds_fn(ids)`,
    when given, makes the input embeddings (for methods that differentiate w.r.t. them)."""
    model = ctx.model
    if ctx.packs_texts:
        suffixes = [Suffix(0, 0, p.input_ids) for p in batch]
        hidden = packed_suffix_forward(model, [], suffixes, ctx.row_capacity, layout=slices, embeds_fn=embeds_fn)
        return head_logits(model, hidden)
    slices.extend((t, 0, 0) for t in range(len(batch)))
    ids = torch.tensor([p.input_ids for p in batch], device=model.device)
    inputs = {"input_ids": ids} if embeds_fn is None else {"inputs_embeds": embeds_fn(ids)}
    return read_logits(model, ctx.kind, inputs, batch[0].read_pos)


def score(batch: list[PreparedText], logits):
    return score_logits(logits, [p.target_id for p in batch], need_prob=True)


def text_block(x, where: tuple[int, int, int], n: int):
    row, key_at, query_at = where
    return x[row, query_at : query_at + n, key_at : key_at + n]


def scored_fields(batch: list[PreparedText], scores) -> list[dict]:
    """The clean-text fields a self-scoring method returns: target (the given one or the argmax),
    its probability and logit."""
    return [
        {
            "target_id": int(scores.argmax[b]) if p.target_id is None else p.target_id,
            "target_prob": float(scores.prob[b].detach()),
            "target_logit": float(scores.logit[b].detach()),
        }
        for b, p in enumerate(batch)
    ]


def fused_attention_blocks(ctx: ModelContext, batch: list[PreparedText], head_fusion: str, layers=None):
    """Per text of `batch`, its head-fused attention (n, n) at each layer (or only `layers`), from one
    forward whose probabilities are fused as each layer produces them (`runtime.attention_capture`);
    and the clean-text fields of that same forward (each text's target, probability, logit)."""
    blocks = [dict() for _ in batch]
    slices: list = []

    def sink(layer, fused):
        if layers is None or layer in layers:
            for t, p in enumerate(batch):
                blocks[t][layer] = text_block(fused, slices[t], len(p.input_ids))

    with torch.no_grad(), fused_attention(ctx.model, head_fusion, sink, maps=ctx.attention_maps):
        logits = clean_forward(ctx, batch, slices)
    return [[b[layer] for layer in sorted(b)] for b in blocks], scored_fields(batch, score(batch, logits))


def embeds_requiring_grad(ctx: ModelContext, holder: dict):
    """An `embeds_fn` for `clean_forward` that keeps the embeddings it makes (leaves requiring grad)."""

    def embeds_fn(ids):
        holder["embeds"] = ctx.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        return holder["embeds"]

    return embeds_fn


def only_output(ctx, p, opts, outputs: list) -> dict:
    """The reduce step of a method whose batch function already returns the text's fields."""
    (fields,) = outputs
    return fields
