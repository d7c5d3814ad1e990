"""benchmarks/regress.py: figures from pytest-benchmark JSON, compared with a baseline; a drop past
the margin exits 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "regress.py"


def _bench(fullname, median, **info):
    return {"fullname": f"benchmarks/{fullname}", "name": fullname, "stats": {"median": median}, "extra_info": info}


def _write(folder: Path, captum_s: float, job_ratio: float):
    folder.mkdir(parents=True, exist_ok=True)
    perturbation = [_bench("bench_perturbation.py::test_loo_engine[2048]", 10.0, peak_fraction=0.5),
                    _bench("bench_perturbation.py::test_loo_captum[32]", captum_s),
                    _bench("bench_perturbation.py::test_loo_captum[64]", captum_s + 5)]  # fmt: skip
    corpus = [_bench("bench_corpus.py::test_throughput_job_against_in_memory", 1.0, job_over_in_memory_time=job_ratio)]
    (folder / "bench_perturbation.json").write_text(json.dumps({"benchmarks": perturbation}))
    (folder / "bench_corpus.json").write_text(json.dumps({"benchmarks": corpus}))


def _regress(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_figures_baseline_and_a_regression(tmp_path):
    baseline = tmp_path / "baseline.json"
    _write(tmp_path / "then", captum_s=20.0, job_ratio=1.01)
    assert _regress("--json", tmp_path / "then", "--baseline", baseline, "--update").returncode == 0
    saved = json.loads(baseline.read_text())
    assert saved["leave_one_out: Captum best / engine (time)"] == 2.0  # the best Captum setting over the engine
    assert saved["corpus: engine run / in memory (time)"] == 1.01

    _write(tmp_path / "same", captum_s=18.5, job_ratio=1.05)  # within 20 %: no regression
    done = _regress("--json", tmp_path / "same", "--baseline", baseline)
    assert done.returncode == 0 and "REGRESSED" not in done.stdout, done.stdout

    _write(tmp_path / "worse", captum_s=15.0, job_ratio=1.30)  # 2.0x -> 1.5x, and the job 29 % slower
    done = _regress("--json", tmp_path / "worse", "--baseline", baseline)
    assert done.returncode == 1 and done.stdout.count("REGRESSED") == 2, done.stdout

    assert _regress("--json", tmp_path / "empty", "--baseline", baseline).returncode == 2  # nothing to compare
