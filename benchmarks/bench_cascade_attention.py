"""Cascade attention on one layer of a leave-one-out batch: the torch path of `kernels.cascade_attention`
against what the dense packed-row layout it replaces computes for the same batch (each row's texts'
prefixes copied into the row's keys, SDPA under a 4-D mask), in one run.

    python -m pytest benchmarks/bench_cascade_attention.py --benchmark-json out/bench_cascade_attention.json
    python benchmarks/summarize.py out/bench_cascade_attention.json

Conditions: CPU, float32, torch threads = 2, SmolLM2's attention shape (9 query heads, 3 key heads,
head dim 64). The batch: leave-one-out suffixes of texts of 8 to 56 tokens (the prompt set's range;
a suffix from position s reads the first s cached positions), laid out by the engine's own layouts
(`runtime.layout`: `CascadeLayout`, and `RowLayout` with rows of 256 tokens) under the default budget
of 2048 tokens; median of 20 rounds. The layouts (intervals, masks) are built once per forward and
shared by its 30 layers, so they are timed apart (`extra_info["layout_seconds"]`), not per layer.
Figures: keys computed per query (what the layout makes the attention score), attention GFLOP/s
counted as 4 x d x heads x keys computed per query.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from conftest import median_seconds, scaled

from engine.runtime.cascade import cascade_intervals
from engine.runtime.layout import CascadeLayout, RowLayout, Suffix
from kernels.cascade_attention import cascade_attention

HQ, HKV, DIM = scaled(9, 4), scaled(3, 2), scaled(64, 16)
BUDGET = scaled(2048, 256)
ROW = 256


def loo_batch(budget: int, seed: int = 0) -> tuple[list[Suffix], list[int]]:
    """Leave-one-out suffixes of random texts of 8 to 56 tokens, whole texts at a time, while the
    cascade layout's cost stays within `budget` -> (suffixes, each text's length)."""
    rng = random.Random(seed)
    suffixes, lengths = [], []
    while True:
        n = rng.randint(8, 56)
        more = [Suffix(len(lengths), s, tuple(rng.randrange(1000) for _ in range(n - s))) for s in range(n)]
        if lengths and CascadeLayout.of(suffixes + more).padded_tokens > budget:
            return suffixes, lengths
        suffixes += more
        lengths.append(n)


@pytest.fixture(scope="module")
def batch():
    torch.set_num_threads(2)
    suffixes, lengths = loo_batch(BUDGET)
    gen = torch.Generator().manual_seed(0)
    prefixes = [(torch.randn(HKV, n, DIM, generator=gen), torch.randn(HKV, n, DIM, generator=gen)) for n in lengths]
    return suffixes, lengths, prefixes, gen


def _flops_info(benchmark, queries: int, keys_per_query: float) -> None:
    flops = 4 * DIM * HQ * queries * keys_per_query
    benchmark.extra_info.update(keys_per_query=keys_per_query, GFLOP_per_s=flops / median_seconds(benchmark) / 1e9)


def test_cascade_torch_engine(benchmark, batch):
    suffixes, lengths, prefixes, gen = batch
    start = time.perf_counter()
    plan = CascadeLayout.of(suffixes)
    intervals = cascade_intervals(suffixes, plan, {"full_attention": None})[0]["full_attention"]
    pk = torch.cat([prefixes[t][0][:, :n] for t, n in plan.prefix_lengths.items()], 1)
    pv = torch.cat([prefixes[t][1][:, :n] for t, n in plan.prefix_lengths.items()], 1)
    layout_seconds = time.perf_counter() - start
    nq = plan.query_tokens
    # a model's (H, N, d) states are views of (N, H, d) memory
    q = torch.randn(nq, HQ, DIM, generator=gen).transpose(0, 1)
    k, v = (torch.randn(nq, HKV, DIM, generator=gen).transpose(0, 1) for _ in range(2))
    benchmark.group = "attention, one layer of a leave-one-out batch"
    with torch.no_grad():
        benchmark.pedantic(lambda: cascade_attention(q, k, v, intervals, pk, pv, backend="torch"), rounds=20)
    _flops_info(benchmark, nq, intervals.bias.shape[-1])
    benchmark.extra_info.update(layout_seconds=layout_seconds, query_tokens=nq, batch_cost=plan.padded_tokens)


def test_dense_rows_sdpa(benchmark, batch):
    """What `forward.packed_suffix_forward`'s attention computes for the batch: rows of suffixes,
    each row's keys [its texts' prefixes | the row], copied per row, and SDPA under the 4-D mask."""
    suffixes, lengths, prefixes, gen = batch
    start = time.perf_counter()
    plan = RowLayout.of(suffixes, lengths, ROW)
    rows, total, width = len(plan.rows), plan.prefix_width, plan.query_width
    allowed = torch.zeros(rows, width, total + width, dtype=torch.bool)
    for r, row in enumerate(plan.rows):
        at = 0
        for i in row:
            s, n = suffixes[i], len(suffixes[i].ids)
            if s.start:
                off = plan.prefix_offsets[r][s.text]
                allowed[r, at : at + n, off : off + s.start] = True
            allowed[r, at : at + n, total + at : total + at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            at += n
        allowed[r, torch.arange(at, width), total + torch.arange(at, width)] = True
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]
    layout_seconds = time.perf_counter() - start
    q = torch.randn(rows, width, HQ, DIM, generator=gen).transpose(1, 2)
    own_k, own_v = (torch.randn(rows, width, HKV, DIM, generator=gen).transpose(1, 2) for _ in range(2))

    def attend():
        keys = own_k.new_zeros(rows, HKV, total, DIM)
        values = own_v.new_zeros(rows, HKV, total, DIM)
        for r, offsets in enumerate(plan.prefix_offsets):  # the per-row prefix copy (the cache)
            for t, off in offsets.items():
                keys[r, :, off : off + lengths[t]] = prefixes[t][0]
                values[r, :, off : off + lengths[t]] = prefixes[t][1]
        keys, values = torch.cat([keys, own_k], 2), torch.cat([values, own_v], 2)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    benchmark.group = "attention, one layer of a leave-one-out batch"
    with torch.no_grad():
        benchmark.pedantic(attend, rounds=20)
    _flops_info(benchmark, rows * width, total + width)
    benchmark.extra_info.update(layout_seconds=layout_seconds, rows=rows, batch_cost=plan.padded_tokens)
