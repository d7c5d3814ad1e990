"""A text whose activations are NaN fails on its own: the texts packed beside it keep their results."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import (
    METHOD_OPTIONS,
    References,
    assert_within_fp32_noise,
    make_tokenizer,
    random_texts,
    reference_scores,
    tiny_gpt2,
    tiny_llama,
    words_for,
)

from engine import AttributionFailure, Explainer, NonFiniteOutputError, available_methods

POISON = "tree"  # the token whose embedding row is NaN
OPTIONS = {**METHOD_OPTIONS, "rollout": {"head_fusion": "max", "discard_ratio": 0.0}}  # no step function
BUDGETS = [1, 7, 37, 4096]  # max_batch_tokens: one item per batch, a few, many, everything at once


def _poisoned(make_model):
    model, tok = make_model(), make_tokenizer()
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:  # GPT-2 ties them: the head row would be NaN too
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids(POISON)] = float("nan")
    return model, tok


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def poisoned(request):
    model, tok = _poisoned({"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param])
    return request.param, model, tok, References(model)


@pytest.mark.parametrize("method", available_methods())
def test_a_nan_text_fails_alone_and_its_neighbours_equal_the_reference(poisoned, method):
    name, model, tok, refs = poisoned
    clean = [t for t in random_texts(6, *words_for(method, 3, 10)) if POISON not in t.split()]
    bad = ["the big " + POISON + " was green", POISON + " and sky"]
    texts = clean + bad
    random.shuffle(texts)
    opts = OPTIONS.get(method, {})
    exact, fp32 = [], []
    for text in clean:  # a clean text never reads the NaN row, so the references on it are clean
        target = Explainer(model, tok).attribute(text, method, **opts).target_id
        e, r = refs(reference_scores, method, tok=tok, text=text, read_pos=-1, target=target, **opts)
        exact.append(e), fp32.append(r)
    for budget in BUDGETS:
        ex = Explainer(model, tok, max_batch_tokens=budget, max_batch_size=None if budget > 1 else 1)
        results = dict(zip(texts, ex.attribute(texts, method, **opts), strict=True))
        for text in bad:
            failure = results[text]
            assert isinstance(failure, AttributionFailure), f"{method} at budget {budget}: {text!r} did not fail"
            assert isinstance(failure.error, NonFiniteOutputError) and "non-finite" in str(failure.error)
        got = [results[text].scores for text in clean]
        assert_within_fp32_noise(got, exact, fp32, what=f"{name} {method} beside NaN texts, budget {budget}")


def test_faithfulness_and_evaluate_keep_the_clean_texts(poisoned):
    name, model, tok, refs = poisoned
    ex = Explainer(model, tok, max_batch_tokens=37)
    texts = ["the cat sat on the mat", "the " + POISON + " is big", "a dog ran to the park"]
    ev = ex.evaluate(texts, ["leave_one_out", "lrp"], k_values=(1,), curve_steps=2)
    assert [f.text for f in ev.failures] == [texts[1]] * 2
    assert all(isinstance(f.error, NonFiniteOutputError) for f in ev.failures)
    for method in ev.methods:
        assert [r["text"] for r in ev.per_text if r["method"] == method] == [texts[0], texts[2]]
        assert np.isfinite([r["comprehensiveness@1"] for r in ev.per_text]).all()
    with pytest.raises(NonFiniteOutputError, match="non-finite logits at the read position"):
        ex.predict(texts[1])


@pytest.mark.parametrize("method", available_methods())
def test_nan_weights_fail_every_text_with_a_clear_error(method):
    model, tok = tiny_llama(), make_tokenizer()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every logit NaN, for every text
    ex = Explainer(model, tok)
    results = ex.attribute(["the cat sat on", "a dog ran"], method, **OPTIONS.get(method, {}))
    assert all(isinstance(r, AttributionFailure) and isinstance(r.error, NonFiniteOutputError) for r in results)
    with pytest.raises(NonFiniteOutputError, match="non-finite logits at the read position"):
        ex.attribute("the cat sat on", method, **OPTIONS.get(method, {}))


def test_infinite_logits_are_a_clear_error():
    model, tok = tiny_gpt2(), make_tokenizer()
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(float("inf"))
    ex = Explainer(model, tok)
    with pytest.raises(NonFiniteOutputError):
        ex.predict("the cat sat")
    with pytest.raises(NonFiniteOutputError):
        ex.attribute("the cat sat", "leave_one_out")
