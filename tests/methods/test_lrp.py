"""LRP (AttnLRP, CP-LRP): the one-backward engine path equals the explicit layer-by-layer oracle,
conserves the target logit where it must, agrees with LXT 2.1, and leaves the model untouched."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, assert_within_fp32_noise, make_tokenizer, random_texts, tiny_llama

from engine import Explainer
from engine.methods._lrp_rules import LRP_RULES, check_supported, lrp_rules
from engine.reference.lrp import lrp_reference

BUDGETS = [(1, 2048), (3, 17), (7, 64), (None, 100_000)]
LXT_SCRIPT = Path(__file__).parent / "lrp" / "lxt_relevance.py"


def _oracle(model, ids, target, rule):
    """(relevance, logit) of the explicit oracle in float64 and the same propagation in float32."""
    return (
        lrp_reference(model, ids, target, rule),
        lrp_reference(model, ids, target, rule, dtype=torch.float32),
    )


def _assert_equals_oracle(model, tok, texts, results, rule, what):
    """Relevance and target logit of every text within the float32 noise of the oracle itself."""
    got, exact, fp32, logits, logits64, logits32 = [], [], [], [], [], []
    for text, a in zip(texts, results, strict=True):
        ids = tok(text, return_tensors="pt")["input_ids"][0]
        (e, e_logit), (r, r_logit) = _oracle(model, ids, a.target_id, rule)
        got.append(a.scores), exact.append(e), fp32.append(r)
        logits.append(a.target_logit), logits64.append(e_logit), logits32.append(r_logit)
    assert_within_fp32_noise(got, exact, fp32, what=what)
    assert_within_fp32_noise(logits, logits64, logits32, what=f"{what} target logit")


@pytest.mark.parametrize("family_name", list(FAMILIES))
@pytest.mark.parametrize("rule", LRP_RULES)
@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"size{b[0]}-tokens{b[1]}")
def test_lrp_equals_explicit_oracle(family_name, rule, budget):
    model_fn, tok_fn = FAMILIES[family_name]
    model, tok = model_fn(), tok_fn()
    size, tokens = budget
    ex = Explainer(model, tok, max_batch_size=size, max_batch_tokens=tokens)
    texts = random_texts(7, 1, 12) + random_texts(2, 5, 5)  # mixed lengths, two of equal length
    random.shuffle(texts)
    results = ex.attribute(texts, "lrp", rule=rule)
    _assert_equals_oracle(model, tok, texts, results, rule, f"{family_name} {rule} {budget}")


def test_lrp_differs_from_plain_gradient_times_input(llama):
    """The rules change the backward pass: without them the result is plain gradient x input."""
    model, tok = llama
    text = "the cat sat on the mat"
    ids = tok(text, return_tensors="pt")["input_ids"]
    a = Explainer(model, tok).attribute(text, "lrp")
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits[0, -1, a.target_id].backward()
    plain = (embeds.grad * embeds).sum(-1)[0].detach().numpy()
    assert np.abs(a.scores - plain).max() > 1e-3 * np.abs(plain).max()


def test_cplrp_conserves_the_target_logit_on_llama():
    """Llama has no biases: with query, key and gate detached the network is linear in the embeddings."""
    model, tok = tiny_llama(seed=3), make_tokenizer()
    for a in Explainer(model, tok).attribute(random_texts(6, 1, 12), "lrp", rule="cplrp"):
        assert a.scores.sum() == pytest.approx(a.target_logit, rel=1e-4)


def test_attnlrp_is_not_exactly_conservative_on_llama():
    """The softmax rule leaks relevance to the (implicit) bias: the sums differ, as the paper says."""
    model, tok = tiny_llama(seed=3), make_tokenizer()
    ratios = [a.scores.sum() / a.target_logit for a in Explainer(model, tok).attribute(random_texts(6, 3, 12), "lrp")]
    assert all(np.isfinite(ratios)) and max(abs(r - 1) for r in ratios) > 1e-3


def test_lrp_batched_and_one_text_at_a_time_equal_the_oracle(family):
    name, model, tok = family
    texts = random_texts(6, 2, 10)
    batched = Explainer(model, tok).attribute(texts, "lrp")
    single = [Explainer(model, tok, max_batch_size=1).attribute(text, "lrp") for text in texts]
    # a packed row and a text alone round differently: each within the oracle's own float32 noise
    _assert_equals_oracle(model, tok, texts, batched, "attnlrp", f"{name} packed")
    _assert_equals_oracle(model, tok, texts, single, "attnlrp", f"{name} alone")


@pytest.mark.parametrize("rule", LRP_RULES)
def test_lrp_equals_lxt(rule):
    """LXT 2.1's efficient AttnLRP / CP-LRP on the same tiny Llama, run in a subprocess (it patches
    `transformers` module globals); see the script for the two workarounds transformers 5 needs."""
    pytest.importorskip("lxt", reason="lxt==2.1 is installed by .ci/run (pip install --no-deps lxt==2.1)")
    texts = random_texts(4, 2, 12, seed=11)
    run = subprocess.run(
        [sys.executable, str(LXT_SCRIPT), rule, "0", *texts], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    lxt = json.loads(run.stdout)["texts"]
    model, tok = tiny_llama(0), make_tokenizer()
    ours = Explainer(model, tok).attribute(texts, "lrp", rule=rule)
    assert [a.target_id for a in ours] == [t["target"] for t in lxt]
    oracles = [
        _oracle(model, tok(t, return_tensors="pt")["input_ids"][0], a.target_id, rule)
        for t, a in zip(texts, ours, strict=True)
    ]
    exact, fp32 = [e for (e, _), _ in oracles], [r for _, (r, _) in oracles]
    # both float32 implementations within the oracle's own float32 noise: they agree with each other
    assert_within_fp32_noise([np.array(t["relevance"]) for t in lxt], exact, fp32, what=f"LXT {rule}")
    assert_within_fp32_noise([a.scores for a in ours], exact, fp32, what=f"engine {rule}")


# ------------------------------------------------------------------------------------ scope and errors


def _snapshot(model):
    return [(m.__dict__.get("forward"), len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_rules_are_removed_on_exit_and_on_error(family_name):
    model_fn, tok_fn = FAMILIES[family_name]
    model, tok = model_fn(), tok_fn()
    ids = tok("the cat sat", return_tensors="pt")["input_ids"]
    before, logits = _snapshot(model), model(ids).logits
    with lrp_rules(model, "attnlrp"):
        assert _snapshot(model) != before
        # forward values are the model's own (LayerNorm is recomputed op by op: equal up to rounding)
        assert torch.allclose(model(ids).logits, logits, rtol=1e-5, atol=1e-6)
    assert _snapshot(model) == before
    with pytest.raises(RuntimeError, match="boom"), lrp_rules(model, "cplrp"):
        raise RuntimeError("boom")
    assert _snapshot(model) == before
    assert torch.equal(model(ids).logits, logits)


def test_unknown_architecture_names_its_module_types():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    model = GPTNeoXForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"no rule for module type\(s\) \[.*GPTNeoX.*\].*supported model types"):
        check_supported(model)
    ex = Explainer(model, make_tokenizer())
    with pytest.raises(ValueError, match="GPTNeoX"):
        ex.attribute("the cat", "lrp")


def test_unrecognized_module_inside_a_supported_family_is_reported():
    model = tiny_llama()
    model.model.layers[0].mlp.act_fn = torch.nn.Softplus()  # a module the plan does not know, in place
    model.model.layers[1].mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))  # replaces a gated MLP
    with pytest.raises(ValueError, match=r"Sequential"):
        check_supported(model)


def test_bad_rule_is_a_value_error(llama):
    model, tok = llama
    with pytest.raises(ValueError, match="rule must be one of"):
        Explainer(model, tok).attribute("the cat", "lrp", rule="lrp-0")


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
@pytest.mark.parametrize("rule", LRP_RULES)
def test_other_llama_family_models_equal_the_oracle(model_type, rule):
    from conftest import VOCAB_SIZE
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(5)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model, tok = AutoModelForCausalLM.from_config(config).eval(), make_tokenizer()
    ex = Explainer(model, tok, max_batch_tokens=23)
    texts = random_texts(4, 1, 10)
    results = ex.attribute(texts, "lrp", rule=rule)
    _assert_equals_oracle(model, tok, texts, results, rule, f"{model_type} {rule}")
    if rule == "cplrp" and model_type == "mistral":  # no biases: conservative
        for a in results:
            assert a.scores.sum() == pytest.approx(a.target_logit, rel=1e-4)
