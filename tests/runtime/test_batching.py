"""Batched methods equal the reference run one text at a time, whatever the budget; prefix reuse equals
full recompute; Captum agrees; out-of-memory batches are halved and retried."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    BUDGETS,
    FAMILIES,
    References,
    assert_matches_reference,
    assert_within_fp32_noise,
    faithfulness_values,
    make_tokenizer,
    random_texts,
    tiny_llama,
)

from engine import Explainer
from engine import reference as ref

BATCHED = {
    "leave_one_out": {},
    "sliding_window": {"window_size": 2},
    "integrated_gradients": {"n_steps": 5, "ig_method": "riemann_trapezoid"},
}


def _reference(model, method, tok, text, opts, target):
    """(scores, completeness gap or None) of one text from the reference."""
    if method == "leave_one_out":
        return ref.leave_one_out_attribution(model, tok, text, target_id=target)[0], None
    if method == "sliding_window":
        n = len(tok(text)["input_ids"])
        regions = ref.sliding_window_occlusion(model, tok, text, opts["window_size"], target_id=target)
        return ref.window_scores_per_token(regions, n), None
    scores, _, gap = ref.integrated_gradients(model, tok, text, opts["n_steps"], opts["ig_method"], target_id=target)
    return scores, gap


@pytest.mark.parametrize("family_name", list(FAMILIES))
@pytest.mark.parametrize("method", list(BATCHED))
@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"size{b[0]}-tokens{b[1]}-row{b[2]}")
def test_batched_equals_reference(family_name, method, budget):
    model_fn, tok_fn = FAMILIES[family_name]
    model, tok = model_fn(), tok_fn()
    refs = References(model)
    size, tokens, row = budget
    ex = Explainer(model, tok, max_batch_size=size, max_batch_tokens=tokens, row_capacity=row)
    texts = random_texts(6, 2, 12)
    random.shuffle(texts)
    opts = BATCHED[method]
    got, exact, fp32, gaps, gaps64, gaps32 = [], [], [], [], [], []
    for text, a in zip(texts, ex.attribute(texts, method, **opts), strict=True):
        (e, e_gap), (r, r_gap) = refs(_reference, method, tok, text, opts, a.target_id)
        got.append(a.scores), exact.append(e), fp32.append(r)
        if method == "integrated_gradients":
            gaps.append(a.completeness_gap), gaps64.append(e_gap), gaps32.append(r_gap)
    what = f"{family_name} {method} {budget}"
    assert_within_fp32_noise(got, exact, fp32, what=what)
    assert_within_fp32_noise(gaps, gaps64, gaps32, what=f"{what} completeness gap")
    if method == "sliding_window":
        a = ex.attribute(texts[0], method, **opts)
        expected = ref.sliding_window_occlusion(refs.model64, tok, texts[0], opts["window_size"], target_id=a.target_id)
        impacts = [r["impact"] for r in expected]
        # the order by impact is the reference's wherever two impacts are not within rounding of each other
        if min(np.diff(sorted(impacts)), default=1.0) > 1e-5 * max(map(abs, impacts)):
            assert [r["start"] for r in a.regions] == [r["start"] for r in expected]


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"size{b[0]}-tokens{b[1]}")
def test_faithfulness_batched_equals_reference(budget):
    model, tok = tiny_llama(), make_tokenizer()
    refs = References(model)
    size, tokens, row = budget
    ex = Explainer(model, tok, max_batch_size=size, max_batch_tokens=tokens, row_capacity=row)
    for text in random_texts(3, 5, 12):
        scores = np.random.rand(len(tok(text)["input_ids"]))
        got = ex.faithfulness(text, scores, k_values=(1, 2, 5))
        target = ex.attribute(text, "raw_attention").target_id
        exact, fp32 = refs(ref.evaluate_faithfulness, tok, text, scores, (1, 2, 5), target_id=target)
        assert_within_fp32_noise(faithfulness_values(got), faithfulness_values(exact), faithfulness_values(fp32))


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "rows"])
@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_prefix_reuse_equals_full_recompute(family_name, cascade):
    model_fn, tok_fn = FAMILIES[family_name]
    model, tok = model_fn(), tok_fn()
    refs = References(model)
    texts = random_texts(8, 1, 14)
    reuse = Explainer(model, tok, max_batch_tokens=40, row_capacity=9, cascade_attention=cascade)
    full = Explainer(model, tok, prefix_reuse=False, max_batch_tokens=40)
    assert reuse.prefix_reuse and not full.prefix_reuse and reuse.context.cascade == cascade
    for method, opts in (("leave_one_out", {}), ("sliding_window", {"window_size": 1})):
        for ex in (reuse, full):
            got, exact, fp32 = [], [], []
            for text, a in zip(texts, ex.attribute(texts, method, **opts), strict=True):
                (e, _), (r, _) = refs(_reference, method, tok, text, opts, a.target_id)
                got.append(a.scores), exact.append(e), fp32.append(r)
            assert_within_fp32_noise(got, exact, fp32, what=f"{family_name} {method} reuse={ex.prefix_reuse}")


@pytest.mark.parametrize("budget,row", [(40, 9), (64, 8), (300, 32)])
def test_suffix_batches_hold_at_most_the_budget_in_padded_tokens(budget, row):
    """The budget bounds what a batch holds: rows x (cached prefix columns + query columns), read off
    the 4-D masks the model actually receives (a lone item larger than the budget runs alone)."""
    model, tok = tiny_llama(), make_tokenizer()
    ex = Explainer(model, tok, max_batch_tokens=budget, row_capacity=row, cascade_attention=False)
    seen = []

    def record(module, args, kwargs):
        cache, mask = kwargs.get("cache", kwargs.get("past_key_values")), kwargs.get("attention_mask")
        if cache is not None and cache.get_seq_length() > 0:  # a suffix batch over prefix caches
            seen.append((mask.shape[0] * mask.shape[-1], kwargs["position_ids"]))

    handle = model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ex.attribute(random_texts(9, 3, 16), "leave_one_out")
    finally:
        handle.remove()
    assert seen
    for padded, positions in seen:
        lone = int((positions[:, 1:] <= positions[:, :-1]).sum()) == 0 and positions.shape[0] == 1
        assert padded <= budget or lone, (padded, budget)


@pytest.mark.parametrize("budget", [40, 64, 300])
def test_cascade_batches_hold_at_most_the_budget(budget):
    """With cascade attention a batch holds its query tokens and the prefix positions they read, read
    off the forward the model actually runs (the row's length, the concatenated prefixes' length)."""
    from engine.runtime.attention_capture import attention_modules
    from engine.runtime.cascade import _STATE

    model, tok = tiny_llama(), make_tokenizer()
    ex = Explainer(model, tok, max_batch_tokens=budget)
    assert ex.context.cascade
    seen = []

    def record(module, args, kwargs):
        plan = getattr(attention_modules(model)[0][0], _STATE)[1]
        if plan.prefix_kv is not None:  # a suffix batch over prefix caches
            positions = kwargs["position_ids"][0]
            seen.append((positions.numel() + plan.prefix_kv[0][0].shape[1], positions))

    handle = model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ex.attribute(random_texts(9, 3, 16), "leave_one_out")
    finally:
        handle.remove()
    assert len(seen) > 1
    for held, positions in seen:
        lone = bool((positions[1:] == positions[:-1] + 1).all())  # one suffix, over the budget alone
        assert held <= budget or lone, (held, budget)


def test_classifiers_recompute_in_full():
    model, tok = FAMILIES["bert"][0](), FAMILIES["bert"][1]()
    assert not Explainer(model, tok).prefix_reuse


def test_leave_one_out_equals_captum_feature_ablation(family):
    from captum.attr import FeatureAblation

    name, model, tok = family
    refs = References(model)
    ex = Explainer(model, tok, max_batch_tokens=50)
    for text in random_texts(3, 2, 10):
        a = ex.attribute(text, "leave_one_out")
        ids = tok(text, return_tensors="pt")["input_ids"]

        def captum(m, target=a.target_id, ids=ids):
            def prob(input_ids):
                return ref.scored_logits_batch(m(input_ids).logits).softmax(-1)[:, target]

            fill = tok.pad_token_id or 0
            return FeatureAblation(prob).attribute(ids, baselines=fill, perturbations_per_eval=4)[0].detach()

        # Captum's float32 error, measured against Captum in float64, bounds the engine's difference
        assert_matches_reference(a.scores, refs, captum, what=name)


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "rows"])
def test_out_of_memory_halves_the_batch_and_warns_once(llama, cascade):
    model, tok = llama
    texts = random_texts(4, 4, 10)

    # a real fault at the model's entry: any forward over more than 12 tokens runs out of memory
    def fail_on_big_batches(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.numel() > 12:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    handle = model.base_model.register_forward_pre_hook(fail_on_big_batches, with_kwargs=True)
    try:
        ex_small_rows = Explainer(model, tok, max_batch_tokens=10_000, row_capacity=2, cascade_attention=cascade)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ex_small_rows.attribute(texts, "leave_one_out")
    finally:
        handle.remove()
    oom_warnings = [w for w in caught if "out of memory" in str(w.message)]
    assert len(oom_warnings) == 1
    refs = References(model)
    for text, a in zip(texts, got, strict=True):
        loo = lambda m, text=text, t=a.target_id: ref.leave_one_out_attribution(m, tok, text, target_id=t)[0]  # noqa: E731
        assert_matches_reference(a.scores, refs, loo, what="after halving")


def test_other_errors_are_not_retried(llama):
    model, tok = llama

    def broken(module, args, kwargs):
        raise RuntimeError("shape mismatch somewhere")

    handle = model.base_model.register_forward_pre_hook(broken, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            Explainer(model, tok).attribute(["the cat sat", "a dog ran"], "leave_one_out")
    finally:
        handle.remove()


def test_progress_bar_can_be_switched(llama, capsys):
    model, tok = llama
    texts = random_texts(20, 2, 5)
    Explainer(model, tok, progress=False).attribute(texts, "leave_one_out")
    assert "leave_one_out" not in capsys.readouterr().err
    Explainer(model, tok, progress=True).attribute(texts, "leave_one_out")
    assert "leave_one_out" in capsys.readouterr().err


def test_bad_budgets(llama):
    for kwargs in ({"max_batch_tokens": 0}, {"max_batch_size": -1}, {"row_capacity": 0}):
        with pytest.raises(ValueError, match=">= 1"):
            Explainer(*llama, **kwargs)
    for kwargs in ({"max_batch_tokens": 2.5}, {"row_capacity": 1.5}, {"max_batch_size": "4"}, {"row_capacity": True}):
        with pytest.raises(TypeError, match="must be an int"):
            Explainer(*llama, **kwargs)
    ex = Explainer(*llama, max_batch_tokens=np.int64(64), max_batch_size=np.int32(3))  # numpy ints are ints
    assert type(ex.loop.scheduler.max_batch_tokens) is int and ex.loop.scheduler.max_batch_size == 3


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "rows"])
@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_packed_clean_caches_equal_one_text_caches(family_name, cascade):
    from engine.runtime.forward import clean_cache

    model_fn, tok_fn = FAMILIES[family_name]
    model, tok = model_fn(), tok_fn()
    refs = References(model)
    runner = Explainer(model, tok, row_capacity=10, cascade_attention=cascade).loop.runner
    texts = [tuple(tok(t)["input_ids"]) for t in random_texts(5, 1, 12)]
    with torch.no_grad():
        packed = runner.build_caches(texts)
        for ids, layers in zip(texts, packed, strict=True):
            exact, fp32 = refs(clean_cache, torch.tensor(ids))  # one text alone: [(keys, values)] per layer
            assert_within_fp32_noise([list(kv) for kv in layers], [list(kv) for kv in exact], [list(kv) for kv in fp32])


def test_bfloat16_model_runs_and_stays_close_to_float32(tmp_path):
    model, tok = tiny_llama(), make_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    fp32 = Explainer.from_pretrained(str(tmp_path))
    bf16 = Explainer.from_pretrained(str(tmp_path), dtype="bfloat16", max_batch_tokens=30, row_capacity=7)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    texts = random_texts(4, 3, 10)
    for method, opts in (("leave_one_out", {}), ("integrated_gradients", {"n_steps": 4})):
        for a, b in zip(fp32.attribute(texts, method, **opts), bf16.attribute(texts, method, **opts), strict=True):
            assert b.scores.dtype == np.float64 and np.isfinite(b.scores).all()
            if a.target_id == b.target_id:  # bf16 has 8 bits of mantissa: ~1e-2 relative
                assert np.abs(a.scores - b.scores).max() <= 0.1 * np.abs(a.scores).max() + 1e-3
    with pytest.raises(ValueError, match="dtype must be"):
        Explainer.from_pretrained(str(tmp_path), dtype="float16x")


def test_compiled_forwards_equal_eager_and_leave_the_model_as_it_was(llama):
    """`compile=True` fuses the decoder layers' MLPs and norms with torch.compile while a batch runs:
    the same results (perturbations, IG through the compiled backward, LRP whose rules replace the
    compiled forwards for its batch), and no instance attribute left on the model."""
    from engine.runtime.compiled import compiled_modules

    model, tok = llama
    texts = random_texts(5, 2, 11)
    eager, compiled = Explainer(model, tok), Explainer(model, tok, compile=True)
    for method, opts in (("leave_one_out", {}), ("integrated_gradients", {"n_steps": 3}), ("lrp", {})):
        refs = References(model)
        got = compiled.attribute(texts, method, **opts)
        for text, a, b in zip(texts, got, eager.attribute(texts, method, **opts), strict=True):
            assert a.target_id == b.target_id
            def eager_scores(m, text=text, t=a.target_id, method=method, opts=opts):
                return Explainer(m, tok).attribute(text, method, target=t, **opts).scores

            assert_matches_reference(a.scores, refs, eager_scores, what=f"compiled {method}")
    assert compiled_modules(model) and not any("forward" in m.__dict__ for m in compiled_modules(model))
    with pytest.raises(TypeError, match="compile must be a bool"):
        Explainer(model, tok, compile="yes")
    with pytest.raises(TypeError, match="cascade_attention must be a bool"):
        Explainer(model, tok, cascade_attention=1)


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "rows"])
def test_the_clean_pass_keeps_the_caches_the_perturbations_read(llama, cascade):
    """The clean pass computes each text's prefix cache; for the texts pinned (the first ones, up to one
    batch budget of tokens) it keeps it, so their perturbations build none; the rest are built when
    first needed; everything is freed after the call; the results are those of the reference."""
    model, tok = llama
    texts = random_texts(6, 3, 10)
    lengths = [len(tok(t)["input_ids"]) for t in dict.fromkeys(texts)]
    refs = References(model)
    for budget in (10_000, 2 * max(lengths)):
        ex = Explainer(model, tok, max_batch_tokens=budget, cascade_attention=cascade)
        got = ex.attribute(texts, "leave_one_out")
        kept = int((np.cumsum(lengths) <= budget).sum())
        caches = ex.loop.caches
        assert (caches.misses, caches.hits >= kept) == (len(lengths) - kept, True), (budget, kept)
        assert caches.live() == 0 and caches.needed() == 0
        for text, a in zip(texts, got, strict=True):
            loo = lambda m, text=text, t=a.target_id: ref.leave_one_out_attribution(m, tok, text, target_id=t)[0]  # noqa: E731
            assert_matches_reference(a.scores, refs, loo, what=f"budget {budget}")
    ig = Explainer(model, tok)
    ig.attribute(texts, "integrated_gradients", n_steps=2)  # no perturbation over the clean text: nothing kept
    assert ig.loop.caches.live() == 0 and ig.loop.caches.needed() == 0
