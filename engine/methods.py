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
    prefix reuse) or a full sequence. Its cost is the full length either way: the suffix's query
    tokens plus the cached prefix tokens it attends to."""
    n = len(perturbed)
    if ex.prefix_reuse:
        start = next((i for i in range(n) if perturbed[i] != p.input_ids[i]), n - 1)
        start = min(start, n - 1)  # an unchanged copy still recomputes the read position
        payload = SuffixPayload(p.index, start, tuple(perturbed[start:]), p.target_id, need_prob)
        return WorkItem(request, index, ("suffix",), n, payload)
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


def _equal_length_batches(ex, texts: list[PreparedText]):
    """Texts grouped by exact length (no padding) into batches under the engine's budgets."""
    from .scheduler import Scheduler

    scheduler = Scheduler(ex.runner.max_batch_tokens, ex.runner.max_batch_size)
    by_index = {p.index: p for p in texts}
    for p in texts:
        n = len(p.input_ids)
        scheduler.add(p.index, [WorkItem(p.index, 0, ("attn", n), n)])
    while (batch := scheduler.schedule()) is not None:
        scheduler.complete(batch, [None] * len(batch.items))
        yield [by_index[item.request] for item in batch.items]


def _attention_batches(ex, texts: list[PreparedText]):
    """Batches for the attention capture: causal LMs pack texts of any length end to end (one
    block-causal row layout, no padding, as the clean pass); classifiers batch texts of equal length."""
    from .scheduler import Scheduler

    if ex.kind == CLASSIFIER or not ex.prefix_reuse:
        yield from _equal_length_batches(ex, texts)
        return
    scheduler = Scheduler(ex.runner.max_batch_tokens, ex.runner.max_batch_size)
    by_index = {p.index: p for p in texts}
    for p in texts:
        scheduler.add(p.index, [WorkItem(p.index, 0, ("packed",), len(p.input_ids))])
    while (batch := scheduler.schedule()) is not None:
        scheduler.complete(batch, [None] * len(batch.items))
        yield [by_index[item.request] for item in batch.items]


def fused_attention_blocks(ex, batch: list[PreparedText], head_fusion: str, layers=None):
    """Per text of `batch`, its head-fused attention (n, n) at each layer (or only `layers`), from one
    forward whose probabilities are fused as each layer produces them (`engine.attention_capture`);
    and the clean-text scores of that same forward (each text's target, probability, logit), so the
    attention methods need no separate clean pass."""
    import torch

    from .attention_capture import fused_attention
    from .forward import Suffix, _head_logits, packed_suffix_forward, score_logits

    packed = ex.kind != CLASSIFIER and ex.prefix_reuse
    blocks = [dict() for _ in batch]
    layout: list = []

    def sink(layer, fused):
        if layers is not None and layer not in layers:
            return
        for t, p in enumerate(batch):
            n = len(p.input_ids)
            if packed:  # `layout` is filled before the forward starts
                r, key_at, query_at = layout[t]
                blocks[t][layer] = fused[r, query_at : query_at + n, key_at : key_at + n]
            else:
                blocks[t][layer] = fused[t, :n, :n]

    with torch.no_grad(), fused_attention(ex.model, head_fusion, sink, maps=ex.attention_maps):
        if packed:
            suffixes = [Suffix(0, 0, p.input_ids) for p in batch]
            hidden = packed_suffix_forward(ex.model, [], suffixes, ex.runner.row_capacity, layout=layout)
            logits = _head_logits(ex.model, hidden)
        else:
            ids = torch.tensor([p.input_ids for p in batch], device=ex.model.device)
            if ex.kind == CLASSIFIER:
                logits = ex.model(input_ids=ids).logits
            else:
                hidden = ex.model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, batch[0].read_pos]
                logits = _head_logits(ex.model, hidden)
    scores = score_logits(logits, [p.target_id for p in batch], need_prob=True)
    return [[b[layer] for layer in sorted(b)] for b in blocks], _scored_fields(batch, scores)


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


def run_raw_attention(ex, texts, opts):
    results = {}
    layer = opts.layer % ex.num_layers
    for batch in _attention_batches(ex, texts):
        per_text, scored = fused_attention_blocks(ex, batch, "mean", layers={layer})
        for p, (block,), fields in zip(batch, per_text, scored, strict=True):
            results[p.index] = {"scores": block[p.read_pos].cpu().numpy(), **fields}
    return [results[p.index] for p in texts]


def run_rollout(ex, texts, opts):
    import torch

    from kernels import rollout

    results = {}
    for batch in _attention_batches(ex, texts):
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
            for b, p in enumerate(batch):
                n = lengths[b]
                results[p.index] = {"scores": matrix[b, p.read_pos, :n], "matrix": matrix[b, :n, :n], **scored[b]}
        else:
            rows = rollout(stacked, rows=[p.read_pos for p in batch], **kwargs).cpu().numpy()
            for b, p in enumerate(batch):
                results[p.index] = {"scores": rows[b, : lengths[b]], **scored[b]}
    return [results[p.index] for p in texts]


def run_grad_attention(ex, texts, opts):
    results = {}
    for batch in _attention_batches(ex, texts):
        matrices, scores = _gradient_weighted_blocks(ex, batch)
        for p, matrix, fields in zip(batch, matrices, _scored_fields(batch, scores), strict=True):
            results[p.index] = {"scores": matrix[p.read_pos], "matrix": matrix, **fields}
    return [results[p.index] for p in texts]


