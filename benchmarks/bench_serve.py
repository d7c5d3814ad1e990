"""The explanation server under load on SmolLM2 (loopback): closed-loop clients at concurrency 1, 4
and 16, each sending one prompt per request (the 24 prompts of `prompts.py`), against the same server
with batching across requests off (`one_at_a_time`), and a direct `ex.attribute` loop; one run.

    python -m pytest benchmarks/bench_serve.py --benchmark-json out/bench_serve.json
    python benchmarks/summarize.py out/bench_serve.json

`extra_info`: requests/s and p50 / p90 / p99 end-to-end latency (seconds) of the run.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import run_once

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from engine import Explainer  # noqa: E402
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
    body = json.dumps({"instances": [{"text": text, "method": method}]}).encode()
    req = urllib.request.Request(
        f"{url}/v1/models/smollm2:explain", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        answer = json.loads(resp.read())
    assert "scores" in answer["explanations"][0], answer
    return time.perf_counter() - start


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
    seconds = benchmark.stats.stats.median
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
