"""Every benchmark runs, in seconds, on a tiny model (ENGINE_BENCH_TINY=1, `--benchmark-disable`): a
benchmark that breaks fails here, not months later when someone runs it by hand. Slow: the
benchmarks' fixtures load SmolLM2's tokenizer (and its weights, which they replace)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_benchmark_runs_on_a_tiny_model():
    env = {**os.environ, "ENGINE_BENCH_TINY": "1", "ENGINE_SOAK_S": "2"}
    files = sorted(str(p) for p in (ROOT / "benchmarks").glob("bench_*.py"))
    assert len(files) >= 9  # corpus, dtype, evaluate, lrp, memory, perturbation, rollout, serve, shapley
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *files, "--benchmark-disable", "-q", "-x", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
