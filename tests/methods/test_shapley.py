"""The Shapley methods: exact against a brute force over permutations written here and against Captum;
sampling against Captum's ShapleyValueSampling with the same seed; KernelSHAP over every coalition
equal to exact; efficiency; results independent of budgets and of prefix reuse."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import BUDGETS, FAMILIES, float64_copy, random_texts

from engine import Explainer
from engine import reference as ref
from engine.methods.kernel_shap import coalitions

# float64 runs of one function in two batch layouts agree to ~1e-15, except on rotary models (Llama),
# whose rotary angles transformers computes in float32 (~1e-8 relative); a wrong weight, permutation or
# coalition is off by 1e-3 or more
RTOL = 1e-6


def _model64(name):
    model_fn, tok_fn = FAMILIES[name]
    return float64_copy(model_fn()), tok_fn()


def _value(model, tok, text, target, value="prob"):
    """v(present positions) from plain full forwards, for the brute forces here."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    fill = tok.pad_token_id or 0

    def v(present) -> float:
        x = torch.full_like(ids, fill)
        x[0, list(present)] = ids[0, list(present)]
        with torch.no_grad():
            logits = ref.scored_logits(model(input_ids=x).logits)
        return {"prob": torch.softmax(logits, -1)[target].item(), "logit": logits[target].item()}[value]

    return v, ids.shape[1]


