"""Method runners: prepared texts in, one result dict per text out.

The perturbation methods and integrated gradients expand each text into work items
(`expand_*`), run every item of every text through one `BatchRunner.run` (the scheduler packs them
into token-budgeted batches), and reduce each text's outputs (`reduce_*`) into the fields of an
`Attribution`. The attention methods run equal-length texts together, one forward (and for
`grad_attention` one backward) per batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from kernels.common import upcast

from . import reference as ref
from .batching import FullPayload, IGPayload, SuffixPayload
from .metrics import rank_tokens
from .models import CLASSIFIER
from .scheduler import WorkItem


@dataclass(frozen=True)
class PreparedText:
    index: int  # position in the caller's list
    text: str
    input_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    target_id: int | None  # token id (causal LM) or class index; None until the clean pass predicts it
    target_prob: float = float("nan")  # p(target) on the clean text, from the clean pass
    target_logit: float = float("nan")  # logit(target) on the clean text
    read_pos: int = -1  # the position whose output (causal LM) or whose attention row (classifier) is read


# ------------------------------------------------------------------------------------- work items


def perturbation_item(ex, p: PreparedText, request, index: int, perturbed: list[int], need_prob: bool) -> WorkItem:
    """One perturbed copy of `p` as a work item: a suffix over the clean prefix cache (causal LMs with
    prefix reuse) or a full sequence. A suffix's own tokens are those it recomputes; the runner's
    `batch_cost` adds the cached prefixes its batch's rows hold, and the padding."""
    n = len(perturbed)
    if ex.prefix_reuse:
        start = next((i for i in range(n) if perturbed[i] != p.input_ids[i]), n - 1)
        start = min(start, n - 1)  # an unchanged copy still recomputes the read position
        payload = SuffixPayload(p.index, start, tuple(perturbed[start:]), p.target_id, need_prob)
        return WorkItem(request, index, ("suffix",), n - start, payload)
    return WorkItem(request, index, ("full", n), n, FullPayload(tuple(perturbed), p.target_id, need_prob))


def _replaced(p: PreparedText, positions, fill: int) -> list[int]:
    ids = list(p.input_ids)
    for i in positions:
        ids[i] = fill
    return ids


def run_items(ex, texts: list[PreparedText], expand, desc: str) -> dict:
    """Expand every text, run all items as one workload, return text index -> outputs."""
    requests = {p.index: expand(p) for p in texts}
    return ex.runner.run(requests, {p.index: p.input_ids for p in texts}, desc=desc)


# -------------------------------------------------------------------------------------- the clean pass


def clean_pass(ex, texts: list[PreparedText]) -> list[PreparedText]:
    """Score every clean text once: the prediction, its probability and logit. Causal LMs pack texts
    of any length end to end; classifiers batch texts of equal length."""

    def expand(p):
        n = len(p.input_ids)
        group = ("packed",) if ex.prefix_reuse else ("full", n)
        return [WorkItem(p.index, 0, group, n, FullPayload(p.input_ids, p.target_id, need_prob=True))]

    outputs = run_items(ex, texts, expand, "clean pass")
    done = []
    for p in texts:
        out = outputs[p.index][0]
        target = out.argmax if p.target_id is None else p.target_id
        done.append(dataclasses.replace(p, target_id=target, target_prob=out.prob, target_logit=out.logit))
    return done


# ---------------------------------------------------------------------------------- perturbation methods


def run_leave_one_out(ex, texts, opts):
    fill = ex.replacement_id

    def expand(p):
        n = len(p.input_ids)
        return [perturbation_item(ex, p, p.index, i, _replaced(p, [i], fill), True) for i in range(n)]

    outputs = run_items(ex, texts, expand, "leave_one_out")
    return [{"scores": np.array([p.target_prob - o.prob for o in outputs[p.index]])} for p in texts]


def run_sliding_window(ex, texts, opts):
    fill, w = ex.replacement_id, opts.window_size

    def expand(p):
        starts = range(len(p.input_ids) - w + 1)
        return [perturbation_item(ex, p, p.index, s, _replaced(p, range(s, s + w), fill), False) for s in starts]

    outputs = run_items(ex, texts, expand, "sliding_window")
    results = []
    for p in texts:
        regions = [
            {"start": s, "end": s + w, "tokens": list(p.tokens[s : s + w]), "impact": p.target_logit - o.logit}
            for s, o in enumerate(outputs[p.index])
        ]
        regions.sort(key=lambda r: r["impact"], reverse=True)
        results.append({"scores": ref.window_scores_per_token(regions, len(p.tokens)), "regions": regions})
    return results


