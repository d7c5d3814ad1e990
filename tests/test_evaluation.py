"""`Explainer.evaluate` and its metrics: hand-computed cases, direct numpy / scipy implementations, the
seed's functions, and direct model calls for the perturbation curves."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from conftest import (
    FAMILIES,
    References,
    assert_close,
    assert_within_fp32_noise,
    float64_copy,
    make_tokenizer,
    random_texts,
    tiny_llama,
)
from scipy import stats

from engine import Explainer, metrics
from engine import reference as ref
from engine.evaluation import resolve_k

# ------------------------------------------------------------------------------ metrics, by hand


def test_gini_hand_cases():
    assert metrics.gini([1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.0)
    assert metrics.gini([0.0, 0.0, 5.0, 0.0]) == pytest.approx(0.75)  # (n - 1) / n: one token holds all
    assert metrics.gini([1.0, -3.0]) == pytest.approx(0.25)  # |scores|: (2*1-3)*1 + (2*2-3)*3 = 2; 2/(2*4)
    assert np.isnan(metrics.gini([0.0, 0.0]))


def test_entropy_hand_cases():
    assert metrics.normalized_entropy([2.0, -2.0, 2.0, 2.0]) == pytest.approx(1.0)
    assert metrics.normalized_entropy([0.0, 3.0, 0.0]) == pytest.approx(0.0)
    assert metrics.normalized_entropy([1.0, 1.0, 2.0]) == pytest.approx(1.5 * np.log(2) / np.log(3))
    assert metrics.normalized_entropy([4.0]) == 0.0
    assert np.isnan(metrics.normalized_entropy([0.0, 0.0]))


@pytest.mark.parametrize("seed", range(5))
def test_gini_and_entropy_equal_direct_numpy(seed):
    a = np.random.default_rng(seed).normal(size=17)
    x = np.abs(a)
    direct_gini = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())  # mean absolute difference
    p = x / x.sum()
    direct_entropy = -(p * np.log(p)).sum() / np.log(len(p))
    assert metrics.gini(a) == pytest.approx(direct_gini, rel=1e-12)
    assert metrics.normalized_entropy(a) == pytest.approx(direct_entropy, rel=1e-12)


def test_rank_correlations_hand_and_scipy():
    assert metrics.kendall(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(1 / 3)
    assert metrics.spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0]))[0] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.normal(size=12), rng.normal(size=12)
        assert metrics.kendall(a, b) == pytest.approx(stats.kendalltau(a, b).statistic)
        assert metrics.spearman(a, b)[0] == pytest.approx(stats.spearmanr(a, b).statistic)
    assert np.isnan(metrics.kendall(np.ones(3), np.arange(3.0)))


def test_top_k_overlap_breaks_ties_by_position():
    assert metrics.top_k_overlap(np.array([3.0, 2, 1, 0]), np.array([0.0, 2, 3, 1]), 2) == 0.5
    # equal scores: the earlier tokens come first, so top-2 of [1, 1, 1] is {0, 1}
    assert metrics.top_k_overlap(np.array([1.0, 1, 1]), np.array([5.0, 4, 0]), 2) == 1.0
    assert metrics.top_k_overlap(np.array([1.0, 2]), np.array([2.0, 1]), 5) == 1.0  # k capped at n


def test_plausibility_hand_cases():
    rationale = np.array([1, 1, 0, 0])
    assert metrics.auprc(rationale, np.array([4.0, 3, 2, 1])) == pytest.approx(1.0)  # perfect ranking
    # scores rank the rationale 2nd and 4th: PR points (R, P) = (0, 1), (0, 0), (.5, .5), (.5, 1/3), (1, .5)
    # -> trapezoids over recall: 0 + .5 * (.5 + 1/3) / 2 ... as sklearn's precision_recall_curve + auc
    from sklearn.metrics import auc, precision_recall_curve

    scores = np.array([3.0, 1.0, 4.0, 2.0])
    precision, recall, _ = precision_recall_curve(rationale, scores)
    assert metrics.auprc(rationale, scores) == pytest.approx(auc(recall, precision))
    assert np.isnan(metrics.auprc(np.zeros(4, dtype=int), scores))
    # top-2 of [4, 1, 3, 2] = {0, 2}; one hit: precision = recall = 1/2
    assert metrics.token_f1(rationale, np.array([4.0, 1, 3, 2]), 2) == pytest.approx(0.5)
    assert metrics.token_f1(rationale, np.array([0.0, 1, 3, 2]), 2) == 0.0


def test_curve_area_and_alignment():
    assert metrics.curve_area([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert metrics.curve_area([1.0, 0.0, 0.0, 0.0, 0.0]) == pytest.approx(0.125)
    assert metrics.align_tokens(["The", "Ġcat", "Ġsat", "Ġthe"], ["the", "Ġdog", "Ġthe", "Ġsat"]) == [
        (0, 0),
        (2, 3),
        (3, 2),
    ]
    assert metrics.align_tokens(["##ing", "▁Run"], ["run", "ing"]) == [(0, 1), (1, 0)]


def test_resolve_k():
    assert resolve_k(3, 10) == 3 and resolve_k(30, 10) == 10
    assert resolve_k(0.25, 10) == 3 and resolve_k(0.01, 10) == 1 and resolve_k(0.5, 3) == 2


# ----------------------------------------------------------------------------------- evaluate


def _probs_with(model, ids, positions, fill, target, zero=False):
    ids = ids.clone()
    with torch.no_grad():
        if zero:
            embeds = model.get_input_embeddings()(ids)
            embeds[0, list(positions)] = 0.0
            logits = model(inputs_embeds=embeds).logits
        else:
            ids[0, list(positions)] = fill
            logits = model(ids).logits
    logits = ref.upcast(ref.scored_logits(logits))
    return float(torch.softmax(logits, -1)[target]), float(logits[target])


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_evaluate_equals_seed_faithfulness_and_comparison(family_name):
    model_fn, tok_fn = FAMILIES[family_name]
    model, tok = model_fn(), tok_fn()
    refs = References(model)
    ex = Explainer(model, tok, max_batch_tokens=23, max_batch_size=3)
    texts = random_texts(5, 2, 11)
    random.shuffle(texts)
    methods = ["rollout", "leave_one_out", "lrp"]
    ev = ex.evaluate(texts, methods, k_values=(1, 3), curves=False)
    assert not ev.failures and len(ev.per_text) == len(texts) * len(methods)
    got, exact, fp32 = [], [], []
    for record in ev.per_text:
        a = ev.attributions[record["method"]][texts.index(record["text"])]
        ks = [k for k in (1, 3) if k <= len(a.tokens)]
        e, r = refs(ref.evaluate_faithfulness, tok, record["text"], a.scores, ks, target_id=a.target_id)
        for k in ks:
            for metric in ("sufficiency", "comprehensiveness"):
                got.append(record[f"{metric}@{k}"]), exact.append(e[f"k={k}"][metric]), fp32.append(r[f"k={k}"][metric])
        assert record["gini"] == metrics.gini(a.scores)
    assert_within_fp32_noise(got, exact, fp32, what="faithfulness")
    # agreement: the mean over texts of the seed comparison's Spearman (scores min-max normalized)
    rho = np.zeros((3, 3))
    for t, text in enumerate(texts):
        fns = {m: (lambda *_, s=ev.attributions[m][t].scores: s) for m in methods}
        normalized = ref.compare_attribution_methods(model, tok, text, fns, verbose=False)
        rho += np.array(
            [[metrics.spearman(normalized[a], normalized[b])[0] if a != b else 1 for b in methods] for a in methods]
        )
    assert_close(ev.agreement["spearman"], rho / len(texts), what="spearman agreement")


@pytest.mark.parametrize("deletion", ["replacement", "zero_embedding"])
@pytest.mark.parametrize("family_name", ["llama", "bert"])
def test_curves_equal_direct_model_calls(family_name, deletion):
    model_fn, tok_fn = FAMILIES[family_name]
    model, tok = model_fn(), tok_fn()
    model64 = float64_copy(model)
    ex = Explainer(model, tok, max_batch_tokens=41, max_batch_size=5)
    texts = random_texts(4, 3, 10)
    steps = 4
    ev = ex.evaluate(texts, ["leave_one_out", "raw_attention"], k_values=1, curve_steps=steps, deletion=deletion)
    fill = ref.replacement_id(tok)
    for m in ("leave_one_out", "raw_attention"):
        for t, text in enumerate(texts):
            a = ev.attributions[m][t]
            ids = tok(text, return_tensors="pt")["input_ids"]
            n = ids.shape[1]
            read = 0 if family_name == "bert" else n - 1
            free = [j for j in range(n) if j != read]  # the read position is protected by default
            morf = [free[i] for i in np.argsort(-a.scores[free], kind="stable")]
            lerf = [free[i] for i in metrics.rank_tokens(-a.scores[free])]
            for name, order in (("morf", morf), ("lerf", lerf)):
                exact, fp32 = [], []
                for j in range(steps + 1):
                    count = int(np.floor(j / steps * len(free) + 0.5))
                    zero = deletion != "replacement"
                    exact.append(_probs_with(model64, ids, order[:count], fill, a.target_id, zero))
                    fp32.append(_probs_with(model, ids, order[:count], fill, a.target_id, zero))
                for i, what in enumerate(("prob", "logit")):
                    assert_within_fp32_noise(
                        ev.curves[m][f"{name}_{what}"][t],
                        [e[i] for e in exact],
                        [r[i] for r in fp32],
                        f"{m} {name} {what}",
                    )
            record = next(r for r in ev.per_text if r["method"] == m and r["text_index"] == t)
            area = metrics.curve_area(ev.curves[m]["morf_prob"][t])
            # p(x) of a text is its first method's clean pass (each method's own forward rounds differently)
            p_x = ev.attributions["leave_one_out"][t].target_prob
            assert record["aopc_morf"] == pytest.approx(p_x - area)
            assert record["abpc"] == pytest.approx(metrics.curve_area(ev.curves[m]["lerf_prob"][t]) - area)
    assert np.allclose(ev.fractions, np.linspace(0, 1, steps + 1))


def test_unprotected_curves_delete_the_read_position():
    model, tok = tiny_llama(), make_tokenizer()
    text = "the cat sat on the mat"
    ev = Explainer(model, tok).evaluate([text], ["leave_one_out"], curve_steps=1, protect_target=False)
    ids = tok(text, return_tensors="pt")["input_ids"]
    a = ev.attributions["leave_one_out"][0]
    refs = References(model)
    (exact, _), (fp32, _) = refs(_probs_with, ids, range(ids.shape[1]), ref.replacement_id(tok), a.target_id)
    assert_within_fp32_noise(ev.curves["leave_one_out"]["morf_prob"][0][-1], exact, fp32, "everything deleted")


def test_one_token_text_has_flat_curves(llama):
    model, tok = llama
    ev = Explainer(model, tok).evaluate(["cat", "the cat sat"], ["leave_one_out", "lrp"], k_values=(1, 3))
    assert not ev.failures
    record = next(r for r in ev.per_text if r["text_index"] == 0 and r["method"] == "lrp")
    assert record["abpc"] == 0.0 and record["aopc_morf"] == pytest.approx(0.0, abs=1e-12)  # nothing to delete
    # k = 3 is capped at the text's one token; keeping it is the unchanged text
    assert record["comprehensiveness@3"] == record["comprehensiveness@1"]
    assert record["sufficiency@1"] == pytest.approx(1.0, rel=1e-6)


def test_fractional_k_equals_its_resolved_int(llama):
    model, tok = llama
    text = "the cat sat on the big mat today"  # 8 tokens: 0.25 -> 2
    ex = Explainer(model, tok)
    a, b = (ex.evaluate([text], ["leave_one_out"], k_values=k, curves=False).per_text[0] for k in (0.25, 2))
    assert a["sufficiency@0.25"] == b["sufficiency@2"] and a["comprehensiveness@0.25"] == b["comprehensiveness@2"]


def test_plausibility_and_consistency(llama):
    model, tok = llama
    texts = ["the cat sat on the mat", "a dog ran far away"]
    rationales = [[0, 1, 0, 0, 0, 1], None]
    pairs = [("the cat sat on the mat", "the dog sat on a mat"), ("a dog ran", "one cat ran")]
    ex = Explainer(model, tok)
    ev = ex.evaluate(texts, ["leave_one_out", "rollout"], rationales=rationales, paraphrases=pairs, curves=False)
    for m in ("leave_one_out", "rollout"):
        a = ev.attributions[m][0]
        record = next(r for r in ev.per_text if r["method"] == m and r["text_index"] == 0)
        assert record["auprc"] == metrics.auprc(np.array(rationales[0]), a.scores)
        assert record["token_f1"] == metrics.token_f1(np.array(rationales[0]), a.scores, 2)
        assert "auprc" not in next(r for r in ev.per_text if r["method"] == m and r["text_index"] == 1)
        first = ex.attribute(list(pairs[0]), m)
        aligned = metrics.align_tokens(first[0].tokens, first[1].tokens)  # the, sat, on, mat
        assert len(aligned) == 4
        left = [first[0].scores[i] for i, _ in aligned]
        right = [first[1].scores[j] for _, j in aligned]
        assert ev.consistency[m][0] == pytest.approx(metrics.spearman(np.array(left), np.array(right))[0])
        assert np.isnan(ev.consistency[m][1])  # one aligned token ('ran'): no rank correlation
        assert ev.per_method[m]["consistency"] == pytest.approx(ev.consistency[m][0])
        assert ev.per_method[m]["auprc"] == pytest.approx(record["auprc"])


def test_batched_evaluation_equals_one_text_at_a_time(llama):
    """Packed and batched, every per-text metric is the one-text-at-a-time value: both float32 runs
    within the float32 noise of the one-at-a-time evaluation itself against its float64 run."""
    model, tok = llama
    model64 = float64_copy(model)
    texts = random_texts(4, 2, 9)
    methods = ["leave_one_out", "lrp"]
    together = Explainer(model, tok, max_batch_tokens=37, max_batch_size=7).evaluate(texts, methods)
    got, exact, fp32 = [], [], []
    for t, text in enumerate(texts):
        alone32 = Explainer(model, tok, max_batch_size=1).evaluate([text], methods)
        alone64 = Explainer(model64, tok, max_batch_size=1).evaluate([text], methods)
        for r32, r64 in zip(alone32.per_text, alone64.per_text, strict=True):
            r = next(x for x in together.per_text if x["text_index"] == t and x["method"] == r32["method"])
            for key, value in r32.items():
                if isinstance(value, float) and key != "target_prob":
                    got.append(r[key]), exact.append(r64[key]), fp32.append(value)
    assert_within_fp32_noise(got, exact, fp32, what="per-text metrics")


def test_bad_texts_and_rationales_do_not_lose_the_others(llama):
    model, tok = llama
    texts = ["the cat sat", "   ", "a dog ran far", "the mat"]
    ev = Explainer(model, tok).evaluate(texts, ["leave_one_out"], rationales=[None, None, [1, 0], None])
    assert [f.index for f in ev.failures] == [1, 2]
    assert "rationale" in str(ev.failures[1].error)
    assert sorted({r["text_index"] for r in ev.per_text}) == [0, 3]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"k_values": 0}, ValueError, ">= 1"),
        ({"k_values": 1.5}, ValueError, r"\(0, 1\)"),
        ({"k_values": "3"}, TypeError, "int >= 1 or a fraction"),
        ({"deletion": "mask"}, ValueError, "zero_embedding"),
        ({"curve_steps": 0}, ValueError, "curve_steps"),
        ({"rationales": [[1]]}, ValueError, "one entry per text"),
        ({"paraphrases": [("a",)]}, TypeError, "two strs"),
        ({"method_options": {"rollout": {"head_fusion": "max"}}}, ValueError, "not evaluated"),
        ({"method_options": {"leave_one_out": {"window_size": 2}}}, ValueError, "valid options"),
    ],
)
def test_bad_options_are_clear_errors(llama, kwargs, error, match):
    model, tok = llama
    with pytest.raises(error, match=match):
        Explainer(model, tok).evaluate(["the cat sat", "a dog"], ["leave_one_out"], **kwargs)


def test_a_method_failing_on_a_text_keeps_the_text_for_the_others(llama):
    model, tok = llama
    texts = ["the cat sat on the mat", "a dog", "the big bird sat on the tree"]
    ev = Explainer(model, tok).evaluate(
        texts, ["leave_one_out", "sliding_window"], k_values=(1,), method_options={"sliding_window": {"window_size": 3}}
    )
    assert [(f.index, f.method) for f in ev.failures] == [(1, "sliding_window")]
    by_method = {m: [r["text_index"] for r in ev.per_text if r["method"] == m] for m in ev.methods}
    assert by_method == {"leave_one_out": [0, 1, 2], "sliding_window": [0, 2]}
    assert not ev.attributions["sliding_window"][1] and ev.attributions["leave_one_out"][1]
    assert (
        ev.curves["leave_one_out"]["morf_prob"].shape[0] == 3 and ev.curves["sliding_window"]["morf_prob"].shape[0] == 2
    )
    assert ev.per_method["sliding_window"]["n_texts"] == 2


def test_one_str_is_one_text(llama):
    model, tok = llama
    ev = Explainer(model, tok).evaluate("the cat sat", "leave_one_out", k_values=(1,))
    assert ev.texts == ["the cat sat"] and ev.methods == ["leave_one_out"] and len(ev.per_text) == 1


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"agreement_k": 0}, ValueError, "agreement_k must be an int >= 1"),
        ({"agreement_k": "3"}, TypeError, "agreement_k must be an int >= 1"),
        ({"plausibility_k": 0}, ValueError, "plausibility_k"),
        ({"curve_steps": 2.0}, TypeError, "curve_steps"),
    ],
)
def test_bad_counts_fail_before_any_work(llama, kwargs, error, match):
    model, tok = llama
    with pytest.raises(error, match=match):
        Explainer(model, tok).evaluate(["the cat sat", "a dog"], ["leave_one_out"], **kwargs)


def test_rationales_without_scikit_learn_fail_before_any_work(llama, monkeypatch):
    model, tok = llama
    ex = Explainer(model, tok)
    calls = []
    monkeypatch.setattr(ex.loop, "submit", lambda *a, **k: calls.append(a))
    for name in ("sklearn", "sklearn.metrics"):
        monkeypatch.setitem(sys.modules, name, None)  # as if scikit-learn were not installed
    with pytest.raises(ImportError, match=r"attribution-engine\[report\]"):
        ex.evaluate(["the cat sat"], ["leave_one_out"], rationales=[[0, 1, 0]])
    assert calls == []
