"""Shapley value sampling on SmolLM2: the engine against Captum `ShapleyValueSampling` at each of its
`perturbations_per_eval` settings, same permutations (seeded alike), same results, one run.

    python -m pytest benchmarks/bench_shapley.py --benchmark-json out/bench_shapley.json
    python benchmarks/summarize.py out/bench_shapley.json

Conditions: CPU, float32, torch threads = 2, the 24 prompts of `prompts.py`, 25 permutations,
antithetic off (Captum has no antithetic sampling), the target's probability as the value. The
engine's `extra_info` gives the tokens it computed with its shared-prefix tree, what clean-prefix
reuse alone and a full recompute of the same distinct sequences would compute. `test_accuracy_per_cost`:
the estimators' error against exact Shapley per budget (a table and docs/figures/shapley_accuracy.png).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, median_seconds, run_once, succeeded

from engine import Explainer
from engine import reference as ref

N_SAMPLES = 25
SEED = 0
CAPTUM_PPE = (8, 32, 64)  # ppe 1 alone runs over 10 minutes on this CPU (one forward per sequence)


@pytest.fixture(scope="module")
def targets(smollm2, prompts):
    model, tok = smollm2
    with torch.no_grad():
        return [int(ref.scored_logits(model(**tok(p, return_tensors="pt")).logits).argmax()) for p in prompts]


@pytest.fixture(scope="module")
def engine(smollm2, prompts):
    model, tok = smollm2
    ex = Explainer(model, tok, progress=False)
    ex.attribute("warm up the engine", "shapley_sampling", n_samples=2)
    return ex


def _tokens(ex, prompts) -> dict:
    """Tokens the distinct coalition sequences cost, three ways: with the shared-prefix tree (the
    suffixes plus each group's prefix cache), with clean-prefix reuse alone (each from its first
    replaced token), and recomputed whole (as Captum does); each plus the clean text's cache."""
    from engine.methods import get
    from engine.methods._base import perturbation_work

    spec = get("shapley_sampling")
    opts = spec.options(n_samples=N_SAMPLES, antithetic=False, seed=SEED)
    tree = clean = whole = 0
    for i, text in enumerate(prompts):
        p = ex._prepare(i, text, 0)
        n = len(p.input_ids)
        work = spec.expand(ex.context, p, opts)
        groups = {w.payload.prefix for w in work if w.payload.prefix != p.input_ids}
        tree += n + sum(w.tokens for w in work) + sum(len(g) for g in groups)
        sequences = [w.payload.prefix[: w.payload.start] + w.payload.ids for w in work]
        clean += n + sum(perturbation_work(ex.context, p, list(ids), True).tokens for ids in sequences)
        whole += len(work) * n
    return {"tokens_shared_prefix_tree": tree, "tokens_clean_prefix_only": clean, "tokens_full_recompute": whole}


ENGINE_RESULTS: list = []  # the engine's run, which the Captum runs are compared with (computed once)


def _engine_results(ex, prompts):
    if not ENGINE_RESULTS:
        ENGINE_RESULTS.extend(
            ex.attribute(prompts, "shapley_sampling", n_samples=N_SAMPLES, antithetic=False, seed=SEED)
        )
    return ENGINE_RESULTS


def test_shapley_sampling_engine(benchmark, engine, prompts):
    ex = engine
    benchmark.group = "shapley_sampling"
    ENGINE_RESULTS.clear()
    results = succeeded(run_once(benchmark, lambda: _engine_results(ex, prompts)))
    benchmark.extra_info.update(
        **_tokens(ex, prompts),
        sequences=sum(a.n_evaluations for a in results),
        attributions_per_s=len(prompts) / median_seconds(benchmark),
    )


