"""The oracle itself: hand-checkable cases, the seed's literal code, and Captum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    References,
    assert_close,
    assert_within_fp32_noise,
    float64_default,
    make_tokenizer,
    random_texts,
    tiny_gpt2,
    tiny_llama,
)
from seed_spec import (
    seed_attention_rollout,
    seed_evaluate_faithfulness,
    seed_gradient_weighted_attention,
    seed_leave_one_out_attribution,
    seed_sliding_window_occlusion,
)

from engine import reference as ref
from engine.models import replacement_id

# ------------------------------------------------------------------------------------------- rollout


def test_rollout_hand_computed():
    # one head, two layers; A = [[1, 0], [.5, .5]] -> A' = .5 A + .5 I = [[1, 0], [.25, .75]]
    a = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    one = ref.attention_rollout([a])
    assert_close(one, [[1, 0], [0.25, 0.75]])
    two = ref.attention_rollout([a, a])
    # [[1, 0], [.25, .75]] @ [[1, 0], [.25, .75]] = [[1, 0], [.25 + .1875, .5625]]
    assert_close(two, [[1, 0], [0.4375, 0.5625]])


def test_head_fusions_hand_computed():
    h1 = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    h2 = torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    attn = torch.stack([h1, h2])[None]
    eye = torch.eye(2)
    for fusion, fused in [("mean", (h1 + h2) / 2), ("max", torch.maximum(h1, h2)), ("min", torch.minimum(h1, h2))]:
        assert_close(ref.attention_rollout([attn], fusion), 0.5 * fused + 0.5 * eye, what=fusion)


def _random_attentions(n_layers, heads, seq, causal=False, generator=None):
    """float64 attention rows (cast them to float32 for the float32 runs)."""
    out = []
    for _ in range(n_layers):
        scores = torch.randn(1, heads, seq, seq, generator=generator, dtype=torch.float64)
        if causal:
            scores = scores.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), float("-inf"))
        out.append(scores.softmax(-1))
    return out


def _discard_well_conditioned(attentions, fusion, discard, margin=1e-5) -> bool:
    for a in attentions:
        fused = ref.fuse_heads(a[0], fusion)
        gaps = (fused - ref.discard_threshold(fused, discard)).abs()
        if discard and (gaps[gaps > 0] < margin).any():
            return False
    return True


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.3, 0.6])
@pytest.mark.parametrize("seq", [1, 5, 13])
def test_rollout_equals_seed_code(fusion, discard, seq):
    # draw until the seed is well defined (no row emptied by the discard; that case has its own test) and
    # no fused entry sits within rounding of the discard threshold (a step function: a float32 run may
    # keep or drop such an entry, the seed's own float32 run included)
    for _ in range(100):
        attentions = _random_attentions(3, 4, seq)
        with float64_default():  # the seed's own torch.eye in float64: the seed's value in float64
            exact = seed_attention_rollout(attentions, fusion, discard)
        if torch.isfinite(exact).all() and _discard_well_conditioned(attentions, fusion, discard):
            break
    assert torch.isfinite(exact).all()
    attentions32 = [a.float() for a in attentions]
    fp32 = seed_attention_rollout(attentions32, fusion, discard)
    ours = ref.attention_rollout(attentions32, fusion, discard)
    assert_within_fp32_noise(ours, exact, fp32, what=f"{fusion} {discard}")


def test_discard_empty_row_keeps_only_itself():
    # row 1 is entirely below the 0.5 quantile of the flattened matrix: the seed would divide 0 by 0
    fused = torch.tensor([[0.9, 0.8, 0.7], [0.01, 0.02, 0.03], [0.5, 0.6, 0.95]])
    out = ref.discard_low_attention(fused, 0.5)
    threshold = fused.flatten().quantile(0.5)  # 0.6
    assert threshold.item() == pytest.approx(0.6)
    assert_close(out[0], [0.9 / 2.4, 0.8 / 2.4, 0.7 / 2.4])
    assert_close(out[1], [0.0, 1.0, 0.0])  # e_1
    assert_close(out[2], [0.0, 0.6 / 1.55, 0.95 / 1.55])
    seed = seed_attention_rollout([fused[None, None]], "mean", 0.5)
    assert torch.isnan(seed).any()  # the seed's NaN, which the reference avoids
    assert torch.isfinite(ref.attention_rollout([fused[None, None]], "mean", 0.5)).all()


def test_causal_quantile_option():
    attentions = _random_attentions(2, 3, 9, causal=True)
    plain = ref.attention_rollout(attentions)
    # on a causal matrix the flattened quantile at 0.3 is 0 (the upper triangle): nothing is discarded
    assert_close(ref.attention_rollout(attentions, discard_ratio=0.3), plain)
    causal = ref.attention_rollout(attentions, discard_ratio=0.3, causal_quantile=True)
    assert not torch.allclose(causal, plain)
    fused = attentions[0][0].mean(0)
    rows, cols = torch.tril_indices(9, 9)
    threshold = fused[rows, cols].quantile(0.3)
    kept = fused * (fused >= threshold)
    assert_close(ref.discard_low_attention(fused, 0.3, causal_quantile=True), kept / kept.sum(-1, keepdim=True))


# ---------------------------------------------------------------------------------- sliding windows


def test_window_scores_per_token_hand_computed():
    regions = [{"start": 0, "end": 2, "impact": 1.0}, {"start": 1, "end": 3, "impact": 3.0}]
    # token 0: window 0 only; token 1: both -> (1 + 3) / 2; token 2: window 1 only
    assert_close(ref.window_scores_per_token(regions, 3), [1.0, 2.0, 3.0])


# --------------------------------------------------------------------- the seed's model-based functions


@pytest.mark.parametrize("model_fn,tok_kwargs", [(tiny_llama, {}), (tiny_gpt2, {"with_pad": False})])
def test_perturbation_references_equal_seed_code(model_fn, tok_kwargs):
    """The oracle (float32) within the float32 noise of the seed's own code (float64 vs float32)."""
    model, tok = model_fn(), make_tokenizer(**tok_kwargs)
    seed = References(model)
    for text in random_texts(4, 3, 10):
        scores, tokens = ref.leave_one_out_attribution(model, tok, text)
        (exact, seed_tokens), (fp32, _) = seed(seed_leave_one_out_attribution, tok, text)
        assert tokens == seed_tokens
        assert_within_fp32_noise(scores, exact, fp32, what="leave_one_out")
        regions = ref.sliding_window_occlusion(model, tok, text, window_size=2)
        exact, fp32 = seed(seed_sliding_window_occlusion, tok, text, window_size=2)
        by_start = sorted(regions, key=lambda r: r["start"])
        impacts = [[r["impact"] for r in sorted(x, key=lambda r: r["start"])] for x in (exact, fp32)]
        assert_within_fp32_noise([r["impact"] for r in by_start], *impacts, what="windows")
        assert [r["start"] for r in regions] == [r["start"] for r in fp32]  # the same sort of the same values
        attributions = np.random.rand(len(tokens))  # no ties: the seed's argsort is well defined
        ks = [k for k in (1, 3, 5) if k <= len(tokens)]
        ours = ref.evaluate_faithfulness(model, tok, text, attributions, ks)
        exact, fp32 = seed(seed_evaluate_faithfulness, tok, text, attributions, ks)
        for k in ks:
            for metric in ("sufficiency", "comprehensiveness"):
                got, e, r = (d[f"k={k}"][metric] for d in (ours, exact, fp32))
                assert_within_fp32_noise(got, e, r, what=f"{metric} k={k}")


