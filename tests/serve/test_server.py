"""The explanation server, real: uvicorn on 127.0.0.1, stdlib HTTP clients, tiny models in-process
(and one `engine serve` process for the shutdown)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import float64_copy, make_tokenizer, random_texts, tiny_gpt2

pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install -e ".[serve]"')
import uvicorn  # noqa: E402

from engine import Explainer  # noqa: E402
from engine.jsonable import comparison_json, evaluation_json  # noqa: E402
from engine.report import compare_with_faithfulness  # noqa: E402
from engine.serve import create_app  # noqa: E402

NAME = "tiny"


@contextmanager
def serving(ex, **options):
    config = uvicorn.Config(create_app(ex, NAME, **options), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def call(url: str, path: str, body=None, headers=None, raw: bytes | None = None, method=None):
    """(status, parsed JSON or text) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    if method:
        req.method = method
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, text, hdrs = resp.status, resp.read().decode(), resp.headers
    except urllib.error.HTTPError as err:
        status, text, hdrs = err.code, err.read().decode(), err.headers
    try:
        return status, json.loads(text), hdrs
    except json.JSONDecodeError:
        return status, text, hdrs


def explain(url, instances, **parameters):
    return call(url, f"/v1/models/{NAME}:explain", {"instances": instances, "parameters": parameters})


@pytest.fixture(scope="module")
def model64():
    return float64_copy(tiny_gpt2()), make_tokenizer()


def _wait(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_answers_equal_the_facade(model64):
    model, tok = model64
    ex = Explainer(model, tok)
    texts = random_texts(3, 2, 9)
    with serving(ex) as url:
        for method, options in [("leave_one_out", {}), ("rollout", {"head_fusion": "max"}), ("lrp", {})]:
            for text in texts:  # one instance: the layout of a direct call of that text, bit for bit
                status, out, _ = explain(url, [{"text": text, "method": method, "options": options}])
                assert status == 200, out
                (got,) = out["explanations"]
                want = ex.attribute([text], method, **options)[0]
                assert got["scores"] == want.scores.tolist() and got["tokens"] == want.tokens
                assert got["token_ids"] == want.token_ids and got["target_id"] == want.target_id
                assert got["method"] == method and got["options"] == want.options
                assert "matrix" not in got
        status, out, _ = explain(url, [{"text": texts[0], "method": "rollout", "return_matrix": True},
                                       {"text": texts[0], "method": "sliding_window", "options": {"window_size": 2}},
                                       {"text": "", "method": "leave_one_out"},
                                       {"text": texts[0], "method": "no_such_method"}])  # fmt: skip
        assert status == 200
        rollout, window, empty, unknown = out["explanations"]
        assert np.array(rollout["matrix"]).shape == (len(rollout["tokens"]),) * 2
        assert "regions" in window and window["regions"][0]["tokens"]
        assert empty["error"]["type"] == "ValueError" and "empty" in empty["error"]["message"]
        assert unknown["error"]["type"] == "ValueError" and "unknown method" in unknown["error"]["message"]
    assert ex.attribute(texts[0], "rollout").scores.tolist() == rollout["scores"]  # the Explainer is usable again


def test_sixteen_concurrent_clients_get_correct_answers(model64):
    model, tok = model64
    ex = Explainer(model, tok, max_batch_tokens=113)
    kinds = [
        ("leave_one_out", {}),
        ("rollout", {}),
        ("lrp", {"rule": "cplrp"}),
        ("integrated_gradients", {"n_steps": 4}),
        ("sliding_window", {"window_size": 2}),
        ("shapley_sampling", {"n_samples": 2}),
    ]
    jobs = [(m, o, random_texts(2, 2, 9)) for m, o in kinds * 3][:16]
    want = [ex.attribute(texts, m, **o) for m, o, texts in jobs]
    got = [None] * len(jobs)
    with serving(ex) as url:

        def client(j):
            m, o, texts = jobs[j]
            got[j] = explain(url, [{"text": t, "method": m, "options": o} for t in texts])

        threads = [threading.Thread(target=client, args=(j,)) for j in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for (status, out, _), results in zip(got, want, strict=True):
        assert status == 200, out
        for answer, a in zip(out["explanations"], results, strict=True):
            assert answer["tokens"] == a.tokens and answer["target_id"] == a.target_id
            np.testing.assert_allclose(answer["scores"], a.scores, rtol=1e-10, atol=1e-12)


def test_a_batch_holds_items_of_several_http_requests(model64):
    # ten requests: more than asyncio's default pool of cpu_count + 4 threads on a 2-core machine,
    # which once capped how many requests could wait on the loop (and so share a batch) at six
    model, tok = model64
    ex = Explainer(model, tok)
    n = 10
    texts = random_texts(n, 3, 8)
    with serving(ex) as url:
        results = [None] * n
        with ex.loop._step_lock:  # no batch runs until every request is queued
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, explain(url, [{"text": texts[i]}])))
                       for i in range(n)]  # fmt: skip
            for t in threads:
                t.start()
            _wait(lambda: ex.loop.pending() == n)
            first = ex.loop.batches_run
        for t in threads:
            t.join()
    assert all(status == 200 for status, _, _ in results)
    assert max(len(requests) for _, requests in list(ex.loop.batch_log)[first:]) == n


