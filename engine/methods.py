"""Method runners: prepared texts in, one result dict per text out.

The perturbation methods and integrated gradients expand each text into work items
(`expand_*`), run every item of every text through one `BatchRunner.run` (the scheduler packs them
into token-budgeted batches), and reduce each text's outputs (`reduce_*`) into the fields of an
`Attribution`. The attention methods still run the reference one text at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import reference as ref
from .batching import FullPayload, IGPayload, SuffixPayload
from .metrics import rank_tokens
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
    """Score every clean text once (batched by length): the prediction, its probability and logit."""
    import dataclasses

    def expand(p):
        payload = FullPayload(p.input_ids, p.target_id, need_prob=True)
        return [WorkItem(p.index, 0, ("full", len(p.input_ids)), len(p.input_ids), payload)]

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


# ------------------------------------------------------------------------ attention methods (reference)


def run_raw_attention(ex, texts, opts):
    return [
        {"scores": ref.extract_raw_attention(ex.model, ex.tokenizer, t.text, opts.layer, t.read_pos)} for t in texts
    ]


def run_rollout(ex, texts, opts):
    out = []
    for t in texts:
        row, matrix = ref.compute_rollout(
            ex.model,
            ex.tokenizer,
            t.text,
            opts.head_fusion,
            opts.discard_ratio,
            opts.causal_quantile,
            read_pos=t.read_pos,
            return_matrix=True,
        )
        out.append({"scores": row, "matrix": matrix})
    return out


def run_grad_attention(ex, texts, opts):
    out = []
    for t in texts:
        matrix, _ = ref.gradient_weighted_attention(ex.model, ex.tokenizer, t.text, t.read_pos, t.target_id)
        out.append({"scores": matrix[t.read_pos], "matrix": matrix})
    return out


RUNNERS = {
    "raw_attention": run_raw_attention,
    "rollout": run_rollout,
    "grad_attention": run_grad_attention,
    "integrated_gradients": run_integrated_gradients,
    "leave_one_out": run_leave_one_out,
    "sliding_window": run_sliding_window,
}


def as_float_array(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)
