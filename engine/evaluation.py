"""Evaluating and comparing attribution methods over a corpus: `Explainer.evaluate`.

Every text is attributed by every method (each method batched over the texts), then every perturbation
that any metric needs, for all texts and methods, is one workload for the scheduler: identical
perturbed sequences of one text (the same top-k set chosen by two methods, the fully deleted text of
every curve) run once.

Conventions (documented in the README's evaluation section):
- Rankings: descending score, ties broken by position (`metrics.rank_tokens`), never by sort accident.
- Faithfulness at k, the seed's: sufficiency = p(target | only top-k kept) / p(target), comprehensiveness
  = 1 - p(target | top-k replaced) / p(target), replacement token as in the seed, over all tokens. k is
  an int (capped at the text's length) or a fraction in (0, 1) of the text's tokens (rounded, >= 1).
- Perturbation curves: the target's probability and logit after deleting the first `round(f * m)`
  tokens of the most-relevant-first (MoRF) or least-relevant-first (LeRF) order, for f = 0, 1/steps,
  ..., 1 over the m perturbable tokens. By default the read position (the token whose output is
  read) is never deleted (`protect_target`). Areas use the trapezoid rule over f in [0, 1]:
  AOPC = p(x) - area(curve) (Samek et al. 2017, as an area), ABPC = area(LeRF) - area(MoRF)
  (the AttnLRP paper's protocol): higher ABPC and MoRF-AOPC, lower LeRF-AOPC = more faithful.
- Sparsity: Gini index and normalized entropy of |scores|.
- Agreement: Spearman, Kendall tau-b and top-k overlap for every pair of methods, averaged over texts.
- Plausibility (given 0/1 rationales per token): AUPRC and token-F1 of the top-k (k = the rationale's
  size unless `plausibility_k`), ferret's definitions.
- Consistency (given paraphrase pairs): per method, Spearman correlation of the scores of the tokens
  the two texts share (`metrics.align_tokens`: equal normalized surface forms, matched left to right).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import metrics
from .batching import FullPayload
from .methods import PreparedText, perturbation_item
from .results import AttributionFailure
from .scheduler import WorkItem

DELETIONS = ("replacement", "zero_embedding")


@dataclass
class Evaluation:
    """What `Explainer.evaluate` returns."""

    methods: list[str]
    texts: list[str]
    k_labels: list[str]  # "1", "3", "0.2": the k values as given
    per_text: list[dict]  # one record per (text, method)
    per_method: dict[str, dict]  # method -> mean of every numeric metric over the texts (NaN-aware)
    agreement: dict[str, np.ndarray]  # "spearman" / "kendall" / "top_k_overlap" -> (M, M), mean over texts
    curves: dict[str, dict[str, np.ndarray]]  # method -> "morf_prob", ... -> (its texts, steps + 1)
    fractions: np.ndarray  # the curves' x axis: fraction of perturbable tokens deleted
    # method -> one entry per evaluated text: its Attribution, or the AttributionFailure where that method
    # failed on the text (the other methods' results for the text are kept)
    attributions: dict[str, list]
    # every (text, method) that could not be evaluated; method "evaluate" where the text itself was bad
    failures: list[AttributionFailure] = field(default_factory=list)
    consistency: dict[str, list[float]] | None = None  # method -> per paraphrase pair

    def to_records(self) -> list[dict]:
        """The per-text records (a list of flat dicts)."""
        return [dict(r) for r in self.per_text]

    def summary_records(self) -> list[dict]:
        return [{"method": m, **values} for m, values in self.per_method.items()]

    def to_pandas(self):
        """(per_text, per_method) as pandas DataFrames (pandas is not a dependency: install it to use this)."""
        import pandas as pd

        return pd.DataFrame(self.to_records()), pd.DataFrame(self.summary_records()).set_index("method")


# -------------------------------------------------------------------------------------------- options


def _check_k_values(k_values) -> list:
    if isinstance(k_values, (int, float)) and not isinstance(k_values, bool):
        k_values = [k_values]
    ks = list(k_values)
    if not ks:
        raise ValueError("k_values must hold at least one k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)):
            raise TypeError(f"k must be an int >= 1 or a fraction in (0, 1), got {k!r}")
        if isinstance(k, (int, np.integer)) and k < 1:
            raise ValueError(f"an int k must be >= 1, got {k}")
        if isinstance(k, (float, np.floating)) and not 0 < k < 1:
            raise ValueError(f"a fractional k must be in (0, 1), got {k}")
    return ks


def resolve_k(k, n_tokens: int) -> int:
    """An int k capped at the text's length, or a fraction of its tokens (rounded, at least 1)."""
    if isinstance(k, (float, np.floating)):
        return max(1, min(n_tokens, int(math.floor(k * n_tokens + 0.5))))
    return min(int(k), n_tokens)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_per_text(name: str, values, n_texts: int) -> list:
    if values is None:
        return [None] * n_texts
    values = list(values)
    if len(values) != n_texts:
        raise ValueError(f"{name} must have one entry per text ({n_texts}), got {len(values)}")
    return values