def run_integrated_gradients(ex, texts, opts):
    alphas, weights = ref.ig_steps(opts.n_steps, opts.ig_method)

    def expand(p):
        n = len(p.input_ids)
        group = ("ig", n, opts.baseline)
        steps = [IGPayload(p.index, a, w, p.target_id, opts.baseline) for a, w in zip(alphas, weights, strict=True)]
        steps.append(IGPayload(p.index, 0.0, 0.0, p.target_id, opts.baseline))  # f(baseline), for the gap
        return [WorkItem(p.index, i, group, n, s) for i, s in enumerate(steps)]

    outputs = run_items(ex, texts, expand, "integrated_gradients")
    results = []
    for p in texts:
        outs = outputs[p.index]
        scores = np.sum([contrib for contrib, _ in outs[:-1]], axis=0, dtype=np.float64)
        f_baseline = outs[-1][1]
        gap = float(scores.sum() - (p.target_logit - f_baseline))
        results.append({"scores": scores, "completeness_gap": gap})
    return results


def faithfulness(ex, p: PreparedText, scores: np.ndarray, ks: tuple[int, ...]) -> dict:
    """The seed's sufficiency and comprehensiveness at each k, all perturbations in one workload."""
    order = rank_tokens(scores)
    fill = ex.replacement_id
    n = len(p.input_ids)

    def expand(p):
        items = []
        for j, k in enumerate(ks):
            top = set(order[:k].tolist())
            keep_top = _replaced(p, [i for i in range(n) if i not in top], fill)
            items.append(perturbation_item(ex, p, p.index, 2 * j, keep_top, True))
            items.append(perturbation_item(ex, p, p.index, 2 * j + 1, _replaced(p, top, fill), True))
        return items

    outs = run_items(ex, [p], expand, "faithfulness")[p.index]
    return {
        f"k={k}": {
            "sufficiency": outs[2 * j].prob / p.target_prob,
            "comprehensiveness": 1 - outs[2 * j + 1].prob / p.target_prob,
        }
        for j, k in enumerate(ks)
    }


# ------------------------------------------------------------------------------------ attention methods


def _batches(ex, texts: list[PreparedText], group):
    """Texts into batches under the engine's budgets; `group(p)` keeps apart texts that cannot share one."""
    from .scheduler import Scheduler

    scheduler = Scheduler(ex.runner.max_batch_tokens, ex.runner.max_batch_size)
    by_index = {p.index: p for p in texts}
    for p in texts:
        scheduler.add(p.index, [WorkItem(p.index, 0, group(p), len(p.input_ids))])
    while (batch := scheduler.schedule()) is not None:
        scheduler.complete(batch, [None] * len(batch.items))
        yield [by_index[item.request] for item in batch.items]


def _packs_texts(ex) -> bool:
    """Causal LMs pack texts of any length end to end (block-causal rows, no padding, as the clean
    pass); classifiers (bidirectional) and `prefix_reuse=False` stack texts of equal length."""
    return ex.kind != CLASSIFIER and ex.prefix_reuse


def _attention_batches(ex, texts: list[PreparedText]):
    if _packs_texts(ex):
        return _batches(ex, texts, lambda p: ("packed",))
    return _batches(ex, texts, lambda p: ("stacked", len(p.input_ids)))


def _clean_forward(ex, batch: list[PreparedText], slices: list, embeds_fn=None):
    """One forward of the clean texts of `batch`; returns the logits read (one row per text).

    `slices` receives, before the forward starts (hooks running inside it may read it), each text's
    (row, first key column, first query column) in the forward's layout, so a per-text block of
    anything the forward produces is `x[row, query : query + n, key : key + n]`. `embeds_fn(ids)`,
    when given, makes the input embeddings (for methods that differentiate w.r.t. them)."""
    import torch

    from .forward import Suffix, _head_logits, packed_suffix_forward

    model = ex.model
    if _packs_texts(ex):
        suffixes = [Suffix(0, 0, p.input_ids) for p in batch]
        hidden = packed_suffix_forward(model, [], suffixes, ex.runner.row_capacity, layout=slices, embeds_fn=embeds_fn)
        return _head_logits(model, hidden)
    slices.extend((t, 0, 0) for t in range(len(batch)))
    ids = torch.tensor([p.input_ids for p in batch], device=model.device)
    inputs = {"input_ids": ids} if embeds_fn is None else {"inputs_embeds": embeds_fn(ids)}
    if ex.kind == CLASSIFIER:
        return model(**inputs).logits
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, batch[0].read_pos]
    return _head_logits(model, hidden)


