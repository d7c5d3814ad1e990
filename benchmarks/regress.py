"""Benchmarks that catch regressions: run them, reduce each run to machine-independent figures (ratios
measured within the same run: the engine against its peers and reference loops, fractions of the
matmul peak measured in the same run), and compare with the committed baseline.

    python benchmarks/regress.py --run                      # run every benchmark file (hours), then compare
    python benchmarks/regress.py --run --only bench_serve   # one file
    python benchmarks/regress.py                            # compare the JSON already in out/regress/
    python benchmarks/regress.py --update                   # make what is in out/regress/ the baseline

Absolute times differ from machine to machine; a ratio of two things timed in one run on one machine
moves far less. A figure regresses when it falls more than `--margin` (default 20 %) below its
baseline, in the direction that is worse; the script prints the table and exits 1 if any does. Why
20 %: five runs of the same ratios on one machine and day spread by 11.3 % (leave-one-out, Captum
ppe 64 / engine) and 6.2 % (sliding window) of their median, an earlier triple of the serving
ceiling by 6.5 %, and single medians drift by up to 15 % between settings on the shared 2-core
machine (README, Performance and Serving); a drop of 20 % is above all of them.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "out" / "regress"
BASELINE = HERE / "baseline.json"


def _time(benches, pattern: str, best=min) -> float | None:
    """The median time of the benchmark whose name matches `pattern` (the best of several)."""
    times = [b["stats"]["median"] for b in benches if re.search(pattern, b["fullname"])]
    return best(times) if times else None


def _info(benches, pattern: str, key: str) -> float | None:
    values = [b["extra_info"].get(key) for b in benches if re.search(pattern, b["fullname"])]
    values = [v for v in values if isinstance(v, (int, float))]
    return max(values) if values else None


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


# (figure, file, function of that file's benchmarks -> value, higher_is_better)
FIGURES = [
    ("leave_one_out: Captum best / engine (time)", "bench_perturbation",
     lambda b: _ratio(_time(b, r"test_loo_captum"), _time(b, r"test_loo_engine")), True),
    ("leave_one_out: reference loop / engine (time)", "bench_perturbation",
     lambda b: _ratio(_time(b, r"test_loo_reference_loop"), _time(b, r"test_loo_engine")), True),
    ("leave_one_out: fraction of the matmul peak", "bench_perturbation",
     lambda b: _info(b, r"test_loo_engine", "peak_fraction"), True),
    ("leave_one_out: rows layout / cascade attention (time)", "bench_perturbation",
     lambda b: _ratio(_time(b, r"test_loo_variant\[rows\]"), _time(b, r"test_loo_engine\[2048\]")), True),
    ("cascade attention: dense rows / cascade (one layer, time)", "bench_cascade_attention",
     lambda b: _ratio(_time(b, r"test_dense_rows_sdpa"), _time(b, r"test_cascade_torch_engine")), True),
    ("sliding_window: Captum best / engine (time)", "bench_perturbation",
     lambda b: _ratio(_time(b, r"test_sliding_captum"), _time(b, r"test_sliding_engine")), True),
    ("integrated_gradients: Captum best / engine (time)", "bench_perturbation",
     lambda b: _ratio(_time(b, r"test_ig_captum"), _time(b, r"test_ig_engine")), True),
    ("integrated_gradients: stacked / packed steps (time)", "bench_perturbation",
     lambda b: _ratio(_time(b, r"test_ig_variant\[stacked\]"), _time(b, r"test_ig_engine")), True),
    ("shapley_sampling: Captum best / engine (time)", "bench_shapley",
     lambda b: _ratio(_time(b, r"test_shapley_sampling_captum"), _time(b, r"test_shapley_sampling_engine")), True),
    ("serve rollout c=16: batched / one at a time (req/s)", "bench_serve",
     lambda b: _ratio(_info(b, r"test_server\[rollout-16-batched\]", "requests_per_s"),
                      _info(b, r"test_server\[rollout-16-one-at-a-time\]", "requests_per_s")), True),
    ("serve leave_one_out c=16: batched / one at a time (req/s)", "bench_serve",
     lambda b: _ratio(_info(b, r"test_server\[leave_one_out-16-batched\]", "requests_per_s"),
                      _info(b, r"test_server\[leave_one_out-16-one-at-a-time\]", "requests_per_s")), True),
    ("serve c=1 leave_one_out: server / direct (paired time)", "bench_serve",
     lambda b: _info(b, r"test_concurrency_1_overhead_paired\[leave_one_out\]", "median_paired_ratio"), False),
    ("corpus: engine run / in memory (time)", "bench_corpus",
     lambda b: _info(b, r"test_throughput_job_against_in_memory", "job_over_in_memory_time"), False),
    ("corpus: peak RSS 10x texts / 1x", "bench_corpus",
     lambda b: _info(b, r"test_peak_rss", "job_ratio"), False),
    ("lrp: LXT one at a time / engine (time)", "bench_lrp",
     lambda b: _ratio(_time(b, r"test_lrp_lxt"), _time(b, r"test_lrp_engine_attribute")), True),
    ("evaluate: one call per text / engine (time)", "bench_evaluate",
     lambda b: _ratio(_time(b, r"test_evaluate_one_call_per_text"), _time(b, r"test_evaluate_corpus_engine")), True),
]  # fmt: skip


def figures(folder: Path) -> dict[str, float]:
    out = {}
    for name, file, fn, _ in FIGURES:
        path = folder / f"{file}.json"
        if not path.exists():
            continue
        value = fn(json.loads(path.read_text())["benchmarks"])
        if value is not None:
            out[name] = round(float(value), 4)
    return out


def compare(current: dict, baseline: dict, margin: float) -> tuple[list[list[str]], bool]:
    rows, regressed = [], False
    for name, _, _, higher in FIGURES:
        now, then = current.get(name), baseline.get(name)
        if now is None:
            continue
        if then is None:
            rows.append([name, "-", f"{now:.3f}", "no baseline"])
            continue
        change = now / then - 1
        worse = change < -margin if higher else change > margin
        regressed |= worse
        rows.append([name, f"{then:.3f}", f"{now:.3f}", f"{change:+.1%}" + ("  REGRESSED" if worse else "")])
    return rows, regressed


def run(only: list[str] | None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    files = sorted({file for _, file, _, _ in FIGURES} if not only else set(only))
    for file in files:
        print(f"running benchmarks/{file}.py ...", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pytest", str(HERE / f"{file}.py"), "-q", "-p", "no:cacheprovider",
             f"--benchmark-json={OUT / f'{file}.json'}"],
            check=True,
        )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the benchmarks first (into out/regress/)")
    parser.add_argument("--only", nargs="+", metavar="FILE", help="benchmark files to run, e.g. bench_serve")
    parser.add_argument("--json", type=Path, default=OUT, help="the folder of benchmark JSON (default out/regress)")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--margin", type=float, default=0.20, help="allowed drop of a figure (default 0.20)")
    parser.add_argument("--update", action="store_true", help="write the current figures into the baseline")
    args = parser.parse_args(argv)
    if args.run:
        run(args.only)
    current = figures(args.json)
    if not current:
        print(f"no benchmark JSON with known figures in {args.json}; run with --run", file=sys.stderr)
        return 2
    baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else {}
    if args.update:
        args.baseline.write_text(json.dumps({**baseline, **current}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(current)} figures into {args.baseline}")
        return 0
    rows, regressed = compare(current, baseline, args.margin)
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'baseline':>8}  {'now':>8}  change (margin {args.margin:.0%})")
    for name, then, now, change in rows:
        print(f"{name:<{width}}  {then:>8}  {now:>8}  {change}")
    return 1 if regressed else 0


if __name__ == "__main__":
    sys.exit(main())