# ---------------------------------------------------------------------------------------- perturbations


class _Perturbations:
    """Unique perturbations of one text, each a work item, with the index every metric reads."""

    def __init__(self, ex, p: PreparedText, deletion: str):
        self.ex, self.p, self.deletion = ex, p, deletion
        self.items: list[WorkItem] = []
        self._index: dict[tuple, int] = {}

    def replaced(self, positions) -> int:
        """Item index of the text with `positions` replaced by the replacement token."""
        positions = tuple(sorted(set(int(i) for i in positions)))
        key = ("replacement", positions)
        if key not in self._index:
            ids = list(self.p.input_ids)
            for i in positions:
                ids[i] = self.ex.replacement_id
            self._add(key, perturbation_item(self.ex, self.p, self.p.index, len(self.items), ids, True))
        return self._index[key]

    def deleted(self, positions) -> int:
        """Item index of the text with `positions` deleted the curves' way (`deletion`)."""
        if self.deletion == "replacement":
            return self.replaced(positions)
        positions = tuple(sorted(set(int(i) for i in positions)))
        key = ("zero", positions)
        if key not in self._index:
            n = len(self.p.input_ids)
            payload = FullPayload(self.p.input_ids, self.p.target_id, True, zeroed=positions)
            self._add(key, WorkItem(self.p.index, len(self.items), ("zero", n), n, payload))
        return self._index[key]

    def _add(self, key, item: WorkItem) -> None:
        self._index[key] = len(self.items)
        self.items.append(item)


def _curve_counts(m: int, steps: int) -> list[int]:
    """Tokens deleted at each of the `steps` + 1 evenly spaced fractions 0, 1/steps, ..., 1 of the m
    perturbable tokens (rounded; on a short text several points delete the same tokens and run once)."""
    return [int(math.floor(j / steps * m + 0.5)) for j in range(steps + 1)]


# -------------------------------------------------------------------------------------------- evaluate