def test_max_concurrent_bounds_the_requests_waiting_on_the_loop(model64):
    model, tok = model64
    ex = Explainer(model, tok)
    with pytest.raises(ValueError, match="max_concurrent"):
        create_app(ex, NAME, max_concurrent=0)
    texts = random_texts(3, 3, 8)
    with serving(ex, max_concurrent=2) as url:
        results = [None] * 3
        with ex.loop._step_lock:
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, explain(url, [{"text": texts[i]}])))
                       for i in range(3)]  # fmt: skip
            for t in threads:
                t.start()
            _wait(lambda: ex.loop.pending() == 2)
            time.sleep(0.3)
            assert ex.loop.pending() == 2  # the third waits for a thread, not on the loop
        for t in threads:
            t.join()
    assert [r[0] for r in results] == [200] * 3


def test_compare_and_evaluate_equal_the_facade_and_the_cli_json(model64):
    model, tok = model64
    ex = Explainer(model, tok)
    text = random_texts(1, 7, 8)[0]
    methods = ["leave_one_out", "rollout", "sliding_window"]
    options = {"sliding_window": {"window_size": 2}}
    comparison, faith = compare_with_faithfulness(ex, text, methods, [1, 3, 50], options=options)
    want_compare = {"model_name": NAME, **comparison_json(comparison, faith)}
    ev = ex.evaluate(text, methods, k_values=[1, 0.5], curve_steps=4, method_options=options)
    want_evaluate = {"model_name": NAME, **evaluation_json(ev, methods)}
    with serving(ex) as url:
        body = {"text": text, "methods": methods, "options": options, "k_values": [1, 3, 50]}
        status, got, _ = call(url, f"/v1/models/{NAME}:compare", body)
        assert status == 200 and got == want_compare
        assert set(got["faithfulness"]["leave_one_out"]) == {"k=1", "k=3"}  # k=50 > the text's length: skipped
        body = {"text": text, "methods": methods, "options": options, "k_values": [1, 0.5], "curve_steps": 4}
        status, got, _ = call(url, f"/v1/models/{NAME}:evaluate", body)
        assert status == 200 and got == want_evaluate and got["per_text"]
        status, got, _ = call(url, f"/v1/models/{NAME}:compare", {"text": text})  # the default methods
        assert status == 200 and set(got["methods"]) == set(ex.compare(text).attributions)

        for route, body, kind in [
            ("compare", {"text": text, "methods": ["nosuch"]}, "ValueError"),
            ("compare", {"text": ""}, "ValueError"),
            ("compare", {"text": text, "options": {"rollout": {"nosuch": 1}}, "methods": ["rollout"]}, "ValueError"),
            ("evaluate", {"text": "   ", "methods": ["rollout"]}, "ValueError"),
            ("evaluate", {"text": text, "deletion": "nosuch"}, "ValueError"),
            ("evaluate", {"text": text, "curve_steps": "4"}, "ValidationError"),
            ("compare", {"texts": [text]}, "ValidationError"),
        ]:
            status, got, _ = call(url, f"/v1/models/{NAME}:{route}", body)
            assert status == 422 and got["error"]["type"] == kind, (route, body, got)
            assert "Traceback" not in json.dumps(got)
        status, got, _ = call(url, "/v1/models/other:compare", {"text": text})
        assert status == 404 and got["error"]["type"] == "ModelNotFound"
        with ex.loop._step_lock:
            status, got, _ = call(url, f"/v1/models/{NAME}:evaluate", {"text": text, "parameters": {"timeout_s": 0.3}})
            assert status == 504 and got["error"]["type"] == "DeadlineExceeded"
            _wait(lambda: ex.loop.pending() == 0)
        _, text_metrics, _ = call(url, "/metrics")
    assert 'engine_requests_total{outcome="ok"} 3.0' in text_metrics
    assert 'engine_requests_total{outcome="invalid"} 8.0' in text_metrics
    assert 'engine_instances_total{method="unknown",outcome="invalid"} 1.0' in text_metrics
    assert 'engine_requests_total{outcome="timeout"} 1.0' in text_metrics


