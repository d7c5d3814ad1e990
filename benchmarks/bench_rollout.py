"""Attention rollout: the batched torch path (full matrix and row variant) against the reference's
per-text loop and against the floor of reading the attention once; the engine's `rollout` method
(forward passes included) against the reference run text by text.

    python -m pytest benchmarks/bench_rollout.py --benchmark-json out/bench_rollout.json
    python benchmarks/summarize.py out/bench_rollout.json

Conditions: CPU, float32, torch threads = 2. Synthetic attention: B = 32 sequences, L = 30 layers,
H = 9 heads (SmolLM2's shape), S = 64 and 256, causal softmax of random scores. The floor is a plain
mean over heads of every layer (reads B*H*S*S*L floats once, writes B*S*S*L): rollout from given
attentions is memory-bound, so that is the least any implementation must spend. Engine entries:
SmolLM2, the first 20 prompts of `prompts.txt`, mean fusion, the row read (`full_matrix=False`) and
the full matrix, with attention maps from eager attention and recomputed from q and k (SDPA).
Median of 5 rounds for the synthetic entries (3 for the reference loop), of 7 for the model entries.
"""

from __future__ import annotations

import pytest
import torch
from conftest import median_seconds, scaled

from engine import Explainer
from engine import reference as ref
from kernels import rollout

B, L, H = scaled(32, 2), scaled(30, 2), scaled(9, 2)


@pytest.fixture(scope="module", params=scaled([64, 256], [16]), ids=lambda s: f"S{s}")
def attentions(request):
    torch.set_num_threads(2)
    size = request.param
    gen = torch.Generator().manual_seed(0)
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    layers = []
    for _ in range(L):
        scores = torch.randn(B, H, size, size, generator=gen).masked_fill(~causal, float("-inf"))
        layers.append(torch.softmax(scores, dim=-1))
    return size, layers


def _bench(benchmark, group, fn, rounds=5):
    benchmark.group = group
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)


def _read_bandwidth(benchmark, size: int) -> None:
    """GB/s of attention read (B*H*S*S*L float32, once): these passes are memory-bound."""
    benchmark.extra_info["attention_read_GB_per_s"] = B * H * size * size * L * 4 / median_seconds(benchmark) / 1e9


def test_floor_read_once(benchmark, attentions):
    size, layers = attentions
    _bench(benchmark, f"rollout S={size}", lambda: [a.mean(dim=1) for a in layers])
    _read_bandwidth(benchmark, size)


def test_torch_row_engine(benchmark, attentions):
    size, layers = attentions
    _bench(benchmark, f"rollout S={size}", lambda: rollout(layers, rows=[size - 1] * B, backend="torch"))
    _read_bandwidth(benchmark, size)


def test_torch_full_engine(benchmark, attentions):
    size, layers = attentions
    _bench(benchmark, f"rollout S={size}", lambda: rollout(layers, backend="torch"))


def test_reference_per_text_loop(benchmark, attentions):
    size, layers = attentions

    def loop():
        return [ref.attention_rollout([a[b : b + 1] for a in layers])[-1] for b in range(B)]

    _bench(benchmark, f"rollout S={size}", loop, rounds=3)


# ------------------------------------------------------------------------------ the method end to end


@pytest.fixture(scope="module", params=["eager", "recompute"])
def engine(smollm2, request):
    model, tok = smollm2
    ex = Explainer(model, tok, progress=False, attention_maps=request.param)
    ex.attribute("warm up the engine", "rollout")
    return ex


@pytest.mark.parametrize("full_matrix", [False, True], ids=["row", "full"])
def test_rollout_method_engine(benchmark, engine, prompts, full_matrix):
    benchmark.extra_info["attention_maps"] = engine.attention_maps
    _bench(
        benchmark,
        "rollout method (20 prompts)",
        lambda: engine.attribute(prompts[:20], "rollout", full_matrix=full_matrix),
        rounds=7,
    )


def test_rollout_method_reference_text_by_text(benchmark, smollm2, prompts):
    model, tok = smollm2
    _bench(
        benchmark, "rollout method (20 prompts)", lambda: [ref.compute_rollout(model, tok, p) for p in prompts[:20]], 7
    )
