"""`Explainer.evaluate` on a corpus against one call per text (same model, same machine, one run).

    python -m pytest benchmarks/bench_evaluate.py --benchmark-json out/bench_evaluate.json
    python benchmarks/summarize.py out/bench_evaluate.json

Conditions: SmolLM2, CPU, float32, torch threads = 2, the 24 prompts of `prompts.txt`, methods
rollout, leave_one_out and lrp. Two protocols: "full" (k = 1, 3, 5 and deletion curves with 10 steps:
about 80 perturbations per text) and "k1" (the seed's metrics at k = 1 only, no curves: at most 6
perturbations per text, too few to fill a batch alone). One round each (each call is seconds to tens
of seconds), after a warm-up call.
"""

from __future__ import annotations

import pytest
from conftest import median_seconds, run_once

from engine import Explainer

METHODS = ["rollout", "leave_one_out", "lrp"]
PROTOCOLS = {"full": {}, "k1": {"k_values": (1,), "curves": False}}


@pytest.fixture(scope="module")
def engine(smollm2):
    model, tok = smollm2
    ex = Explainer(model, tok, progress=False)
    ex.evaluate(["warm up the engine"], METHODS, k_values=1)
    return ex


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_evaluate_corpus_engine(benchmark, engine, prompts, protocol):
    benchmark.group = f"evaluate-{protocol}"
    ev = run_once(benchmark, lambda: engine.evaluate(prompts, METHODS, **PROTOCOLS[protocol]))
    assert not ev.failures
    benchmark.extra_info["texts_per_s"] = len(prompts) / median_seconds(benchmark)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_evaluate_one_call_per_text(benchmark, engine, prompts, protocol):
    benchmark.group = f"evaluate-{protocol}"
    results = run_once(benchmark, lambda: [engine.evaluate([p], METHODS, **PROTOCOLS[protocol]) for p in prompts])
    assert all(not ev.failures for ev in results)
    benchmark.extra_info["texts_per_s"] = len(prompts) / median_seconds(benchmark)
