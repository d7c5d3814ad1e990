"""The engine loop: concurrent callers on one Explainer share batches and get the results of serial
calls; a cancelled or failed request leaves nothing behind; one thread touches the model."""

from __future__ import annotations

import _thread
import threading
import time

import numpy as np
import pytest
from conftest import float64_copy, make_tokenizer, random_texts, tiny_gpt2

from engine import Explainer
from engine.runtime.context import ModelContext
from engine.runtime.loop import EngineLoop
from engine.runtime.runner import ModelRunner
from engine.runtime.types import CallPayload, Work, call_group

# mixed methods and options, as concurrent users would send them
JOBS = [
    ("leave_one_out", {}),
    ("lrp", {"rule": "cplrp"}),
    ("rollout", {"head_fusion": "max"}),
    ("integrated_gradients", {"n_steps": 4}),
    ("sliding_window", {"window_size": 2}),
    ("raw_attention", {"layer": 0}),
    ("grad_attention", {}),
    ("evaluate", {}),
]
# float64 rounding of a different batch layout (packed row widths, stacked batch sizes): ~3e-15 relative
# measured; a text's results mixed up with another's differ by more than 1e-4. GPT-2: rotary models
# (Llama) compute their rotary angles in float32 inside transformers, whose vectorized cos/sin round
# differently by an element's place in the batch, so their float64 runs agree to ~1e-8 only.
RTOL64, ATOL64 = 1e-10, 1e-12


def _call(ex, job, texts):
    method, opts = job
    if method == "evaluate":
        return ex.evaluate(texts, ["leave_one_out", "rollout"], k_values=(1, 2), curve_steps=3)
    return ex.attribute(texts, method, **opts)


def _assert_same(got, want):
    if hasattr(want, "per_text"):  # an Evaluation
        assert len(got.per_text) == len(want.per_text)
        for g, w in zip(got.per_text, want.per_text, strict=True):
            assert g.keys() == w.keys() and (g["text"], g["method"]) == (w["text"], w["method"])
            for key, value in w.items():
                if isinstance(value, float):
                    assert np.isclose(g[key], value, rtol=RTOL64, atol=ATOL64, equal_nan=True), key
        return
    for g, w in zip(got, want, strict=True):
        assert g.text == w.text and g.tokens == w.tokens and g.target_id == w.target_id
        np.testing.assert_allclose(g.scores, w.scores, rtol=RTOL64, atol=ATOL64)


@pytest.fixture(scope="module")
def model64():
    return float64_copy(tiny_gpt2()), make_tokenizer()


