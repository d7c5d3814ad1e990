"""The facade returns the reference's attributions, validates what it is given, and keeps good results."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import (
    BUDGETS,
    METHOD_OPTIONS,
    METHOD_TEXT_WORDS,
    References,
    assert_close,
    assert_matches_reference,
    assert_within_fp32_noise,
    discard_is_well_conditioned,
    faithfulness_values,
    make_tokenizer,
    random_texts,
    reference_scores,
    tiny_bert,
    tiny_llama,
)

from engine import Attribution, AttributionFailure, Explainer, available_methods
from engine import reference as ref


@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"size{b[0]}-tokens{b[1]}-row{b[2]}")
def test_facade_equals_reference_on_random_texts(family, method, budget):
    """Every registered method, at batch budgets that do not divide the work, on shuffled texts of
    mixed lengths, equals its reference within the reference's own float32 noise."""
    name, model, tok = family
    refs = References(model)
    size, tokens, row = budget
    ex = Explainer(model, tok, max_batch_size=size, max_batch_tokens=tokens, row_capacity=row)
    texts = random_texts(6, *METHOD_TEXT_WORDS.get(method, (2, 11)))
    random.shuffle(texts)
    opts = METHOD_OPTIONS.get(method, {})  # a method without test options runs with its defaults
    results = ex.attribute(texts, method=method, **opts)
    assert len(results) == len(texts)
    got, exact, fp32 = [], [], []
    probs, probs64, probs32 = [], [], []
    for text, a in zip(texts, results, strict=True):
        assert isinstance(a, Attribution) and a.text == text and a.method == method
        read_pos = 0 if name == "bert" else len(a.tokens) - 1
        if method == "rollout" and not discard_is_well_conditioned(refs.model64, tok, text, "max", 0.5):
            continue
        e, r = refs(reference_scores, method, tok=tok, text=text, read_pos=read_pos, target=a.target_id, **opts)
        assert a.scores.shape == (len(a.tokens),)
        got.append(a.scores), exact.append(e), fp32.append(r)
        with torch.no_grad():
            logits = ref.scored_logits(model(**tok(text, return_tensors="pt")).logits)
            logits64 = ref.scored_logits(refs.model64(**tok(text, return_tensors="pt")).logits)
        assert a.target_id == int(logits.argmax())
        probs.append(a.target_prob), probs64.append(float(logits64.softmax(-1)[a.target_id]))
        probs32.append(float(logits.softmax(-1)[a.target_id]))
    assert 2 * len(got) >= len(texts), "fewer than half of the texts could be compared"
    assert_within_fp32_noise(got, exact, fp32, what=f"{name} {method}")
    assert_within_fp32_noise(probs, probs64, probs32, what=f"{name} {method} target_prob")


def test_result_fields(llama):
    model, tok = llama
    ex = Explainer(model, tok)
    text = "the cat sat on the mat"
    r = ex.attribute(text, "rollout")
    assert r.matrix.shape == (6, 6) and r.regions is None and r.completeness_gap is None
    assert_close(r.scores, r.matrix[-1])
    g = ex.attribute(text, "grad_attention")
    assert_close(g.scores, g.matrix[-1])
    w = ex.attribute(text, "sliding_window", window_size=3)
    assert len(w.regions) == 4 and w.regions[0]["impact"] >= w.regions[-1]["impact"]
    ig = ex.attribute(text, "integrated_gradients", n_steps=4)
    gap = lambda m: ref.integrated_gradients(m, tok, text, n_steps=4, target_id=ig.target_id)[2]  # noqa: E731
    assert_matches_reference(ig.completeness_gap, References(model), gap, what="completeness gap")
    assert ig.options == {"n_steps": 4, "ig_method": "gausslegendre", "baseline": "replacement"}
    assert ex.model is model and ex.tokenizer is tok


def test_target_override(llama):
    model, tok = llama
    ex = Explainer(model, tok)
    text = "the cat sat on the"
    by_id = ex.attribute(text, "leave_one_out", target=tok.convert_tokens_to_ids("mat"))
    by_str = ex.attribute(text, "leave_one_out", target="mat")
    assert by_id.target_id == by_str.target_id == tok.convert_tokens_to_ids("mat")
    assert by_id.target_token == "mat"
    loo = lambda m: ref.leave_one_out_attribution(m, tok, text, target_id=by_id.target_id)[0]  # noqa: E731
    assert_matches_reference(by_str.scores, References(model), loo, what="leave_one_out, given target")
    # a target other than the argmax really changes the result
    assert not np.allclose(by_str.scores, ex.attribute(text, "leave_one_out").scores)


def test_classifier_targets_and_read_position():
    model, tok = tiny_bert(), make_tokenizer(bert_style=True)
    ex = Explainer(model, tok)
    text = "the dog ran to the park"
    a = ex.attribute(text, "raw_attention", target="pos")
    assert a.target_id == 2 and a.target_token == "pos"
    assert a.tokens[0] == "[CLS]"
    assert_matches_reference(a.scores, References(model), ref.extract_raw_attention, tok, text, read_pos=0)
    assert ex.attribute(text, "leave_one_out", target=1).target_id == 1
    with pytest.raises(ValueError, match="not one of"):
        ex.attribute(text, "leave_one_out", target="positive")
    with pytest.raises(ValueError, match="out of range"):
        ex.attribute(text, "leave_one_out", target=3)


def test_decoder_classifier_reads_last_token():
    model, tok = tiny_llama(classifier=True), make_tokenizer()
    ex = Explainer(model, tok)
    text = "the dog ran to the park"
    a = ex.attribute(text, "rollout")
    assert_matches_reference(a.scores, References(model), ref.compute_rollout, tok, text, read_pos=-1)