def _gradient_weighted_blocks(ex, batch: list[PreparedText]):
    """Per text, mean over layers and heads of A * dlogit/dA, (n, n): one forward and one backward for
    the batch (causal LMs packed end to end, classifiers stacked by equal length). Rows are independent,
    so the gradient of the sum of every text's target logit gives each its own gradient w.r.t. every
    layer's attention; the probabilities are taken from the attention modules by scoped hooks."""
    import torch

    from .attention_capture import attention_modules
    from .batching import frozen_weights
    from .forward import Suffix, _head_logits, packed_suffix_forward, score_logits
    from .models import eager_attention

    model = ex.model
    packed = ex.kind != CLASSIFIER and ex.prefix_reuse
    probs, layout = [], []

    def keeper(index):
        return lambda module, args, output: probs.append(output[index])

    def embeds_fn(ids):
        return model.get_input_embeddings()(ids).detach().requires_grad_(True)

    handles = [module.register_forward_hook(keeper(index)) for module, index in attention_modules(model)]
    try:
        with eager_attention(model), frozen_weights(model), torch.enable_grad():
            if packed:
                suffixes = [Suffix(0, 0, p.input_ids) for p in batch]
                hidden = packed_suffix_forward(
                    model, [], suffixes, ex.runner.row_capacity, layout=layout, embeds_fn=embeds_fn
                )
                logits = _head_logits(model, hidden)
            else:
                embeds = embeds_fn(torch.tensor([p.input_ids for p in batch], device=model.device))
                if ex.kind == CLASSIFIER:
                    logits = model(inputs_embeds=embeds).logits
                else:
                    base_out = model.base_model(inputs_embeds=embeds, use_cache=False)
                    logits = _head_logits(model, base_out.last_hidden_state[:, batch[0].read_pos])
            scores = score_logits(logits, [p.target_id for p in batch], need_prob=True)
            grads = torch.autograd.grad(scores.logit.sum(), probs)
    finally:
        for handle in handles:
            handle.remove()
    weighted = torch.stack([(a * g).float().mean(dim=1) for a, g in zip(probs, grads, strict=True)]).mean(0)
    weighted = weighted.detach().cpu().numpy()
    matrices = []
    for t, p in enumerate(batch):
        n = len(p.input_ids)
        if packed:
            r, key_at, query_at = layout[t]
            matrices.append(weighted[r, query_at : query_at + n, key_at : key_at + n])
        else:
            matrices.append(weighted[t, :n, :n])
    return matrices, scores


def run_lrp(ex, texts, opts):
    """One forward and one backward per batch under the LRP rules: causal LMs pack texts of any
    length end to end (block-causal rows, as the attention methods), classifiers batch equal lengths.

    The forward also scores the clean text (prediction, probability, logit), so LRP needs no separate
    clean pass: it is in `SCORES_ITSELF`."""
    results = {}
    for batch in _attention_batches(ex, texts):
        packed = ex.kind != CLASSIFIER and ex.prefix_reuse
        relevances, scores = (_lrp_packed if packed else _lrp_stacked)(ex, batch, opts.rule)
        for p, rel, fields in zip(batch, relevances, _scored_fields(batch, scores), strict=True):
            results[p.index] = {"scores": rel, **fields}
    return [results[p.index] for p in texts]


def _lrp_stacked(ex, batch: list[PreparedText], rule: str):
    """Equal-length texts stacked (classifiers; causal LMs without prefix reuse)."""
    import torch

    from .batching import frozen_weights
    from .forward import _head_logits, score_logits
    from .lrp import relevance

    model = ex.model
    scored = {}

    def target_logits(embeds):
        if ex.kind == CLASSIFIER:
            logits = model(inputs_embeds=embeds).logits.float()
        else:
            hidden = model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, batch[0].read_pos]
            logits = _head_logits(model, hidden)
        scored["scores"] = score_logits(logits, [p.target_id for p in batch], need_prob=True)
        return scored["scores"].logit

    ids = torch.tensor([p.input_ids for p in batch], device=model.device)
    with frozen_weights(model):
        relevances, _ = relevance(model, model.get_input_embeddings()(ids), target_logits, rule)
    return [r.cpu().numpy() for r in relevances], scored["scores"]


def _lrp_packed(ex, batch: list[PreparedText], rule: str):
    """Texts of any length packed end to end into rows; each text's relevance is cut from its row."""
    import torch

    from .batching import frozen_weights
    from .forward import Suffix, _head_logits, packed_suffix_forward, score_logits
    from .lrp import gradient_times_input, lrp_rules

    model = ex.model
    rows_embeds, layout = {}, []

    def embeds_fn(row_ids):
        rows_embeds["x"] = model.get_input_embeddings()(row_ids).detach().requires_grad_(True)
        return rows_embeds["x"]

    suffixes = [Suffix(0, 0, p.input_ids) for p in batch]
    with frozen_weights(model), lrp_rules(model, rule), torch.enable_grad():
        hidden = packed_suffix_forward(model, [], suffixes, ex.runner.row_capacity, layout=layout, embeds_fn=embeds_fn)
        scores = score_logits(_head_logits(model, hidden), [p.target_id for p in batch], need_prob=True)
        (grad,) = torch.autograd.grad(scores.logit.sum(), rows_embeds["x"])
    per_token = gradient_times_input(rows_embeds["x"], grad).cpu().numpy()
    relevances = [
        per_token[r, query_at : query_at + len(p.input_ids)] for p, (r, _, query_at) in zip(batch, layout, strict=True)
    ]
    return relevances, scores


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
