"""Shared benchmark fixtures: SmolLM2 in float32 on 2 threads, the prompt set, the matmul peak.

`ENGINE_BENCH_TINY=1`: every benchmark runs in seconds on a tiny random Llama with SmolLM2's tokenizer,
on fewer prompts and smaller corpora (`scaled`), so that the test suite runs them all with
`--benchmark-disable` (`tests/test_benchmarks.py`) and none can rot. Its times mean nothing."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from prompts import PROMPTS  # noqa: E402

THREADS = 2
TINY = os.environ.get("ENGINE_BENCH_TINY") == "1"


def scaled(full, tiny):
    """A benchmark's size: `full` for the real run, `tiny` under ENGINE_BENCH_TINY=1."""
    return tiny if TINY else full


def tiny_llama_like(config):
    """A random 2-layer Llama with `config`'s vocabulary and special tokens (tiny mode's model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=config.max_position_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(tiny).eval()


@pytest.fixture(scope="session")
def smollm2():
    torch.set_num_threads(THREADS)
    from engine import load_model

    model, tok = load_model("smollm2")
    if TINY:
        model = tiny_llama_like(model.config)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


@pytest.fixture(scope="session")
def model_path(smollm2, tmp_path_factory) -> str:
    """What a benchmark's subprocess loads: "smollm2", or in tiny mode the tiny model saved to a folder."""
    if not TINY:
        return "smollm2"
    path = tmp_path_factory.mktemp("tiny-smollm2")
    model, tok = smollm2
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS) if not TINY else list(PROMPTS[:6])


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
    """Time one call (the work is seconds long); warm-up is the caller's job. The call's own time is
    kept too (`median_seconds`): with --benchmark-disable pytest-benchmark keeps no statistics."""
    start = time.perf_counter()
    result = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.engine_seconds = time.perf_counter() - start
    return result


def succeeded(results: list) -> list:
    """`results`, after checking that every text was attributed (an AttributionFailure is falsy); the
    failures, with their errors, are the assertion's message."""
    failed = [(r.index, r.error) for r in results if not r]
    assert not failed, f"{len(failed)} of {len(results)} texts failed: {failed}"
    return results


def median_seconds(benchmark) -> float:
    """The median time of a benchmark's rounds, or its one call's time where no statistics are kept."""
    if benchmark.stats is not None:
        return benchmark.stats.stats.median
    return getattr(benchmark, "engine_seconds", float("nan"))