def test_overload_is_429_at_once_and_nothing_admitted_is_lost(model64):
    model, tok = model64
    ex = Explainer(model, tok)
    text = "the cat sat on the mat"
    with serving(ex, max_queued_tokens=40) as url:  # one leave-one-out of 6 tokens: 6 + 21 tokens
        first = [None]
        with ex.loop._step_lock:
            t = threading.Thread(target=lambda: first.__setitem__(0, explain(url, [{"text": text}])))
            t.start()
            _wait(lambda: ex.loop.pending() == 1)
            start = time.monotonic()
            status, out, headers = explain(url, [{"text": text}])
            assert status == 429 and out["error"]["type"] == "Overloaded" and headers["Retry-After"] == "1"
            assert time.monotonic() - start < 5 and ex.loop.pending() == 1  # at once, nothing queued
            status, out, _ = explain(url, [{"text": " ".join(["the"] * 40)}])
            assert status == 413 and out["error"]["type"] == "RequestTooLarge"
        t.join()
        assert first[0][0] == 200 and first[0][1]["explanations"][0]["tokens"]
        status, _, _ = explain(url, [{"text": text}])  # capacity is back
        assert status == 200


def test_deadline_is_504_and_purges_the_work(model64):
    model, tok = model64
    ex = Explainer(model, tok)
    with serving(ex) as url:
        with ex.loop._step_lock:
            status, out, _ = explain(
                url, [{"text": "the cat sat on the mat", "method": "leave_one_out"}], timeout_s=0.3
            )
            assert status == 504 and out["error"]["type"] == "DeadlineExceeded"
            _wait(lambda: ex.loop.pending() == 0)
            assert ex.loop.scheduler.queued_items() == 0 and ex.loop.caches.needed() == 0


def test_a_client_that_disconnects_has_its_work_purged(model64):
    model, tok = model64
    ex = Explainer(model, tok)
    with serving(ex) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"instances": [{"text": "the cat sat on the mat", "method": "integrated_gradients"}]})
        with ex.loop._step_lock:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                f"POST /v1/models/{NAME}:explain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
            )
            _wait(lambda: ex.loop.pending() == 1)
            sock.close()
            _wait(lambda: ex.loop.pending() == 0)  # cancelled while still queued: nothing ran
            assert ex.loop.scheduler.queued_items() == 0 and ex.loop.caches.needed() == 0
        # the handler records the outcome once it sees its call end (it polls every DISCONNECT_POLL_S)
        _wait(lambda: 'engine_requests_total{outcome="cancelled"} 1.0' in call(url, "/metrics")[1])


