"""Shared benchmark fixtures: SmolLM2 in float32 on 2 threads, the prompt set, the matmul peak."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from prompts import PROMPTS  # noqa: E402

THREADS = 2


@pytest.fixture(scope="session")
def smollm2():
    torch.set_num_threads(THREADS)
    from engine import load_model

    model, tok = load_model("smollm2")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


def matmul_peak_gflops(repeats: int = 20) -> float:
    """This machine's fp32 matmul throughput (GFLOP/s, median of `repeats`, best shape) on shapes
    like SmolLM2's linear layers over a full batch (2048 tokens) and a square one. The shared
    machine's speed drifts (one run measured 162, another 320), so the benchmarks measure it at the
    start of the session and again right after each timed engine run, and take the larger."""
    results = []
    for m, k, n in ((2048, 576, 1536), (2048, 1536, 576), (1024, 1024, 1024)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        times.sort()
        results.append(2 * m * k * n / times[len(times) // 2] / 1e9)
    return max(results)


@pytest.fixture(scope="session")
def matmul_peak():
    return matmul_peak_gflops()


def run_once(benchmark, fn):
    """Time one call (the work is seconds long); warm-up is the caller's job."""
    return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