@pytest.mark.parametrize("model_fn,tok_kwargs", [(tiny_llama, {}), (tiny_gpt2, {"with_pad": False})])
def test_grad_attention_equals_seed_code(model_fn, tok_kwargs):
    model, tok = model_fn(), make_tokenizer(**tok_kwargs)
    seed = References(model)
    for text in random_texts(3, 2, 10):
        matrix, tokens = ref.gradient_weighted_attention(model, tok, text)
        (exact, _), (fp32, _) = seed(seed_gradient_weighted_attention, tok, text)
        assert matrix.shape == (len(tokens), len(tokens))
        assert np.abs(matrix).max() > 0
        assert_within_fp32_noise(matrix, exact, fp32, what="grad_attention")


def test_grad_attention_works_with_frozen_weights(llama):
    model, tok = llama
    text = "the cat sat on the mat"
    expected, _ = ref.gradient_weighted_attention(model, tok, text)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen, _ = ref.gradient_weighted_attention(model, tok, text)
    assert_close(frozen, expected)


def test_rollout_and_raw_attention_rows(llama):
    model, tok = llama
    text = "the dog ran to the park"
    inputs = tok(text, return_tensors="pt")
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    assert_close(ref.extract_raw_attention(model, tok, text, layer=1), attentions[1][0].mean(0)[-1])
    assert_close(ref.compute_rollout(model, tok, text, "max"), seed_attention_rollout(attentions, "max")[-1])


