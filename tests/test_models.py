"""Loading models from real folders, the scoped eager-attention switch, and model facts."""

from __future__ import annotations

import pytest
import torch
from conftest import References, assert_matches_reference, make_tokenizer, tiny_bert, tiny_llama

from engine import Explainer, load_model
from engine import reference as ref
from engine.models import CAUSAL_LM, CLASSIFIER, eager_attention, max_length, model_kind, replacement_id


def test_eager_attention_is_scoped(llama):
    model, tok = llama
    model.set_attn_implementation("sdpa")
    inputs = tok("the cat sat", return_tensors="pt")
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
        attentions = model(**inputs, output_attentions=True).attentions
        assert len(attentions) == 3 and attentions[0].shape == (1, 4, 3, 3)
    assert model.config._attn_implementation == "sdpa"
    # the attention methods give the same answer whichever implementation the model was loaded with
    ex = Explainer(model, tok)
    a = ex.attribute("the cat sat on the mat", "rollout")
    model.set_attn_implementation("eager")
    b = ex.attribute("the cat sat on the mat", "rollout")
    for scores in (a.scores, b.scores):
        assert_matches_reference(scores, References(model), ref.compute_rollout, tok, "the cat sat on the mat")


@pytest.mark.parametrize("factory,bert_style,kind", [(tiny_llama, False, CAUSAL_LM), (tiny_bert, True, CLASSIFIER)])
def test_load_model_from_a_saved_folder(tmp_path, factory, bert_style, kind):
    model, tok = factory(), make_tokenizer(bert_style=bert_style)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    assert model_kind(loaded) == kind and not loaded.training
    text = "the cat sat on the mat"
    a = Explainer.from_pretrained(str(tmp_path)).attribute(text, "leave_one_out")
    loo = lambda m: ref.leave_one_out_attribution(m, tok, text, target_id=a.target_id)[0]  # noqa: E731
    assert_matches_reference(a.scores, References(model), loo, what="loaded from the folder")
    with pytest.raises(ValueError, match="kind must be"):
        load_model(str(tmp_path), kind="seq2seq")


def test_model_facts():
    model = tiny_llama()
    assert max_length(model, make_tokenizer()) == 64
    assert replacement_id(make_tokenizer()) == 0
    assert replacement_id(make_tokenizer(with_pad=False)) == 0  # GPT-2 style: the seed's `or 0`
    with pytest.raises(TypeError, match="unsupported model class"):
        model_kind(model.model)
    with pytest.raises(TypeError, match="unsupported model class"):
        Explainer(model.model, make_tokenizer())


def test_frozen_weights_are_left_frozen(llama):
    model, tok = llama
    for p in model.parameters():
        p.requires_grad_(False)
    Explainer(model, tok).attribute("the cat sat", "integrated_gradients", n_steps=3)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()