@pytest.mark.parametrize(
    "raw,status,kind",
    [
        (b"{not json", 400, "MalformedJSON"),
        (b'{"instances": [{"text": 3}]}', 422, "ValidationError"),
        (b'{"instances": []}', 422, "ValidationError"),
        (b'{"instances": [{"text": "a"}], "extra": 1}', 422, "ValidationError"),
        (b'{"instances": [{"text": "a", "target": 1.5}]}', 422, "ValidationError"),
        (b'{"instances": [{"text": "a"}], "parameters": {"timeout_s": -1}}', 422, "ValidationError"),
        (b"x" * 3000, 413, "BodyTooLarge"),
    ],
)
def test_malformed_bodies_are_json_errors(model64, raw, status, kind):
    model, tok = model64
    with serving(Explainer(model, tok), max_body_bytes=2000) as url:
        got, out, _ = call(url, f"/v1/models/{NAME}:explain", raw=raw)
        assert got == status and out["error"]["type"] == kind and "Traceback" not in json.dumps(out)


def test_routes_models_health_and_unknown_names(model64):
    model, tok = model64
    with serving(Explainer(model, tok), max_instances=3) as url:
        assert call(url, "/v1/models")[:2] == (200, {"models": [{"name": NAME, "ready": True}]})
        assert call(url, f"/v1/models/{NAME}")[:2] == (200, {"name": NAME, "ready": True})
        assert call(url, "/health")[:2] == (200, {"status": "ok"})
        status, out, _ = call(url, "/v1/models/other:explain", {"instances": [{"text": "a"}]})
        assert status == 404 and out["error"]["type"] == "ModelNotFound"
        assert call(url, "/v1/models/other")[0] == 404 and call(url, "/nowhere")[0] == 404
        status, out, _ = explain(url, [{"text": "a b"}] * 4)
        assert status == 413 and out["error"]["type"] == "TooManyInstances"


def test_bearer_token(model64):
    model, tok = model64
    with serving(Explainer(model, tok), api_key="s3cret") as url:
        assert call(url, "/v1/models")[0] == 401
        assert call(url, "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(url, "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(url, "/health")[0] == 200  # probes need no token


def test_metrics_move(model64):
    model, tok = model64
    with serving(Explainer(model, tok)) as url:
        for _ in range(2):
            assert explain(url, [{"text": "the cat sat"}, {"text": "a dog ran", "method": "rollout"}])[0] == 200
        explain(url, [{"text": ""}])
        _, text, _ = call(url, "/metrics")
    assert 'engine_requests_total{outcome="ok"} 2.0' in text
    assert 'engine_requests_total{outcome="failed"} 1.0' in text
    assert 'engine_instances_total{method="rollout",outcome="ok"} 2.0' in text
    batches = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("engine_batches_total")))
    assert batches >= 2
    assert "engine_queued_tokens 0.0" in text and "engine_request_seconds_bucket" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engine_serve_drains_in_flight_requests_on_sigterm(model_dir):
    port = _free_port()
    env = {**os.environ, "ENGINE_TOKEN": "t0k"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--model", str(model_dir), "--port", str(port),
         "--api-key-env", "ENGINE_TOKEN", "--grace-s", "30"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _up(url), timeout=120)
        name = os.path.basename(str(model_dir))
        answer = [None]
        body = {"instances": [{"text": "the cat sat on the mat", "method": "integrated_gradients",
                               "options": {"n_steps": 400}}]}  # fmt: skip
        auth = {"Authorization": "Bearer t0k"}
        t = threading.Thread(target=lambda: answer.__setitem__(0, call(url, f"/v1/models/{name}:explain", body, auth)))
        t.start()
        time.sleep(0.5)  # the request is in flight
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=120)
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
        status, out, _ = answer[0]
        assert status == 200 and len(out["explanations"][0]["scores"]) == 6
    finally:
        if proc.poll() is None:
            proc.kill()


def _up(url) -> bool:
    try:
        return call(url, "/health")[0] == 200
    except OSError:
        return False


@pytest.mark.slow
def test_smollm2_served_equals_the_facade():
    ex = Explainer.from_pretrained("smollm2", progress=False)
    text = "The Eiffel Tower is located in the city of"
    instances = [{"text": text, "method": "leave_one_out"}, {"text": text, "method": "rollout"}]
    with serving(ex) as url:
        status, out, _ = explain(url, instances)
    assert status == 200
    for got, inst in zip(out["explanations"], instances, strict=True):
        want = ex.attribute(text, inst["method"])  # one text per call, as the server ran it: bit for bit
        assert got["scores"] == want.scores.tolist() and got["target_token"] == want.target_token == " Paris"