def evaluate(
    ex,
    texts: Sequence[str],
    methods: Sequence[str],
    *,
    k_values=(1, 3, 5),
    curves: bool = True,
    curve_steps: int = 10,
    deletion: str = "replacement",
    protect_target: bool = True,
    agreement_k: int = 3,
    rationales: Sequence | None = None,
    plausibility_k: int | None = None,
    paraphrases: Sequence[tuple[str, str]] | None = None,
    method_options: dict[str, dict] | None = None,
) -> Evaluation:
    from .options import check_method_options, make_options

    texts = [texts] if isinstance(texts, str) else ex._as_list(texts)  # one text, not its characters
    methods = [methods] if isinstance(methods, str) else list(methods)
    method_options = method_options or {}
    check_method_options(methods, method_options, "evaluated", name="method_options")
    for m in methods:
        make_options(m, **method_options.get(m, {}))  # validate every option before any work
    ks = _check_k_values(k_values)
    if deletion not in DELETIONS:
        raise ValueError(f"deletion must be one of {list(DELETIONS)}, got {deletion!r}")
    _check_positive_int("curve_steps", curve_steps)
    _check_positive_int("agreement_k", agreement_k)
    if plausibility_k is not None:
        _check_positive_int("plausibility_k", plausibility_k)
    rationales = _check_per_text("rationales", rationales, len(texts))
    if any(r is not None for r in rationales):
        metrics.require_sklearn()
    pairs = list(paraphrases or [])
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise TypeError(f"each paraphrase pair must be two strs, got {pair!r}")

    # ---- attribute every text (and every paraphrase) with every method, each method batched
    pair_texts = [t for pair in pairs for t in pair]
    clean_cache: dict = {}  # one clean pass per text, whatever the number of perturbation methods
    attributed = {
        m: ex._attribute(texts + pair_texts, m, None, method_options.get(m, {}), clean_cache) for m in methods
    }
    # a method that fails on a text (too short for its window, non-finite outputs, ...) leaves that
    # (text, method) out; the text is evaluated with the methods that succeeded on it
    failures = [attributed[m][i] for i in range(len(texts)) for m in methods if not attributed[m][i]]
    kept = [i for i in range(len(texts)) if any(attributed[m][i] for m in methods)]
    rationale_masks = {}
    for i in kept:
        if rationales[i] is not None:
            mask = np.asarray(rationales[i])
            n = len(_first_success(attributed, methods, i).tokens)
            if mask.shape != (n,) or not np.isin(mask, (0, 1)).all():
                failures.append(
                    AttributionFailure(
                        i, texts[i], "evaluate", ValueError(f"rationale must be {n} values of 0/1, got {mask.tolist()}")
                    )
                )
                continue
            rationale_masks[i] = mask.astype(int)
    kept = [i for i in kept if rationales[i] is None or i in rationale_masks]
    failures.sort(key=lambda f: (f.index, methods.index(f.method) if f.method in methods else -1))
    done = {i: [m for m in methods if attributed[m][i]] for i in kept}

    # ---- every perturbation of every kept text and method: one workload
    prepared, plans = {}, {}
    for i in kept:
        first = _first_success(attributed, methods, i)
        p = ex._prepare(i, texts[i], first.target_id)
        p = dataclasses.replace(p, target_prob=first.target_prob, target_logit=first.target_logit)
        prepared[i] = p
        plan = _Perturbations(ex, p, deletion)
        n = len(p.input_ids)
        perturbable = [j for j in range(n) if not (protect_target and j == p.read_pos)]
        counts = _curve_counts(len(perturbable), curve_steps)
        plans[i] = (plan, {})
        for m in done[i]:
            scores = attributed[m][i].scores
            order = metrics.rank_tokens(scores)
            refs = {}
            for k in ks:
                top = order[: resolve_k(k, n)].tolist()
                refs[("suff", str(k))] = plan.replaced([j for j in range(n) if j not in set(top)])
                refs[("comp", str(k))] = plan.replaced(top)
            if curves:
                sub = np.asarray(perturbable, dtype=int)
                morf = sub[metrics.rank_tokens(scores[sub])]
                lerf = sub[metrics.rank_tokens(-scores[sub])]
                refs["morf"] = [plan.deleted(morf[:c]) if c else None for c in counts]
                refs["lerf"] = [plan.deleted(lerf[:c]) if c else None for c in counts]
            plans[i][1][m] = refs
    outputs = ex.runner.run(
        {i: plans[i][0].items for i in kept}, {i: prepared[i].input_ids for i in kept}, desc="evaluating"
    )

    # ---- metrics per (text, method)
    k_labels = [str(k) for k in ks]
    per_text = []
    curve_arrays: dict[str, dict[str, list]] = {m: {} for m in methods}
    for i in kept:
        p, outs = prepared[i], outputs[i]
        for m in done[i]:
            a, refs = attributed[m][i], plans[i][1][m]
            record = {
                "text_index": i,
                "text": p.text,
                "method": m,
                "target_token": a.target_token,
                "target_prob": p.target_prob,
                "n_tokens": len(p.tokens),
            }
            for label in k_labels:
                record[f"sufficiency@{label}"] = outs[refs[("suff", label)]].prob / p.target_prob
                record[f"comprehensiveness@{label}"] = 1 - outs[refs[("comp", label)]].prob / p.target_prob
            if curves:
                for direction in ("morf", "lerf"):
                    probs = [p.target_prob if r is None else outs[r].prob for r in refs[direction]]
                    logits = [p.target_logit if r is None else outs[r].logit for r in refs[direction]]
                    curve_arrays[m].setdefault(f"{direction}_prob", []).append(probs)
                    curve_arrays[m].setdefault(f"{direction}_logit", []).append(logits)
                    record[f"aopc_{direction}"] = p.target_prob - metrics.curve_area(probs)
                    record[f"aopc_{direction}_logit"] = p.target_logit - metrics.curve_area(logits)
                record["abpc"] = record["aopc_morf"] - record["aopc_lerf"]
                record["abpc_logit"] = record["aopc_morf_logit"] - record["aopc_lerf_logit"]
            record["gini"] = metrics.gini(a.scores)
            record["entropy"] = metrics.normalized_entropy(a.scores)
            if i in rationale_masks:
                mask = rationale_masks[i]
                record["auprc"] = metrics.auprc(mask, a.scores)
                record["token_f1"] = metrics.token_f1(mask, a.scores, plausibility_k or max(1, int(mask.sum())))
            per_text.append(record)

    fractions = np.linspace(0.0, 1.0, curve_steps + 1)
    curves_out = (
        {m: {name: np.array(rows) for name, rows in curve_arrays[m].items()} for m in methods if curve_arrays[m]}
        if curves
        else {}
    )

    # ---- agreement, consistency, summary
    scores_per_text = [[attributed[m][i].scores if attributed[m][i] else None for m in methods] for i in kept]
    agreement = _agreement(methods, scores_per_text, agreement_k)
    consistency = None
    if pairs:
        consistency = {m: [] for m in methods}
        base = len(texts)
        for j in range(len(pairs)):
            for m in methods:
                a, b = attributed[m][base + 2 * j], attributed[m][base + 2 * j + 1]
                consistency[m].append(_pair_consistency(a, b))
    per_method = _summary(methods, per_text, consistency)
    return Evaluation(
        methods=methods,
        texts=list(texts),
        k_labels=k_labels,
        per_text=per_text,
        per_method=per_method,
        agreement=agreement,
        curves=curves_out,
        fractions=fractions,
        attributions={m: [attributed[m][i] for i in kept] for m in methods},
        failures=failures,
        consistency=consistency,
    )


