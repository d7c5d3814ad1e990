"""Corpus jobs on SmolLM2: `engine run` (local) against `ex.attribute` on the same list in memory.

    python -m pytest benchmarks/bench_corpus.py --benchmark-json out/bench_corpus.json -s

- throughput: the 24 prompts repeated to 480 texts, leave-one-out + rollout, the job (a .txt file in,
  Parquet parts out) and the in-memory calls on one warm Explainer, in one run; the ratio is recorded.
- peak RSS of an `engine run` process for 480 and 4800 texts (rollout only: leave-one-out on 4800
  texts takes most of an hour on this CPU; the chunking that bounds memory is the same for every method).
- restart: `engine run` killed with SIGKILL after its first part, then run again: the seconds from
  the kill to the resumed process's line before its first batch, and to its first new part.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import median_seconds, run_once, scaled

pytest.importorskip("pyarrow")

from engine import Explainer, run_corpus  # noqa: E402
from engine.corpus.manifest import MANIFEST  # noqa: E402

METHODS = ["leave_one_out", "rollout"]
N_TEXTS = scaled(480, 24)


@pytest.fixture(scope="module")
def corpus(prompts, tmp_path_factory):
    texts = (prompts * 20)[:N_TEXTS]
    path = tmp_path_factory.mktemp("corpus") / f"{N_TEXTS}.txt"
    path.write_text("\n".join(texts) + "\n")
    return texts, path


def test_throughput_job_against_in_memory(benchmark, smollm2, corpus, tmp_path):
    texts, path = corpus
    model, tok = smollm2
    ex = Explainer(model, tok, progress=False)
    for m in METHODS:
        ex.attribute(texts[:24], m)  # warm up
    start = time.perf_counter()
    for m in METHODS:
        ex.attribute(texts, m)
    in_memory = time.perf_counter() - start
    benchmark.group = f"corpus {N_TEXTS} texts"
    summary = run_once(
        benchmark,
        lambda: run_corpus(path, tmp_path / "out", METHODS, explainer=ex, model_name="smollm2", progress=False),
    )
    job = median_seconds(benchmark)
    assert summary.rows == 2 * N_TEXTS and summary.failures == 0
    benchmark.extra_info.update(
        job_texts_per_s=N_TEXTS / job,
        in_memory_texts_per_s=N_TEXTS / in_memory,
        job_over_in_memory_time=job / in_memory,
    )
    print(f"\n{N_TEXTS} texts: job {job:.1f} s, in memory {in_memory:.1f} s, ratio {job / in_memory:.3f}")


def _engine_run(model, source, out, methods, *extra):
    return [sys.executable, "-m", "engine", "run", str(source), "--out", str(out), "--methods", ",".join(methods),
            "--model", model, *extra]  # fmt: skip


def _peak_rss_mb(cmd) -> tuple[float, float]:
    """(the process's peak RSS, its peak RSS after the model loaded and the input was scanned), MB.
    The second: the kernel's high-water mark (VmHWM) reset when the job prints its first line
    (`/proc/PID/clear_refs`), then read until the process exits."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    after_load = []

    def watch():
        for line in proc.stderr:
            if "engine run: starting" in line and not after_load:
                with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
                    f.write("5")  # reset the peak RSS: from here on, what the job itself holds
                after_load.append(0.0)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps it with its own rusage once it ends
        if pid:
            break
        if after_load:
            hwm = [x for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if x.startswith("VmHWM")]
            if hwm:  # a process that has exited (a zombie until reaped) has none: keep the last reading
                after_load[-1] = int(hwm[0].split()[1]) / 1024
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    t.join(timeout=5)
    assert proc.returncode == 0
    return usage.ru_maxrss / 1024, after_load[-1]  # ru_maxrss: KiB on Linux


def test_peak_rss_480_against_4800_texts(benchmark, prompts, model_path, tmp_path):
    benchmark.group = "corpus peak RSS"
    sizes = scaled((480, 4800), (24, 240))
    peaks = {}

    def run():
        for n in sizes:
            path = tmp_path / f"{n}.txt"
            path.write_text("\n".join((prompts * (n // len(prompts) + 1))[:n]) + "\n")
            peaks[n] = _peak_rss_mb(_engine_run(model_path, path, tmp_path / f"out-{n}", ["rollout"]))

    run_once(benchmark, run)
    (whole_480, job_480), (whole_4800, job_4800) = peaks[sizes[0]], peaks[sizes[1]]
    benchmark.extra_info.update(
        peak_rss_480_mb=whole_480, peak_rss_4800_mb=whole_4800, job_peak_rss_480_mb=job_480,
        job_peak_rss_4800_mb=job_4800, job_ratio=job_4800 / job_480,
    )  # fmt: skip
    print(f"\npeak RSS, whole process: 480 texts {whole_480:.0f} MB, 4800 texts {whole_4800:.0f} MB; "
          f"after loading: {job_480:.0f} MB, {job_4800:.0f} MB")  # fmt: skip
    assert job_4800 <= 1.1 * job_480


def test_kill_9_to_first_new_batch(benchmark, corpus, model_path, tmp_path):
    benchmark.group = "corpus restart"
    _, path = corpus
    out = tmp_path / "out"
    cmd = _engine_run(model_path, path, out, METHODS, "--chunk-texts", str(scaled(24, 2)))

    def parts() -> int:
        try:
            return len(json.loads((out / MANIFEST).read_text())["parts"])
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while parts() < 1:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    killed = time.perf_counter()
    first.wait()
    times = {}

    def resume():
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def watch():
            for line in proc.stderr:
                if "resuming" in line and "ready" not in times:
                    times["ready"] = time.perf_counter() - killed

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        committed = parts()
        while parts() <= committed and proc.poll() is None:  # (a tiny job may finish first)
            time.sleep(0.01)
        times["first_new_part"] = time.perf_counter() - killed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t.join(timeout=5)

    run_once(benchmark, resume)
    benchmark.extra_info.update(
        kill_to_first_batch_s=times.get("ready"), kill_to_first_new_part_s=times["first_new_part"]
    )
    ready, part = times.get("ready"), times["first_new_part"]
    print(f"\nkill -9 -> resumed job's first batch {ready:.2f} s, first new part {part:.2f} s")