def test_get_prediction(llama):
    model, tok = llama
    text = "the cat sat"
    with torch.no_grad():
        expected = model(**tok(text, return_tensors="pt")).logits[0, -1].argmax()
    assert ref.get_prediction(model, tok, text) == tok.decode([int(expected)])


# ---------------------------------------------------------------------------- integrated gradients


@pytest.mark.parametrize("method", ref.IG_METHODS)
@pytest.mark.parametrize("n", [2, 7, 50])
def test_ig_steps_equal_captum(method, n):
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters(method)
    ours_alphas, ours_weights = ref.ig_steps(n, method)
    assert_close(ours_alphas, alphas(n), rtol=1e-12, atol=1e-12)
    assert_close(ours_weights, step_sizes(n), rtol=1e-12, atol=1e-12)


def _captum_ig(model, tok, text, target_id, n_steps, method, baseline):
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    ids = tok(text, return_tensors="pt")["input_ids"]

    def forward_ids(input_ids):
        return ref.scored_logits_batch(model(input_ids).logits)[:, target_id]

    def forward_embeds(embeds):
        return ref.scored_logits_batch(model(inputs_embeds=embeds).logits)[:, target_id]

    if baseline == "replacement":
        lig = LayerIntegratedGradients(forward_ids, model.get_input_embeddings())
        base = torch.full_like(ids, replacement_id(tok))
        attr = lig.attribute(ids, baselines=base, n_steps=n_steps, method=method)
    else:
        x = model.get_input_embeddings()(ids).detach()
        attr = IntegratedGradients(forward_embeds).attribute(
            x, baselines=torch.zeros_like(x), n_steps=n_steps, method=method
        )
    return attr.sum(-1)[0].detach().numpy()


@pytest.mark.parametrize("baseline", ["replacement", "zeros"])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
def test_ig_equals_captum(family, baseline, method):
    _, model, tok = family
    captum = References(model)
    got, exact, fp32 = [], [], []
    for text in random_texts(4, 2, 8):
        scores, tokens, _ = ref.integrated_gradients(model, tok, text, n_steps=9, method=method, baseline=baseline)
        with torch.no_grad():
            target = int(ref.scored_logits(model(**tok(text, return_tensors="pt")).logits).argmax())
        assert len(scores) == len(tokens)
        e, r = captum(_captum_ig, tok, text, target, 9, method, baseline)
        got.append(scores), exact.append(e), fp32.append(r)
    # the oracle within the float32 noise of Captum itself (Captum in float64 vs float32), over all texts
    assert_within_fp32_noise(got, exact, fp32, what=f"IG {method} {baseline}")


def test_ig_completeness_gap_shrinks_with_steps(llama):
    model, tok = llama
    text = "the big dog ran over the river to the city"
    gaps = [
        abs(ref.integrated_gradients(model, tok, text, n_steps=n, method="riemann_trapezoid")[2])
        for n in (2, 4, 16, 64)
    ]
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3]
    assert gaps[3] < 0.05 * gaps[0]  # the trapezoid rule's error falls as 1/n^2
    gauss = [abs(ref.integrated_gradients(model, tok, text, n_steps=n)[2]) for n in (2, 16)]
    assert gauss[1] < 1e-3 < gauss[0]
