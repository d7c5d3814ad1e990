"""Leave-one-out, sliding-window occlusion and integrated gradients on SmolLM2: the engine against the
reference loop and Captum, in one run.

    python -m pytest benchmarks/bench_perturbation.py --benchmark-json out/bench_perturbation.json
    python benchmarks/summarize.py out/bench_perturbation.json

Conditions: CPU, float32, torch threads = 2, the 24 prompts of `prompts.py` (8 to 56 tokens), one
round per measurement after a warm-up call (each call is seconds long). Captum runs each prompt with
the same target and replacement token as the engine. The engine runs with its defaults (cascade
attention); `*_variant` runs it as the earlier layout ("rows": packed rows with a dense 4-D mask; IG
"stacked": steps of equal-length texts only) and with `compile=True` ("compiled"; its warm-up call,
which compiles, is timed into `extra_info["compile_seconds"]`).
Units: attributions/s = prompts / time. Achieved GFLOP/s = FLOPs the method needs / time, where a
perturbation needs 2 x (non-embedding parameters) per recomputed token, 4 x d_attn x keys per
query token per layer for attention, and one LM-head row (2 x d x vocab) per perturbation; the engine
recomputes only from the first changed token (prefix reuse), so that is the count used for all.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import matmul_peak_gflops, median_seconds, run_once, succeeded

from engine import Explainer
from engine import reference as ref

CAPTUM_PPE = (1, 8, 32, 64)
IG_STEPS = 50
IG_INTERNAL = (10, 25, 50)


def _needed_flops(model, lengths, method: str, window: int = 3) -> float:
    cfg = model.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", d // cfg.num_attention_heads)
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    total = 0.0
    for n in lengths:
        starts = range(n) if method == "leave_one_out" else range(n - window + 1)
        for s in starts:
            for pos in range(s, n):
                total += 2 * body + 4 * d_attn * layers * (pos + 1)
            total += 2 * d * vocab
    return total


@pytest.fixture(scope="module")
def targets(smollm2, prompts):
    model, tok = smollm2
    out = []
    with torch.no_grad():
        for p in prompts:
            out.append(int(ref.scored_logits(model(**tok(p, return_tensors="pt")).logits).argmax()))
    return out


def _engine(smollm2, **kwargs):
    model, tok = smollm2
    ex = Explainer(model, tok, progress=False, **kwargs)
    ex.attribute("warm up the engine", "leave_one_out")
    return ex


# the engine's other settings, against its defaults in the same run
VARIANTS = {"rows": {"cascade_attention": False}, "compiled": {"compile": True}}


def _variant(benchmark, smollm2, prompts, variant: str, warm_up) -> Explainer:
    """An Explainer with `VARIANTS[variant]`, warmed up by `warm_up(ex)` on the prompts themselves (a
    compiled engine compiles there: that time is reported, not timed)."""
    model, tok = smollm2
    ex = Explainer(model, tok, progress=False, **VARIANTS[variant])
    start = time.perf_counter()
    warm_up(ex)
    key = "compile_seconds" if variant == "compiled" else "warm_up_seconds"
    benchmark.extra_info[key] = time.perf_counter() - start
    return ex


# --------------------------------------------------------------------------------------- leave-one-out


@pytest.mark.parametrize("max_batch_tokens", [512, 2048, 8192])
def test_loo_engine(benchmark, smollm2, prompts, matmul_peak, max_batch_tokens):
    ex = _engine(smollm2, max_batch_tokens=max_batch_tokens)
    benchmark.group = "leave_one_out"
    results = succeeded(run_once(benchmark, lambda: ex.attribute(prompts, "leave_one_out")))
    seconds = median_seconds(benchmark)
    lengths = [len(a.tokens) for a in results]
    gflops = _needed_flops(smollm2[0], lengths, "leave_one_out") / seconds / 1e9
    matmul_peak = max(matmul_peak, matmul_peak_gflops())
    benchmark.extra_info.update(
        matmul_peak_gflops=matmul_peak,
        achieved_gflops=gflops,
        peak_fraction=gflops / matmul_peak,
        attributions_per_s=len(prompts) / seconds,
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loo_variant(benchmark, smollm2, prompts, variant):
    ex = _variant(benchmark, smollm2, prompts, variant, lambda ex: ex.attribute(prompts, "leave_one_out"))
    benchmark.group = "leave_one_out"
    succeeded(run_once(benchmark, lambda: ex.attribute(prompts, "leave_one_out")))


def test_loo_reference_loop(benchmark, smollm2, prompts):
    model, tok = smollm2
    benchmark.group = "leave_one_out"
    run_once(benchmark, lambda: [ref.leave_one_out_attribution(model, tok, p) for p in prompts])


@pytest.mark.parametrize("ppe", CAPTUM_PPE)
def test_loo_captum(benchmark, smollm2, prompts, targets, ppe):
    from captum.attr import FeatureAblation

    model, tok = smollm2
    fill = tok.pad_token_id or 0

    def run():
        for p, target in zip(prompts, targets, strict=True):
            ids = tok(p, return_tensors="pt")["input_ids"]
            fa = FeatureAblation(lambda x, t=target: model(x).logits[:, -1].softmax(-1)[:, t])
            fa.attribute(ids, baselines=fill, perturbations_per_eval=ppe)

    benchmark.group = "leave_one_out"
    with torch.no_grad():
        run_once(benchmark, run)


# -------------------------------------------------------------------------------------- sliding window


def test_sliding_engine(benchmark, smollm2, prompts, matmul_peak):
    ex = _engine(smollm2)
    benchmark.group = "sliding_window"
    results = run_once(benchmark, lambda: ex.attribute(prompts, "sliding_window", window_size=3))
    seconds = median_seconds(benchmark)
    gflops = _needed_flops(smollm2[0], [len(a.tokens) for a in results], "sliding_window") / seconds / 1e9
    matmul_peak = max(matmul_peak, matmul_peak_gflops())
    benchmark.extra_info.update(
        matmul_peak_gflops=matmul_peak, achieved_gflops=gflops, peak_fraction=gflops / matmul_peak
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sliding_variant(benchmark, smollm2, prompts, variant):
    run = lambda ex: ex.attribute(prompts, "sliding_window", window_size=3)  # noqa: E731
    ex = _variant(benchmark, smollm2, prompts, variant, run)
    benchmark.group = "sliding_window"
    succeeded(run_once(benchmark, lambda: run(ex)))


@pytest.mark.parametrize("ppe", (8, 64))
def test_sliding_captum(benchmark, smollm2, prompts, targets, ppe):
    from captum.attr import Occlusion

    model, tok = smollm2
    fill = tok.pad_token_id or 0

    def run():
        for p, target in zip(prompts, targets, strict=True):
            ids = tok(p, return_tensors="pt")["input_ids"]
            occ = Occlusion(lambda x, t=target: model(x).logits[:, -1, t])
            occ.attribute(ids, sliding_window_shapes=(3,), strides=1, baselines=fill, perturbations_per_eval=ppe)

    benchmark.group = "sliding_window"
    with torch.no_grad():
        run_once(benchmark, run)


# -------------------------------------------------------------------------------- integrated gradients


def test_ig_engine(benchmark, smollm2, prompts):
    ex = _engine(smollm2)
    ex.attribute("warm up", "integrated_gradients", n_steps=4)
    benchmark.group = "integrated_gradients"
    results = run_once(benchmark, lambda: ex.attribute(prompts, "integrated_gradients", n_steps=IG_STEPS))
    gaps = sorted(abs(a.completeness_gap) for a in results)
    benchmark.extra_info.update(median_abs_completeness_gap=gaps[len(gaps) // 2])


IG_VARIANTS = {"stacked": "rows", "compiled": "compiled"}  # IG without cascade attention: equal lengths stacked


@pytest.mark.parametrize("variant", list(IG_VARIANTS))
def test_ig_variant(benchmark, smollm2, prompts, variant):
    run = lambda ex, steps=IG_STEPS: ex.attribute(prompts, "integrated_gradients", n_steps=steps)  # noqa: E731
    ex = _variant(benchmark, smollm2, prompts, IG_VARIANTS[variant], lambda ex: run(ex, 4))
    benchmark.group = "integrated_gradients"
    succeeded(run_once(benchmark, lambda: run(ex)))


@pytest.mark.parametrize("internal_batch_size", IG_INTERNAL)
def test_ig_captum(benchmark, smollm2, prompts, targets, internal_batch_size):
    from captum.attr import LayerIntegratedGradients

    model, tok = smollm2
    fill = tok.pad_token_id or 0

    def run():
        for p, target in zip(prompts, targets, strict=True):
            ids = tok(p, return_tensors="pt")["input_ids"]
            lig = LayerIntegratedGradients(lambda x, t=target: model(x).logits[:, -1, t], model.get_input_embeddings())
            lig.attribute(
                ids,
                baselines=torch.full_like(ids, fill),
                n_steps=IG_STEPS,
                method="gausslegendre",
                internal_batch_size=internal_batch_size,
            )

    benchmark.group = "integrated_gradients"
    run_once(benchmark, run)