def test_compare_and_faithfulness(llama):
    model, tok = llama
    refs = References(model)
    ex = Explainer(model, tok)
    text = "the cat sat on the mat because it was"
    c = ex.compare(
        text, ["rollout", "leave_one_out", "integrated_gradients"], options={"integrated_gradients": {"n_steps": 5}}
    )
    assert c.spearman.shape == (3, 3) and np.allclose(np.diag(c.spearman), 1)
    target = c.attributions["leave_one_out"].target_id
    methods = {
        "rollout": lambda m, t, x: ref.compute_rollout(m, t, x),
        "leave_one_out": lambda m, t, x: ref.leave_one_out_attribution(m, t, x, target_id=target)[0],
        "integrated_gradients": lambda m, t, x: ref.integrated_gradients(m, t, x, n_steps=5, target_id=target)[0],
    }
    exact, fp32 = refs(ref.compare_attribution_methods, tok, text, methods, verbose=False)
    for m in exact:
        assert_within_fp32_noise(c.normalized[m], exact[m], fp32[m], what=m)
    from scipy.stats import spearmanr

    # ranks of the engine's own normalized scores: equal to scipy on the same vectors
    assert c.spearman[0, 1] == pytest.approx(spearmanr(c.normalized["rollout"], c.normalized["leave_one_out"])[0])
    top = c.top_k["leave_one_out"]
    assert len(top) == 3 and top[0][1] == 1.0
    a = c.attributions["leave_one_out"]
    faith = ex.faithfulness(text, a, k_values=(1, 2))
    exact, fp32 = refs(ref.evaluate_faithfulness, tok, text, a.scores, (1, 2), target_id=a.target_id)
    assert faith.keys() == exact.keys()
    assert_within_fp32_noise(faithfulness_values(faith), faithfulness_values(exact), faithfulness_values(fp32))


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"method": "shap"}, ValueError, "available methods"),
        ({"method": "lrp", "rule": "epsilon"}, ValueError, "rule must be one of"),
        ({"method": "rollout", "head_fusion": "median"}, ValueError, "head_fusion must be one of"),
        ({"method": "rollout", "discard_ratio": 1.0}, ValueError, r"\[0, 1\)"),
        ({"method": "rollout", "discard_ratio": -0.1}, ValueError, r"\[0, 1\)"),
        ({"method": "rollout", "window_size": 3}, ValueError, "valid options"),
        ({"method": "sliding_window", "window_size": 0}, ValueError, ">= 1"),
        ({"method": "sliding_window", "window_size": 2.5}, TypeError, "must be an int"),
        ({"method": "integrated_gradients", "n_steps": 0}, ValueError, ">= 1"),
        ({"method": "integrated_gradients", "ig_method": "simpson"}, ValueError, "gausslegendre"),
        ({"method": "integrated_gradients", "baseline": "blur"}, ValueError, "replacement"),
        ({"method": "raw_attention", "layer": 3}, ValueError, "layer must be in"),
        ({"method": "leave_one_out", "target": "notaword"}, ValueError, "not in the vocabulary"),
        ({"method": "leave_one_out", "target": 10_000}, ValueError, "out of range"),
        ({"method": "leave_one_out", "target": 1.5}, TypeError, "target must be"),
        ({"method": 3}, TypeError, "method must be a str"),
    ],
)
def test_bad_options_raise(llama, kwargs, error, match):
    ex = Explainer(*llama)
    with pytest.raises(error, match=match):
        ex.attribute("the cat sat", **kwargs)


@pytest.mark.parametrize(
    "text,kwargs,error,match",
    [
        ("", {}, ValueError, "empty"),
        ("   \n", {}, ValueError, "empty"),
        (" ".join(["cat"] * 65), {}, ValueError, "at most 64"),
        ("the cat", {"method": "sliding_window", "window_size": 3}, ValueError, "larger than the text"),
        (42, {}, TypeError, "must be a str"),
    ],
)
def test_bad_text_raises(llama, text, kwargs, error, match):
    ex = Explainer(*llama)
    with pytest.raises(error, match=match):
        ex.attribute(text, **{"method": "leave_one_out", **kwargs})


def test_bad_k_and_lists(llama):
    ex = Explainer(*llama)
    a = ex.attribute("the cat sat", "leave_one_out")
    with pytest.raises(ValueError, match="number of tokens"):
        ex.faithfulness("the cat sat", a, k_values=(1, 4))
    with pytest.raises(ValueError, match="number of tokens"):
        ex.faithfulness("the cat sat", a, k_values=(0,))
    with pytest.raises(ValueError, match="empty"):
        ex.attribute([], "leave_one_out")
    with pytest.raises(TypeError, match="sequence of str"):
        ex.attribute({"a": 1}, "leave_one_out")


def test_one_bad_text_keeps_the_others(llama):
    model, tok = llama
    ex = Explainer(model, tok)
    texts = ["the cat sat on the mat", "", "it", "a dog ran to the park", None]
    results = ex.attribute(texts, "sliding_window", window_size=2)
    assert [bool(r) for r in results] == [True, False, False, True, False]
    failures = [r for r in results if not r]
    assert all(isinstance(f, AttributionFailure) for f in failures)
    assert [f.index for f in failures] == [1, 2, 4]
    assert isinstance(failures[0].error, ValueError) and isinstance(failures[2].error, TypeError)
    assert "larger than the text" in str(failures[1].error)
    for i in (0, 3):
        n, target = len(results[i].tokens), results[i].target_id

        def windows(m, text=texts[i], n=n, target=target):
            return ref.window_scores_per_token(ref.sliding_window_occlusion(m, tok, text, 2, target_id=target), n)

        assert_matches_reference(results[i].scores, References(model), windows, what=texts[i])
