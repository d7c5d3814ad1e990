"""The explanation server under load on SmolLM2 (loopback): closed-loop clients at concurrency 1, 4
and 16, each sending one prompt per request (the 24 prompts of `prompts.py`), against the same server
with batching across requests off (`one_at_a_time`), and a direct `ex.attribute` loop; one run.

    python -m pytest benchmarks/bench_serve.py --benchmark-json out/bench_serve.json
    python benchmarks/summarize.py out/bench_serve.json

`extra_info`: requests/s and p50 / p90 / p99 end-to-end latency (seconds) of the run. Beside them:
the ceiling (all 24 prompts in one `ex.attribute` call: what batching across requests could reach at
best) and a soak (`test_soak`: `ENGINE_SOAK_S` seconds, default 120, of open-loop rollout requests at
80 % of the capacity measured just before, each prompt made unique, every answer checked).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import median_seconds, run_once, scaled

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from engine import Explainer  # noqa: E402
from engine.encoding import encode  # noqa: E402
from engine.serve import create_app  # noqa: E402

METHODS = ("leave_one_out", "rollout")


class Server:
    def __init__(self, ex, **options):
        config = uvicorn.Config(create_app(ex, "smollm2", **options), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join()


def _post(url, text, method) -> float:
    return _post_answer(url, text, method)[0]


def _post_answer(url, text, method) -> tuple[float, dict]:
    body = json.dumps({"instances": [{"text": text, "method": method}]}).encode()
    req = urllib.request.Request(
        f"{url}/v1/models/smollm2:explain", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        answer = json.loads(resp.read())
    (explanation,) = answer["explanations"]
    assert "scores" in explanation, answer
    return time.perf_counter() - start, explanation


def _load(url, prompts, method, concurrency) -> list[float]:
    """Closed loop: `concurrency` clients, each sending its next prompt as soon as its last is answered."""
    todo: queue.Queue = queue.Queue()
    for p in prompts:
        todo.put(p)
    latencies: list[float] = []
    lock = threading.Lock()

    def client():
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            seconds = _post(url, p, method)
            with lock:
                latencies.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


@pytest.fixture(scope="module")
def engine(smollm2):
    model, tok = smollm2
    ex = Explainer(model, tok, progress=False)
    for m in METHODS:
        ex.attribute("warm up the engine", m)
    return ex


def _record(benchmark, latencies, n):
    seconds = median_seconds(benchmark)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    benchmark.extra_info.update(requests_per_s=n / seconds, p50_s=p50, p90_s=p90, p99_s=p99)


@pytest.mark.parametrize("method", METHODS)
def test_direct_attribute_loop(benchmark, engine, prompts, method):
    benchmark.group = f"serve {method}"
    latencies = []

    def run():
        latencies.clear()
        for p in prompts:
            start = time.perf_counter()
            engine.attribute(p, method)
            latencies.append(time.perf_counter() - start)

    run_once(benchmark, run)
    _record(benchmark, latencies, len(prompts))


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["batched", "one-at-a-time"])
@pytest.mark.parametrize("concurrency", [1, 4, 16])
@pytest.mark.parametrize("method", METHODS)
def test_server(benchmark, engine, prompts, method, concurrency, one_at_a_time):
    if one_at_a_time and concurrency == 1:
        pytest.skip("at concurrency 1 the two servers are the same")
    benchmark.group = f"serve {method}"
    benchmark.name = f"server {'one-at-a-time' if one_at_a_time else 'batched'} c={concurrency}"
    server = Server(engine, one_at_a_time=one_at_a_time)
    latencies = []
    try:
        run_once(benchmark, lambda: latencies.extend(_load(server.url, prompts, method, concurrency)))
    finally:
        server.stop()
    _record(benchmark, latencies, len(prompts))


@pytest.mark.parametrize("method", METHODS)
def test_direct_one_call_of_all_prompts(benchmark, engine, prompts, method):
    """The ceiling of batching across requests: every prompt's work in one call, no HTTP."""
    benchmark.group = f"serve {method}"
    run_once(benchmark, lambda: engine.attribute(prompts, method))
    benchmark.extra_info.update(requests_per_s=len(prompts) / median_seconds(benchmark))


def test_soak(benchmark, engine, prompts):
    """Open-loop rollout requests at 80 % of the capacity measured first (c=16, closed loop, 48
    requests) for ENGINE_SOAK_S seconds. Each request's text is unique (a prompt and its number), so
    an answer given to the wrong request, lost or duplicated shows in its tokens."""
    benchmark.group = "serve soak"
    soak_s = float(os.environ.get("ENGINE_SOAK_S", scaled("120", "2")))
    server = Server(engine)
    try:
        start = time.perf_counter()
        _load(server.url, prompts * 2, "rollout", 16)
        capacity = 2 * len(prompts) / (time.perf_counter() - start)
        rate = 0.8 * capacity
        n = max(1, int(soak_s * rate))
        texts = [f"{prompts[i % len(prompts)]} {i}" for i in range(n)]
        want = [encode(engine.tokenizer, t)[1] for t in texts]
        results: list = [None] * n

        def one(i):
            try:
                results[i] = _post_answer(server.url, texts[i], "rollout")
            except Exception as err:  # counted below: a soak reports every failure, it does not stop at one
                results[i] = err

        def run():
            with ThreadPoolExecutor(max_workers=128) as pool:
                t0 = time.perf_counter()
                for i in range(n):  # open loop: request i leaves at i / rate whatever the server does
                    delay = t0 + i / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    pool.submit(one, i)

        run_once(benchmark, run)
    finally:
        server.stop()
    failures = [r for r in results if not isinstance(r, tuple)]
    answered = [r for r in results if isinstance(r, tuple)]
    wrong = sum(isinstance(r, tuple) and r[1]["tokens"] != want[i] for i, r in enumerate(results))
    latencies = [seconds for seconds, _ in answered]
    third = max(1, len(latencies) // 3)
    benchmark.extra_info.update(
        capacity_per_s=capacity,
        offered_per_s=rate,
        requests=n,
        answered=len(answered),
        failed=len(failures),
        wrong_answers=wrong,
        achieved_per_s=n / median_seconds(benchmark),
        p50_s=float(np.percentile(latencies, 50)),
        p99_s=float(np.percentile(latencies, 99)),
        p50_first_third_s=float(np.median(latencies[:third])),
        p50_last_third_s=float(np.median(latencies[-third:])),
    )
    assert not failures and wrong == 0, (failures[:3], wrong)


@pytest.mark.parametrize("method", METHODS)
def test_concurrency_1_overhead_paired(benchmark, engine, prompts, method):
    """The server's cost at concurrency 1, paired: each prompt direct, then through the server, two
    rounds, so the machine's drift between settings (which moves medians by 10 % here) cancels."""
    benchmark.group = f"serve {method} c=1 paired"
    server = Server(engine)
    direct, served = [], []

    def run():
        for _ in range(2):
            for p in prompts:
                start = time.perf_counter()
                engine.attribute(p, method)
                direct.append(time.perf_counter() - start)
                served.append(_post(server.url, p, method))

    try:
        run_once(benchmark, run)
    finally:
        server.stop()
    d, s = np.array(direct), np.array(served)
    benchmark.extra_info.update(
        direct_p50_s=float(np.median(d)),
        server_p50_s=float(np.median(s)),
        median_paired_overhead_s=float(np.median(s - d)),
        median_paired_ratio=float(np.median(s / d)),
    )