def test_threads_get_the_results_of_serial_calls(model64):
    model, tok = model64
    ex = Explainer(model, tok, max_batch_tokens=97)
    work = [(job, random_texts(6, 2, 11)) for job in JOBS] * 2  # 16 calls on 4 threads
    serial = [_call(ex, job, texts) for job, texts in work]
    got, errors = [None] * len(work), []
    start = threading.Barrier(4)

    def thread(t):
        start.wait()
        for j in range(t, len(work), 4):
            try:
                got[j] = _call(ex, *work[j])
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

    threads = [threading.Thread(target=thread, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, s in zip(got, serial, strict=True):
        _assert_same(g, s)
    assert ex.loop.pending() == 0 and ex.loop.caches.live() == 0 and ex.loop.caches.needed() == 0


def test_concurrent_calls_share_batches(model64):
    """Four callers' work queued while the loop is held: the batches that follow mix their requests."""
    model, tok = model64
    ex = Explainer(model, tok)
    texts = [random_texts(4, 3, 9) for _ in range(4)]
    serial = [ex.attribute(t, "leave_one_out") for t in texts]
    got = [None] * 4
    with ex.loop._step_lock:  # no batch can run: the four clean passes queue up
        threads = [
            threading.Thread(target=lambda i=i: got.__setitem__(i, ex.attribute(texts[i], "leave_one_out")))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while ex.loop.pending() < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ex.loop.pending() == 4
        first = ex.loop.batches_run
    for t in threads:
        t.join()
    shared = [requests for _, requests in list(ex.loop.batch_log)[first:] if len(requests) > 1]
    assert shared and max(map(len, shared)) == 4  # the four clean passes ran as one batch
    for g, s in zip(got, serial, strict=True):
        _assert_same(g, s)


def _stepping_loop(ex, **kwargs) -> EngineLoop:
    """A second loop on the Explainer's runner, stepped by the test (no worker thread)."""
    return EngineLoop(ModelRunner(ex.context), 64, background=False, **kwargs)


def test_requests_of_two_callers_share_a_batch_deterministically(model64):
    model, tok = model64
    ex = Explainer(model, tok)
    loop = _stepping_loop(ex)
    from engine.methods._base import clean_work

    a, b = (ex._prepare(i, t, None) for i, t in enumerate(["the cat sat", "a dog ran to the"]))
    fa, fb = loop.submit([clean_work(ex.context, a)]), loop.submit([clean_work(ex.context, b)])
    assert loop.step() and fa.done() and fb.done()
    assert list(loop.batch_log) == [(("packed",), (fa.request_id, fb.request_id))]
    assert fa.request_id != fb.request_id


def test_timeout_cancels_and_leaves_nothing_behind(model64):
    model, tok = model64
    ex = Explainer(model, tok, max_batch_tokens=8)
    texts = random_texts(40, 6, 12)
    p = [ex._prepare(i, t, 0) for i, t in enumerate(texts)]
    from engine.methods import get

    spec, opts = get("leave_one_out"), get("leave_one_out").options()
    work = [w for q in p for w in spec.expand(ex.context, q, opts)]
    future = ex.loop.submit(work)
    with pytest.raises(TimeoutError):
        ex.loop.result(future, timeout=0.05)
    assert future.cancelled()
    assert ex.loop.wait_idle()
    assert ex.loop.scheduler.queued_items() == 0 and ex.loop.pending() == 0
    assert ex.loop.caches.needed() == 0 and ex.loop.caches.live() == 0
    # the loop still serves: a new call equals a fresh Explainer's
    _assert_same(ex.attribute(texts[:3], "leave_one_out"), Explainer(model, tok).attribute(texts[:3], "leave_one_out"))


def test_keyboard_interrupt_cancels_and_leaves_nothing_behind(model64):
    model, tok = model64
    ex = Explainer(model, tok, max_batch_tokens=8)
    texts = random_texts(60, 6, 12)

    def interrupt_when_running():
        deadline = time.monotonic() + 30
        while ex.loop.batches_run < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        _thread.interrupt_main()

    watcher = threading.Thread(target=interrupt_when_running)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        ex.attribute(texts, "sliding_window", window_size=2)
        time.sleep(30)  # not reached unless the call finished first; the interrupt then lands here
    watcher.join()
    assert ex.loop.wait_idle()
    assert ex.loop.scheduler.queued_items() == 0 and ex.loop.pending() == 0
    assert ex.loop.caches.needed() == 0 and ex.loop.caches.live() == 0


def _boom(ctx, inputs):
    raise RuntimeError("boom in a batch function")


def _echo(ctx, inputs):
    return [x * 2 for x in inputs]


def test_a_failing_batch_fails_its_requests_only(model64):
    model, tok = model64
    ex = Explainer(model, tok)
    loop = _stepping_loop(ex)
    bad = loop.submit(
        [Work(call_group(_echo, "k"), 1, CallPayload(1)), Work(call_group(_boom, "k"), 1, CallPayload(2))]
    )
    good = loop.submit([Work(call_group(_echo, "k"), 1, CallPayload(3))])
    loop.run_until_idle()
    assert good.result() == [6]  # shared a batch with the failing request's first item, then carried on
    with pytest.raises(RuntimeError, match="boom"):
        bad.result()
    assert loop.scheduler.queued_items() == 0 and loop.pending() == 0


def test_one_thread_touches_the_model(model64):
    model, tok = model64
    ex = Explainer(model, tok)
    seen = set()
    hook = model.get_input_embeddings().register_forward_hook(lambda *a: seen.add(threading.current_thread().name))
    try:
        threads = [
            threading.Thread(target=ex.attribute, args=(random_texts(3, 2, 8), "leave_one_out")) for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        hook.remove()
    assert seen == {"engine-loop"}  # the loop's worker, never a caller


def test_context_is_all_a_method_sees():
    fields = {f for f in ModelContext.__dataclass_fields__}
    assert fields == {
        "model", "tokenizer", "kind", "num_layers", "replacement_id", "reads_first_token",
        "prefix_reuse", "row_capacity", "cascade", "compile", "attention_maps",
    }  # fmt: skip
