"""LRP (AttnLRP) on SmolLM2: the engine's batches against LXT 2.1 run one text at a time, and against the
cost floor of plain gradient x input (one forward + one backward of the same batches, no rules).

    python -m pytest benchmarks/bench_lrp.py --benchmark-json out/bench_lrp.json
    python benchmarks/summarize.py out/bench_lrp.json

Conditions: CPU, float32, torch threads = 2, the 24 prompts of `prompts.py`, SDPA attention for all
three. LXT runs in a subprocess (it patches `transformers`); its figure is the loop over the prompts it
times itself after a warm-up text (`extra_info.loop_seconds_median`), without process start and model load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY, median_seconds, succeeded

from engine import Explainer
from engine.methods import lrp
from engine.methods._text_batches import text_work

ROUNDS = 3  # each round is a few seconds: report the median of three
LXT_SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "methods" / "lrp" / "lxt_relevance.py"


@dataclass(frozen=True)
class _Rule:
    rule: str | None  # None: no rules (accepted by `lrp_rules`, not by the options), the floor


@pytest.fixture(scope="module")
def engine(smollm2):
    model, tok = smollm2
    ex = Explainer(model, tok, progress=False)
    ex.attribute("warm up the engine", "lrp")
    return ex


@pytest.mark.parametrize("rule", [None, "attnlrp", "cplrp"], ids=["floor-grad-x-input", "attnlrp", "cplrp"])
def test_lrp_engine(benchmark, engine, prompts, rule):
    """The loop alone on prepared texts: the rules' cost over the same forward+backward batches."""
    benchmark.group = "lrp"
    benchmark.name = f"engine {rule or 'floor: plain gradient x input'}"
    prepared = [engine._prepare(i, p, None) for i, p in enumerate(prompts)]
    work = [text_work(engine.context, p, lrp.run_batch, _Rule(rule)) for p in prepared]
    benchmark.pedantic(lambda: engine.loop.run(work), rounds=ROUNDS)


def test_lrp_engine_attribute(benchmark, engine, prompts):
    """The facade end to end (validation, batching, results)."""
    benchmark.group = "lrp"
    results = benchmark.pedantic(lambda: engine.attribute(prompts, "lrp"), rounds=ROUNDS)
    succeeded(results)
    benchmark.extra_info["attributions_per_s"] = len(prompts) / median_seconds(benchmark)


def test_lrp_lxt_one_text_at_a_time(benchmark, prompts):
    benchmark.group = "lrp"
    loops = []

    def run():
        proc = subprocess.run(
            [sys.executable, str(LXT_SCRIPT), "attnlrp", "0" if TINY else "smollm2", *prompts],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        loops.append(json.loads(proc.stdout)["seconds"])

    benchmark.pedantic(run, rounds=ROUNDS)
    loop = sorted(loops)[len(loops) // 2]
    benchmark.extra_info["loop_seconds_median"] = loop
    benchmark.extra_info["attributions_per_s"] = len(prompts) / loop
