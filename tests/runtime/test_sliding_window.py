"""Sliding-window attention (Mistral: every layer; Qwen2 and Gemma 2: some layers): the packed path
builds the window into its masks; the per-length path leaves the masks to transformers. Both equal the
reference, which runs the model as transformers does."""

from __future__ import annotations

import copy
import random
import types

import numpy as np
import pytest
import torch
from conftest import (
    METHOD_OPTIONS,
    VOCAB_SIZE,
    References,
    assert_within_fp32_noise,
    make_tokenizer,
    random_texts,
    reference_scores,
    words_for,
)

from engine import Explainer, available_methods
from engine import reference as ref
from engine.runtime.forward import attention_layer_types, packs_rows

WINDOW = 3
OPTIONS = {**METHOD_OPTIONS, "rollout": {"head_fusion": "max", "discard_ratio": 0.0}}  # no step function
SMALL = {"vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0}


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**SMALL, **HEADS, sliding_window=WINDOW, attn_implementation="eager"))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **SMALL,
        **HEADS,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(config)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**SMALL, **HEADS, head_dim=8, sliding_window=WINDOW, attn_implementation="eager")
    return Gemma2ForCausalLM(config)


MODELS = {"mistral": _mistral, "qwen2": _qwen2, "gemma2": _gemma2}


@pytest.fixture(scope="module", params=list(MODELS))
def windowed(request):
    torch.manual_seed(7)
    model = MODELS[request.param]().eval()
    return request.param, model, make_tokenizer(), References(model)


def test_the_layer_types_are_read_from_the_config(windowed):
    name, model, _, _ = windowed
    kinds = attention_layer_types(model)
    expected = {
        "mistral": ["sliding_attention"] * 3,
        "qwen2": ["full_attention", "sliding_attention", "sliding_attention"],
        "gemma2": ["sliding_attention", "full_attention", "sliding_attention"],
    }[name]
    assert kinds == expected and packs_rows(model)


def test_predict_equals_the_model_on_texts_longer_than_the_window(windowed):
    name, model, tok, refs = windowed
    texts = random_texts(6, 5, 14)
    got, exact, fp32 = [], [], []
    results = Explainer(model, tok).attribute(texts, "leave_one_out")
    for text, a in zip(texts, results, strict=True):
        ids = tok(text, return_tensors="pt")["input_ids"]

        def prob(m, ids=ids, target=a.target_id):
            with torch.no_grad():
                return float(ref.scored_logits(m(input_ids=ids).logits).softmax(-1)[target])

        e, r = refs(prob)
        got.append(a.target_prob), exact.append(e), fp32.append(r)
    assert_within_fp32_noise(got, exact, fp32, what=f"{name} p(target)")


@pytest.mark.parametrize("prefix_reuse", [True, False], ids=["packed", "per-length"])
@pytest.mark.parametrize("method", available_methods())
def test_methods_equal_the_reference(windowed, method, prefix_reuse):
    name, model, tok, refs = windowed
    if method == "lrp" and name == "gemma2":  # no LRP rules for Gemma 2: a clear error, not wrong numbers
        with pytest.raises(ValueError, match="gemma2"):
            Explainer(model, tok, prefix_reuse=prefix_reuse).attribute("the cat sat on the mat", "lrp")
        return
    texts = random_texts(5, *words_for(method, 5, 14))
    random.shuffle(texts)
    opts = OPTIONS.get(method, {})
    exact, fp32 = {}, {}
    for budget in (37, 4096):
        ex = Explainer(model, tok, max_batch_tokens=budget, prefix_reuse=prefix_reuse, row_capacity=20)
        assert ex.prefix_reuse == prefix_reuse
        got, want, noise = [], [], []
        for text, a in zip(texts, ex.attribute(texts, method, **opts), strict=True):
            if text not in exact:
                exact[text], fp32[text] = refs(
                    reference_scores, method, tok=tok, text=text, read_pos=-1, target=a.target_id, **opts
                )
            got.append(a.scores), want.append(exact[text]), noise.append(fp32[text])
        assert_within_fp32_noise(got, want, noise, what=f"{name} {method} budget {budget}")


def test_the_window_changes_the_results_these_tests_compare(windowed):
    """Without the window the same weights give other scores: the tests above can tell them apart."""
    name, model, tok, _ = windowed
    unwindowed = copy.deepcopy(model)
    unwindowed.config.sliding_window = 10_000
    text = "the cat sat on the mat because it was very tired"
    a = ref.leave_one_out_attribution(model, tok, text)[0]
    b = ref.leave_one_out_attribution(unwindowed, tok, text)[0]
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()


@pytest.mark.parametrize("config_name", ["Llama4TextConfig", "Qwen3NextConfig"])
def test_other_attention_kinds_take_the_per_length_path(config_name):
    """Chunked (Llama 4) or linear (Qwen3-Next) attention layers: masks the packed rows do not build."""
    import transformers

    config = getattr(transformers, config_name)(num_hidden_layers=4)
    assert not packs_rows(types.SimpleNamespace(config=config))