def _close(actual, expected, what=""):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = max(np.abs(expected).max(), 1e-12)
    assert np.abs(actual - expected).max() <= RTOL * scale, f"{what}: {actual} vs {expected}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exact_equals_the_mean_over_all_permutations_and_captum(name):
    from captum.attr import ShapleyValues

    model, tok = _model64(name)
    ex = Explainer(model, tok, max_batch_tokens=37)
    texts = random_texts(3, 1, 4)  # BERT adds [CLS] and [SEP]: at most 6 tokens
    for text, a in zip(texts, ex.attribute(texts, "shapley", value="logit"), strict=True):
        v, n = _value(model, tok, text, a.target_id, "logit")
        brute = np.zeros(n)  # phi_i = mean over the n! orders of i's marginal contribution
        for order in itertools.permutations(range(n)):
            for k, i in enumerate(order):
                brute[i] += v(order[: k + 1]) - v(order[:k])
        brute /= math.factorial(n)
        _close(a.scores, brute, f"{name} {text!r} brute force")
        assert a.n_evaluations == 2**n
        ids = tok(text, return_tensors="pt")["input_ids"]
        read = 0 if name == "bert" else -1

        def forward(x, target=a.target_id, read=read):
            logits = model(input_ids=x.long()).logits
            return (logits[:, read] if logits.dim() == 3 else logits)[:, target]

        fill = tok.pad_token_id or 0
        captum = ShapleyValues(forward).attribute(ids, baselines=fill, perturbations_per_eval=8)[0]
        _close(a.scores, captum.numpy(), f"{name} {text!r} Captum ShapleyValues")


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("seed", [0, 7])
def test_sampling_equals_captum_with_the_same_seed(name, seed):
    from captum.attr import ShapleyValueSampling

    model, tok = _model64(name)
    ex = Explainer(model, tok, max_batch_tokens=53)
    texts = random_texts(3, 2, 9)
    results = ex.attribute(texts, "shapley_sampling", n_samples=6, antithetic=False, seed=seed)
    for text, a in zip(texts, results, strict=True):
        ids = tok(text, return_tensors="pt")["input_ids"]
        read = 0 if name == "bert" else -1

        def forward(x, target=a.target_id, read=read):
            logits = model(input_ids=x.long()).logits
            return torch.softmax(logits[:, read] if logits.dim() == 3 else logits, -1)[:, target]

        torch.manual_seed(seed)
        captum = ShapleyValueSampling(forward).attribute(ids, baselines=tok.pad_token_id or 0, n_samples=6)[0]
        _close(a.scores, captum.numpy(), f"{name} {text!r}")
        assert a.std_error.shape == a.scores.shape and np.all(a.std_error >= 0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kernel_shap_over_every_coalition_is_exact_and_all_are_efficient(name):
    model, tok = _model64(name)
    ex = Explainer(model, tok, max_batch_tokens=29)
    texts = random_texts(4, 1, 5)
    exact = ex.attribute(texts, "shapley")
    kernel = ex.attribute(texts, "kernel_shap", n_samples=10_000)
    sampled = ex.attribute(texts, "kernel_shap", n_samples=8, seed=3)
    perms = ex.attribute(texts, "shapley_sampling", n_samples=4)
    for text, e, k, s, q in zip(texts, exact, kernel, sampled, perms, strict=True):
        _close(k.scores, e.scores, f"{name} {text!r} kernel_shap, every coalition")
        v, n = _value(model, tok, text, e.target_id)
        total = v(range(n)) - v(())
        for a in (e, k, s, q):  # efficiency: scores sum to v(all) - v(none)
            assert abs(a.scores.sum() - total) <= 1e-9 * max(1.0, abs(total)), (a.method, a.scores.sum(), total)


@pytest.mark.parametrize("method,opts", [("shapley", {}), ("shapley_sampling", {"n_samples": 3}),
                                         ("kernel_shap", {"n_samples": 40})])  # fmt: skip
@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_results_depend_only_on_text_options_and_seed(method, opts, prefix_reuse):
    """Budgets that do not divide the work, shuffled and mixed-length texts, prefix reuse on and off:
    every run equals the first (alone, budget 1) within float64 rounding of another layout."""
    model, tok = _model64("gpt2")
    texts = random_texts(5, 2, 7)
    alone = [Explainer(model, tok, max_batch_size=1).attribute(t, method, **opts) for t in texts]
    for size, tokens, row in BUDGETS:
        ex = Explainer(model, tok, max_batch_size=size, max_batch_tokens=tokens, row_capacity=row,
                       prefix_reuse=prefix_reuse)  # fmt: skip
        order = np.random.default_rng(size or 0).permutation(len(texts))
        got = ex.attribute([texts[i] for i in order], method, **opts)
        for j, i in enumerate(order):
            np.testing.assert_allclose(got[j].scores, alone[i].scores, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_shared_prefix_tree_equals_full_recompute_and_saves_tokens(name):
    """Coalitions sharing prefixes with each other run over one prefix cache per group: the same
    values as every sequence computed whole, for fewer tokens than the clean-prefix reuse alone."""
    from engine.methods import get, make_options
    from engine.methods._base import perturbation_work

    model, tok = _model64(name)
    texts = random_texts(4, 7, 11)
    tree = Explainer(model, tok, max_batch_tokens=97)
    whole = Explainer(model, tok, prefix_reuse=False)
    grouped_somewhere = False
    for method, opts in [("shapley", {}), ("shapley_sampling", {"n_samples": 6}), ("kernel_shap", {"n_samples": 60})]:
        for a, b in zip(tree.attribute(texts, method, **opts), whole.attribute(texts, method, **opts), strict=True):
            _close(a.scores, b.scores, f"{name} {method}")
        spec, options = get(method), make_options(method, **opts)
        for i, text in enumerate(texts):
            p = tree._clean([tree._prepare(i, text, None)], {})[0]
            work = spec.expand(tree.context, p, options)
            groups = {w.payload.prefix for w in work if w.payload.prefix != p.input_ids}
            with_tree = sum(w.tokens for w in work) + sum(len(g) for g in groups)
            full_ids = [w.payload.prefix[: w.payload.start] + w.payload.ids for w in work]
            clean_only = sum(perturbation_work(tree.context, p, list(ids), True).tokens for ids in full_ids)
            assert with_tree <= clean_only
            grouped_somewhere |= bool(groups) and with_tree < clean_only
    assert grouped_somewhere  # the tree was used, and saved tokens


def test_kernel_shap_draws_pairs_with_kernel_weights():
    present, weights = coalitions(9, 40, seed=5)
    assert present.shape == (40, 9) and np.array_equal(present[1::2], ~present[::2])  # paired with complements
    sizes = present.sum(1)
    assert sizes.min() >= 1 and sizes.max() <= 8
    np.testing.assert_allclose(weights, 8 / (sizes * (9 - sizes)))
    assert np.linalg.matrix_rank(np.vstack([present[::2], np.ones(9)])) == 9  # the fit is determined


def test_long_texts_and_bad_options_are_clear_errors():
    model, tok = _model64("llama")
    ex = Explainer(model, tok)
    long = " ".join(["the"] * 15)
    with pytest.raises(ValueError, match="at most 14 .* use shapley_sampling or kernel_shap"):
        ex.attribute(long, "shapley")
    assert not ex.attribute([long, "the cat"], "shapley")[0] and ex.attribute([long, "the cat"], "shapley")[1]
    for kwargs, error in [({"n_samples": 0}, ValueError), ({"antithetic": 1}, TypeError), ({"value": "p"}, ValueError),
                          ({"seed": -1}, ValueError), ({"n_samples": 2.0}, TypeError)]:  # fmt: skip
        with pytest.raises(error):
            ex.attribute("the cat sat", "shapley_sampling", **kwargs)
    with pytest.raises(ValueError, match="n_samples must be >= 2"):
        ex.attribute("the cat sat", "kernel_shap", n_samples=1)