def _score(batch: list[PreparedText], logits):
    from .forward import score_logits

    return score_logits(logits, [p.target_id for p in batch], need_prob=True)


def _text_block(x, where: tuple[int, int, int], n: int):
    row, key_at, query_at = where
    return x[row, query_at : query_at + n, key_at : key_at + n]


def fused_attention_blocks(ex, batch: list[PreparedText], head_fusion: str, layers=None):
    """Per text of `batch`, its head-fused attention (n, n) at each layer (or only `layers`), from one
    forward whose probabilities are fused as each layer produces them (`engine.attention_capture`);
    and the clean-text scores of that same forward (each text's target, probability, logit), so the
    attention methods need no separate clean pass."""
    import torch

    from .attention_capture import fused_attention

    blocks = [dict() for _ in batch]
    slices: list = []

    def sink(layer, fused):
        if layers is None or layer in layers:
            for t, p in enumerate(batch):
                blocks[t][layer] = _text_block(fused, slices[t], len(p.input_ids))

    with torch.no_grad(), fused_attention(ex.model, head_fusion, sink, maps=ex.attention_maps):
        logits = _clean_forward(ex, batch, slices)
    return [[b[layer] for layer in sorted(b)] for b in blocks], _scored_fields(batch, _score(batch, logits))


def _scored_fields(batch: list[PreparedText], scores) -> list[dict]:
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


def finite_fields(fields: dict) -> bool:
    """Whether a text's result has finite scores, matrix and clean-text probability and logit."""
    arrays = [fields[k] for k in ("scores", "matrix") if fields.get(k) is not None]
    numbers = [fields[k] for k in ("target_prob", "target_logit") if k in fields]
    return all(np.isfinite(a).all() for a in arrays) and all(np.isfinite(numbers))


def per_batch(ex, texts: list[PreparedText], compute) -> list[dict]:
    """`compute(batch)` -> one result dict per text, over the attention batches of `texts`.

    A packed row mixes its texts' values with zero weights, and 0 x NaN is NaN: where a packed batch
    has a non-finite result, it is computed again in halves, down to single texts, so every text's
    result is the one it gets without the non-finite text (`BatchRunner` does the same for items)."""

    def isolating(batch):
        fields = compute(batch)
        if len(batch) == 1 or not _packs_texts(ex) or all(map(finite_fields, fields)):
            return list(zip(batch, fields, strict=True))
        half = len(batch) // 2
        return isolating(batch[:half]) + isolating(batch[half:])

    results = {}
    for batch in _attention_batches(ex, texts):
        results.update((p.index, fields) for p, fields in isolating(batch))
    return [results[p.index] for p in texts]


def run_raw_attention(ex, texts, opts):
    layer = opts.layer % ex.num_layers

    def compute(batch):
        per_text, scored = fused_attention_blocks(ex, batch, "mean", layers={layer})
        return [
            {"scores": block[p.read_pos].cpu().numpy(), **fields}
            for p, (block,), fields in zip(batch, per_text, scored, strict=True)
        ]

    return per_batch(ex, texts, compute)


def run_rollout(ex, texts, opts):
    import torch

    from kernels import rollout

    def compute(batch):
        per_text, scored = fused_attention_blocks(ex, batch, opts.head_fusion)
        lengths = [len(p.input_ids) for p in batch]
        size = max(lengths)
        # texts of different lengths, padded into one (B, S, S) per layer: `lengths` keeps each to its block
        stacked = []
        for layer in range(len(per_text[0])):
            fused = torch.zeros(len(batch), size, size, device=per_text[0][0].device)
            for b, blocks in enumerate(per_text):
                fused[b, : lengths[b], : lengths[b]] = blocks[layer]
            stacked.append(fused)
        kwargs = {
            "discard_ratio": opts.discard_ratio,
            "causal_quantile": opts.causal_quantile,
            "fused": True,
            "lengths": lengths,
        }
        if opts.full_matrix:
            matrix = rollout(stacked, **kwargs).cpu().numpy()
            return [
                {
                    "scores": matrix[b, p.read_pos, : lengths[b]],
                    "matrix": matrix[b, : lengths[b], : lengths[b]],
                    **scored[b],
                }
                for b, p in enumerate(batch)
            ]
        rows = rollout(stacked, rows=[p.read_pos for p in batch], **kwargs).cpu().numpy()
        return [{"scores": rows[b, : lengths[b]], **scored[b]} for b in range(len(batch))]

    return per_batch(ex, texts, compute)