@pytest.mark.parametrize("ppe", CAPTUM_PPE)
def test_shapley_sampling_captum(benchmark, smollm2, prompts, targets, ppe, engine):
    from captum.attr import ShapleyValueSampling

    model, tok = smollm2
    fill = tok.pad_token_id or 0
    out = []

    def run():
        out.clear()
        for p, target in zip(prompts, targets, strict=True):
            ids = tok(p, return_tensors="pt")["input_ids"]
            torch.manual_seed(SEED)
            svs = ShapleyValueSampling(lambda x, t=target: model(x.long()).logits[:, -1].softmax(-1)[:, t])
            out.append(svs.attribute(ids, baselines=fill, n_samples=N_SAMPLES, perturbations_per_eval=ppe)[0])

    benchmark.group = "shapley_sampling"
    with torch.no_grad():
        run_once(benchmark, run)
    # the same permutations: the same values, within float32 noise of a different batch layout
    ours = _engine_results(engine, prompts)
    worst = max(
        float(np.abs(a.scores - c.numpy()).max() / max(np.abs(c.numpy()).max(), 1e-9))
        for a, c in zip(ours, out, strict=True)
    )
    benchmark.extra_info["max_relative_difference_to_engine"] = worst
    assert worst < 1e-3


SAMPLES_PER_TOKEN = (8, 16, 32, 64, 128)
ACCURACY_MAX_TOKENS = 14  # exact Shapley (2^n coalitions) is the yardstick: the prompts it allows
# tiny mode draws its figure elsewhere: a random model's curves must not replace the real one
FIGURE = (Path(tempfile.gettempdir()) if TINY else Path(__file__).resolve().parent.parent / "docs" / "figures") / (
    "shapley_accuracy.png"
)


def _estimators(n: int, s: int) -> dict[str, tuple[str, dict]]:
    """Each estimator at a budget of about `s` model evaluations per token (s * n sequences in all)."""
    return {
        "permutation": ("shapley_sampling", {"n_samples": s, "antithetic": False}),
        "antithetic permutation": ("shapley_sampling", {"n_samples": max(1, s // 2), "antithetic": True}),
        "kernel SHAP (paired)": ("kernel_shap", {"n_samples": s * n}),
    }


def test_accuracy_per_cost(benchmark, engine, prompts):
    """Error against exact `shapley` on the prompts of at most 14 tokens: mean over prompts of the
    relative L2 error and of Spearman's rho, per estimator and budget (seed 0); a table in
    `extra_info` and a matplotlib figure in docs/figures/. Each (estimator, budget) is one call per
    text length (the options depend on n), so the texts' coalitions share batches."""
    from engine.metrics import spearman

    ex = engine
    short = [p for p in prompts if len(ex.tokenizer(p)["input_ids"]) <= ACCURACY_MAX_TOKENS]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(short):
        by_length.setdefault(len(ex.tokenizer(p)["input_ids"]), []).append(i)
    benchmark.group = "shapley accuracy per cost"
    table: dict[str, dict[int, dict]] = {}

    def run():
        exact = ex.attribute(short, "shapley")
        for s in SAMPLES_PER_TOKEN:
            for name in _estimators(1, s):
                got = [None] * len(short)
                for n, indices in by_length.items():
                    method, options = _estimators(n, s)[name]
                    for i, a in zip(indices, ex.attribute([short[i] for i in indices], method, **options), strict=True):
                        got[i] = a
                pairs = list(zip(got, exact, strict=True))
                errors = [np.linalg.norm(a.scores - e.scores) / np.linalg.norm(e.scores) for a, e in pairs]
                rhos = [spearman(a.scores, e.scores)[0] for a, e in pairs]
                table.setdefault(name, {})[s] = {
                    "relative_l2": float(np.mean(errors)),
                    "spearman": float(np.nanmean(rhos)),
                    "evaluations": int(sum(a.n_evaluations for a in got)),
                }

    run_once(benchmark, run)
    benchmark.extra_info.update(prompts=len(short), table=table)
    _figure(table, len(short))
    print(f"\n{len(short)} prompts of <= {ACCURACY_MAX_TOKENS} tokens; samples/token: relative L2 / Spearman")
    for name, rows in table.items():
        print(f"  {name:24s} " + "  ".join(f"{s}: {r['relative_l2']:.3f}/{r['spearman']:.3f}" for s, r in rows.items()))


def _figure(table, n_prompts: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, rows in table.items():
        budgets = list(rows)
        axes[0].plot(budgets, [rows[s]["relative_l2"] for s in budgets], marker="o", label=name)
        axes[1].plot(budgets, [rows[s]["spearman"] for s in budgets], marker="o", label=name)
    for ax, label in zip(axes, ("relative L2 error (mean)", "Spearman rho (mean)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("model evaluations per token")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Shapley estimators against exact Shapley, SmolLM2, {n_prompts} prompts of <= 14 tokens", fontsize=9)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120)
    plt.close(fig)
