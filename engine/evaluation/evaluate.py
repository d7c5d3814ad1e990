"""Evaluating and comparing attribution methods over a corpus: `Explainer.evaluate`.

Every text is attributed by every method (each method batched over the texts); then each text's
perturbations (`plan`: identical perturbed sequences of one text run once) go to the engine loop as
one request per text, a window of texts in flight at a time; as each text's outputs come back it is
scored (`score`) and folded into running sums (`aggregate`), and its outputs are dropped, so the
perturbation outputs held never grow with the corpus.

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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import metrics
from ..options import check_k_values, check_method_options
from ..results import AttributionFailure
from .aggregate import Agreement, MethodMeans
from .plan import DELETIONS, plan_text
from .score import pair_consistency, score_text

# texts whose perturbations are in flight at once: enough to fill batches from several texts
WINDOW_TEXTS = 32


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


def _check_positive_int(name: str, value) -> None:
    import numbers

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


def _first_success(attributed: dict, methods: list[str], i: int):
    """Text i's attribution by the first method that succeeded on it (its target and clean scores)."""
    return next(attributed[m][i] for m in methods if attributed[m][i])


def _check_arguments(methods, method_options, deletion, curve_steps, agreement_k, plausibility_k, rationales, pairs):
    """Every argument, before any work."""
    from ..methods import make_options

    check_method_options(methods, method_options, "evaluated", name="method_options")
    for m in methods:
        make_options(m, **method_options.get(m, {}))
    if deletion not in DELETIONS:
        raise ValueError(f"deletion must be one of {list(DELETIONS)}, got {deletion!r}")
    _check_positive_int("curve_steps", curve_steps)
    _check_positive_int("agreement_k", agreement_k)
    if plausibility_k is not None:
        _check_positive_int("plausibility_k", plausibility_k)
    if any(r is not None for r in rationales):
        metrics.require_sklearn()
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise TypeError(f"each paraphrase pair must be two strs, got {pair!r}")


def _attribute_all(ex, texts, pairs, methods, method_options, rationales):
    """Every text (and every paraphrase) attributed with every method, each method batched over the
    texts and each text scored once; -> (attributions per method, failures, the indices of the texts
    kept, their 0/1 rationale masks). A method that fails on a text (too short for its window,
    non-finite outputs, ...) leaves that (text, method) out: the text is evaluated with the others."""
    pair_texts = [t for pair in pairs for t in pair]
    clean_cache: dict = {}
    attributed = {
        m: ex._attribute(texts + pair_texts, m, None, method_options.get(m, {}), clean_cache) for m in methods
    }
    failures = [attributed[m][i] for i in range(len(texts)) for m in methods if not attributed[m][i]]
    kept = [i for i in range(len(texts)) if any(attributed[m][i] for m in methods)]
    rationale_masks = {}
    for i in kept:
        if rationales[i] is not None:
            mask = np.asarray(rationales[i])
            n = len(_first_success(attributed, methods, i).tokens)
            if mask.shape != (n,) or not np.isin(mask, (0, 1)).all():
                error = ValueError(f"rationale must be {n} values of 0/1, got {mask.tolist()}")
                failures.append(AttributionFailure(i, texts[i], "evaluate", error))
                continue
            rationale_masks[i] = mask.astype(int)
    kept = [i for i in kept if rationales[i] is None or i in rationale_masks]
    failures.sort(key=lambda f: (f.index, methods.index(f.method) if f.method in methods else -1))
    return attributed, failures, kept, rationale_masks


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
    texts = [texts] if isinstance(texts, str) else ex._as_list(texts)  # one text, not its characters
    methods = [methods] if isinstance(methods, str) else list(methods)
    method_options = method_options or {}
    ks = check_k_values(k_values, fractions=True)
    rationales = _check_per_text("rationales", rationales, len(texts))
    pairs = list(paraphrases or [])
    _check_arguments(methods, method_options, deletion, curve_steps, agreement_k, plausibility_k, rationales, pairs)
    attributed, failures, kept, rationale_masks = _attribute_all(ex, texts, pairs, methods, method_options, rationales)

    # ---- per text: plan its perturbations, run them, score and aggregate as each text completes
    k_labels = [str(k) for k in ks]
    means, agreement = MethodMeans(methods), Agreement(methods, agreement_k)
    per_text: list[dict] = []
    curve_arrays: dict[str, dict[str, list]] = {m: {} for m in methods}

    def plan(i):
        first = _first_success(attributed, methods, i)
        p = ex._prepare(i, texts[i], first.target_id)
        p = dataclasses.replace(p, target_prob=first.target_prob, target_logit=first.target_logit)
        scores = {m: attributed[m][i].scores for m in methods if attributed[m][i]}
        return plan_text(ex.context, p, scores, ks, curves, curve_steps, deletion, protect_target)

    def finish(i, text_plan, outputs):
        done = {m: attributed[m][i] for m in methods if attributed[m][i]}
        records, rows = score_text(text_plan, outputs, done, k_labels, curves, rationale_masks.get(i), plausibility_k)
        for record in records:
            means.add(record)
        per_text.extend(records)
        for m, named in rows.items():
            for name, values in named.items():
                curve_arrays[m].setdefault(name, []).append(values)
        agreement.add([attributed[m][i].scores if attributed[m][i] else None for m in methods])

    ex._stream(kept, plan, finish, "evaluating", window=WINDOW_TEXTS)

    fractions = np.linspace(0.0, 1.0, curve_steps + 1)
    curves_out = (
        {m: {name: np.array(rows) for name, rows in curve_arrays[m].items()} for m in methods if curve_arrays[m]}
        if curves
        else {}
    )
    consistency = None
    if pairs:
        consistency = {m: [] for m in methods}
        base = len(texts)
        for j in range(len(pairs)):
            for m in methods:
                consistency[m].append(pair_consistency(attributed[m][base + 2 * j], attributed[m][base + 2 * j + 1]))
    return Evaluation(
        methods=methods,
        texts=list(texts),
        k_labels=k_labels,
        per_text=per_text,
        per_method=means.means(consistency),
        agreement=agreement.means(),
        curves=curves_out,
        fractions=fractions,
        attributions={m: [attributed[m][i] for i in kept] for m in methods},
        failures=failures,
        consistency=consistency,
    )
