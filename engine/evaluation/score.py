"""Score: one text's metrics per method, from its plan's outputs, as soon as that text completes."""

from __future__ import annotations

import numpy as np

from .. import metrics
from .plan import TextPlan


def score_text(
    plan: TextPlan,
    outputs: list,
    attributions: dict,
    k_labels: list[str],
    curves: bool,
    rationale: np.ndarray | None,
    plausibility_k: int | None,
) -> tuple[list[dict], dict[str, dict[str, list]]]:
    """Per method (in `attributions`' order) the text's record, and its curves: method -> "morf_prob",
    "morf_logit", "lerf_prob", "lerf_logit" -> the values at each deletion fraction."""
    p = plan.p
    records, curve_rows = [], {}
    for m, a in attributions.items():
        refs = plan.refs[m]
        record = {
            "text_index": p.index,
            "text": p.text,
            "method": m,
            "target_token": a.target_token,
            "target_prob": p.target_prob,
            "n_tokens": len(p.tokens),
        }
        for label in k_labels:
            record[f"sufficiency@{label}"] = metrics.sufficiency(outputs[refs[("suff", label)]].prob, p.target_prob)
            record[f"comprehensiveness@{label}"] = metrics.comprehensiveness(
                outputs[refs[("comp", label)]].prob, p.target_prob
            )
        if curves:
            rows = curve_rows[m] = {}
            for direction in ("morf", "lerf"):
                probs = [p.target_prob if r is None else outputs[r].prob for r in refs[direction]]
                logits = [p.target_logit if r is None else outputs[r].logit for r in refs[direction]]
                rows[f"{direction}_prob"], rows[f"{direction}_logit"] = probs, logits
                record[f"aopc_{direction}"] = p.target_prob - metrics.curve_area(probs)
                record[f"aopc_{direction}_logit"] = p.target_logit - metrics.curve_area(logits)
            record["abpc"] = record["aopc_morf"] - record["aopc_lerf"]
            record["abpc_logit"] = record["aopc_morf_logit"] - record["aopc_lerf_logit"]
        record["gini"] = metrics.gini(a.scores)
        record["entropy"] = metrics.normalized_entropy(a.scores)
        if rationale is not None:
            record["auprc"] = metrics.auprc(rationale, a.scores)
            record["token_f1"] = metrics.token_f1(rationale, a.scores, plausibility_k or max(1, int(rationale.sum())))
        records.append(record)
    return records, curve_rows


def pair_consistency(a, b) -> float:
    """Spearman correlation of two paraphrases' scores over the tokens they share."""
    if not (a and b):
        return float("nan")
    pairs = metrics.align_tokens(a.tokens, b.tokens)
    if len(pairs) < 2:
        return float("nan")
    left = np.array([a.scores[i] for i, _ in pairs])
    right = np.array([b.scores[j] for _, j in pairs])
    return metrics.spearman(left, right)[0]