def _embeds_requiring_grad(ex, holder: dict):
    """An `embeds_fn` for `_clean_forward` that keeps the embeddings it makes (leaves requiring grad)."""

    def embeds_fn(ids):
        holder["embeds"] = ex.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        return holder["embeds"]

    return embeds_fn


def run_grad_attention(ex, texts, opts):
    def compute(batch):
        matrices, scores = _gradient_weighted_blocks(ex, batch)
        return [
            {"scores": matrix[p.read_pos], "matrix": matrix, **fields}
            for p, matrix, fields in zip(batch, matrices, _scored_fields(batch, scores), strict=True)
        ]

    return per_batch(ex, texts, compute)


def _gradient_weighted_blocks(ex, batch: list[PreparedText]):
    """Per text, mean over layers and heads of A * dlogit/dA, (n, n): one forward and one backward for
    the batch. Texts are independent, so the gradient of the sum of every text's target logit gives each
    its own gradient w.r.t. every layer's attention; the probabilities are taken from the attention
    modules by scoped hooks."""
    import torch

    from .attention_capture import attention_modules
    from .batching import frozen_weights
    from .models import eager_attention

    model = ex.model
    probs, slices = [], []

    def keeper(index):
        return lambda module, args, output: probs.append(output[index])

    handles = [module.register_forward_hook(keeper(index)) for module, index in attention_modules(model)]
    try:
        with eager_attention(model), frozen_weights(model), torch.enable_grad():
            scores = _score(batch, _clean_forward(ex, batch, slices, _embeds_requiring_grad(ex, {})))
            grads = torch.autograd.grad(scores.logit.sum(), probs)
    finally:
        for handle in handles:
            handle.remove()
    weighted = torch.stack([upcast(a * g).mean(dim=1) for a, g in zip(probs, grads, strict=True)]).mean(0)
    weighted = weighted.detach().cpu().numpy()
    return [_text_block(weighted, where, len(p.input_ids)) for p, where in zip(batch, slices, strict=True)], scores


def run_lrp(ex, texts, opts):
    """One forward and one backward per batch under the LRP rules (`engine.lrp`), each text seeded
    from its own target logit; each text's relevance is cut from its row of the batch.

    The forward also scores the clean text (prediction, probability, logit), so LRP needs no separate
    clean pass: it is in `SCORES_ITSELF`."""
    import torch

    from .batching import frozen_weights
    from .lrp import gradient_times_input, lrp_rules

    def compute(batch):
        holder, slices = {}, []
        with frozen_weights(ex.model), lrp_rules(ex.model, opts.rule), torch.enable_grad():
            scores = _score(batch, _clean_forward(ex, batch, slices, _embeds_requiring_grad(ex, holder)))
            (grad,) = torch.autograd.grad(scores.logit.sum(), holder["embeds"])
        per_token = gradient_times_input(holder["embeds"], grad).cpu().numpy()
        return [
            {"scores": per_token[row, query_at : query_at + len(p.input_ids)], **fields}
            for p, (row, _, query_at), fields in zip(batch, slices, _scored_fields(batch, scores), strict=True)
        ]

    return per_batch(ex, texts, compute)


# methods whose own forward scores the clean text (no separate clean pass)
SCORES_ITSELF = {"lrp", "raw_attention", "rollout", "grad_attention"}


RUNNERS = {
    "raw_attention": run_raw_attention,
    "rollout": run_rollout,
    "grad_attention": run_grad_attention,
    "integrated_gradients": run_integrated_gradients,
    "leave_one_out": run_leave_one_out,
    "sliding_window": run_sliding_window,
    "lrp": run_lrp,
}


def as_float_array(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)
