"""Results as strict JSON (NaN and infinities as null, numpy as Python numbers): one conversion for the
CLI's `--format json` and the server's answers."""

from __future__ import annotations

import numpy as np

from .results import Attribution

# the method-specific fields an attribution may carry, sent when the method sets them
EXTRAS = ("regions", "completeness_gap", "std_error", "n_evaluations")


def strict_json(value):
    """NaN (a constant score vector's rank correlation, an all-zero vector's entropy) as null, numpy
    scalars and arrays as Python numbers and lists: output any JSON parser reads."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def attribution_json(a: Attribution, return_matrix: bool = False) -> dict:
    """An attribution's fields: tokens, token ids, scores, method, options, target, and the method's extras."""
    out = {
        "tokens": a.tokens,
        "token_ids": a.token_ids,
        "scores": a.scores,
        "method": a.method,
        "options": a.options,
        "target_id": a.target_id,
        "target_token": a.target_token,
        "target_prob": a.target_prob,
        "target_logit": a.target_logit,
    }
    out.update({name: getattr(a, name) for name in EXTRAS if getattr(a, name) is not None})
    if return_matrix and a.matrix is not None:
        out["matrix"] = a.matrix
    return strict_json(out)


def error_json(err: BaseException) -> dict:
    """`{"error": {"type", "message"}}`: the exception's class name and its first line (never a trace)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return {"error": {"type": type(err).__name__, "message": lines[0] if lines else type(err).__name__}}


def comparison_json(comparison, faithfulness: dict) -> dict:
    """`engine explain --format json` and the server's `:compare`: the prediction, the tokens, each
    method's raw and min-max normalized scores, the Spearman matrix, the top-k tokens, faithfulness at k."""
    methods = list(comparison.attributions)
    return strict_json(
        {
            "prediction": {"token": comparison.target_token, "probability": comparison.target_prob},
            "tokens": comparison.tokens,
            "methods": {
                m: {
                    "scores": a.scores,
                    "normalized": comparison.normalized[m],
                    **({"completeness_gap": a.completeness_gap} if a.completeness_gap is not None else {}),
                }
                for m, a in comparison.attributions.items()
            },
            "spearman": {"methods": methods, "rho": comparison.spearman},
            "top_k": {m: [{"token": t, "score": s} for t, s in top] for m, top in comparison.top_k.items()},
            "faithfulness": faithfulness,
        }
    )


def evaluation_json(ev, methods) -> dict:
    """`engine evaluate --format json` and the server's `:evaluate`: the per-method means, the agreement
    matrices, one record per (text, method), and the failures."""
    return strict_json(
        {
            "methods": list(methods),
            "per_method": ev.per_method,
            "agreement": ev.agreement,
            "per_text": ev.to_records(),
            "failures": [{"index": f.index, "method": f.method, "error": str(f.error)} for f in ev.failures],
        }
    )