def _agreement(methods, scores_per_text, k: int) -> dict[str, np.ndarray]:
    n = len(methods)
    sums = {name: np.zeros((n, n)) for name in ("spearman", "kendall", "top_k_overlap")}
    counts = {name: np.zeros((n, n)) for name in sums}
    for scores in scores_per_text:
        for a in range(n):
            for b in range(n):
                if scores[a] is None or scores[b] is None:  # a method that failed on this text
                    continue
                values = {
                    "spearman": metrics.spearman(scores[a], scores[b])[0] if a != b else 1.0,
                    "kendall": metrics.kendall(scores[a], scores[b]) if a != b else 1.0,
                    "top_k_overlap": metrics.top_k_overlap(scores[a], scores[b], k),
                }
                for name, v in values.items():
                    if not np.isnan(v):
                        sums[name][a, b] += v
                        counts[name][a, b] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return {name: np.where(counts[name] > 0, sums[name] / counts[name], np.nan) for name in sums}


def _first_success(attributed: dict, methods: list[str], i: int):
    """Text i's attribution by the first method that succeeded on it (its target and clean scores)."""
    return next(attributed[m][i] for m in methods if attributed[m][i])


def _pair_consistency(a, b) -> float:
    if not (a and b):
        return float("nan")
    pairs = metrics.align_tokens(a.tokens, b.tokens)
    if len(pairs) < 2:
        return float("nan")
    left = np.array([a.scores[i] for i, _ in pairs])
    right = np.array([b.scores[j] for _, j in pairs])
    return metrics.spearman(left, right)[0]


def _summary(methods, per_text, consistency) -> dict[str, dict]:
    summary = {}
    for m in methods:
        rows = [r for r in per_text if r["method"] == m]
        numeric = [k for k, v in (rows[0].items() if rows else []) if isinstance(v, float) and k != "target_prob"]
        values = {"n_texts": len(rows)}
        for key in numeric:
            column = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
            values[key] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
        if consistency is not None:
            column = np.array(consistency[m], dtype=np.float64)
            values["consistency"] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
        summary[m] = values
    return summary
