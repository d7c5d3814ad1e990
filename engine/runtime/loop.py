"""The engine loop: one long-lived owner of a model that callers from any thread submit work to.

    loop = EngineLoop(ModelRunner(context), max_batch_tokens=2048)
    future = loop.submit([Work(...), ...])      # from any thread; returns at once
    outputs = future.result()                    # one output per Work, in order
    loop.cancel(future)                          # its queued items and prefix-cache claims go

As vLLM's `EngineCore.step()`: each `step()` asks the scheduler for one batch (`schedule`), hands it to
the runner (`execute`), and feeds the outputs back (`complete`), finishing the futures of requests
whose last item came back. Work submitted while a batch runs joins the next batches, so items of
concurrent callers share batches. With `background=True` (the default) a worker thread runs `step()`
while there is work and exits after `idle_s` without any, so an idle loop holds no thread; it is the
only thread that touches the model. With `background=False` the caller drives: `run_until_idle()`, or
`result(future)`, which steps until that future is done.

A batch whose execution raises fails every request with an item in it (their futures get the error,
their other items are aborted); the other requests carry on.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # the builtin TimeoutError from 3.11 on

from .caches import PrefixCaches
from .runner import ModelRunner
from .scheduler import Scheduler
from .types import Batch, Work, WorkItem

_WAIT_SLICE_S = 0.1


class EngineLoop:
    def __init__(
        self,
        runner: ModelRunner,
        max_batch_tokens: int,
        max_batch_size: int | None = None,
        max_request_share: float | None = 0.5,
        background: bool = True,
        idle_s: float = 0.5,
        history: int = 1024,
        observer=None,
    ):
        """`max_request_share`: of a batch's tokens, what one request may take while others wait
        (`Scheduler`); `history`: how many recent batches `batch_log` keeps (request ids per batch);
        `observer`: an object with `on_batch(batch, seconds)` and `on_queue_wait(seconds)` (metrics),
        called on the loop's thread."""
        self.runner = runner
        self.scheduler = Scheduler(max_batch_tokens, max_batch_size, runner.batch_cost, max_request_share)
        self.caches = PrefixCaches()
        self.background = background
        self.idle_s = idle_s
        self._lock = threading.Lock()  # guards the scheduler, the caches' counts and the futures
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one step at a time
        self._futures: dict[int, Future] = {}
        self._progress: dict[int, Callable[[int], None]] = {}
        self._ids = itertools.count()
        self._waiting_since: dict[int, float] = {}  # request -> submit time, until its first batch
        self.observer = observer
        self.closed = False  # `close()`: no new requests (a server shutting down)
        self._worker: threading.Thread | None = None
        self.batches_run = 0
        self.batch_log: deque[tuple[tuple, tuple[int, ...]]] = deque(maxlen=history)  # (group kind, request ids)

    # ------------------------------------------------------------------------------------ callers

    def submit(self, work: Sequence[Work], on_progress: Callable[[int], None] | None = None, owner=None) -> Future:
        """Queue one request; its future's result is the outputs, one per `Work`, in order.
        `on_progress(n)` is called (on the loop's thread) as n more of its items complete; `owner`
        groups the requests of one caller under one share of each batch (`Scheduler`)."""
        if self.closed:
            raise RuntimeError("the engine loop is closed: it takes no new requests")
        future: Future = Future()
        request = next(self._ids)
        future.request_id = request
        if not work:
            future.set_result([])
            return future
        items = [WorkItem(request, i, w.group, w.tokens, w.payload) for i, w in enumerate(work)]
        with self._lock:
            self.scheduler.add(request, items, owner)
            self._waiting_since[request] = time.monotonic()
            self.caches.retain(items)
            self._futures[request] = future
            if on_progress is not None:
                self._progress[request] = on_progress
            if self.background:
                if self._worker is None:
                    # not a daemon: the interpreter joins it at exit (it exits `idle_s` after its last batch);
                    # a daemon thread still inside torch at shutdown aborts the process
                    self._worker = threading.Thread(target=self._work, name="engine-loop", daemon=False)
                    self._worker.start()
                self._wake.notify()
        return future

    def cancel(self, future: Future) -> bool:
        """Abort a request: its queued items leave the scheduler, its cache claims are released, and
        its future is cancelled. Items already in a running batch finish and are dropped. Returns
        whether the request was still pending."""
        request = future.request_id
        with self._lock:
            self.caches.release(self.scheduler.abort(request))
            pending = self._futures.pop(request, None) is not None
            self._progress.pop(request, None)
            self._waiting_since.pop(request, None)
        if pending:
            future.cancel()
        return pending

    def pin(self, keys) -> None:
        """Ask the clean passes of these texts (their ids) to keep their prefix caches (`PrefixCaches`)
        until `unpin`: their perturbations, submitted after, then read them instead of rebuilding."""
        with self._lock:
            self.caches.pin(keys)

    def unpin(self, keys) -> None:
        with self._lock:
            self.caches.unpin(keys)

    def result(self, future: Future, timeout: float | None = None) -> list:
        """The future's outputs; stepping the loop where no worker does. Interrupted (KeyboardInterrupt,
        timeout, any error), the request is cancelled before the exception propagates."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if not self.background:
                while not future.done():
                    if not self.step():
                        raise RuntimeError("the loop is idle but the request is not done")
            while True:
                # waits in slices, so a KeyboardInterrupt reaches a waiting main thread within 0.1 s
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    return future.result(_WAIT_SLICE_S if left is None else max(0.0, min(left, _WAIT_SLICE_S)))
                except FutureTimeout:
                    if left is not None and left <= _WAIT_SLICE_S:
                        raise
        except BaseException:
            self.cancel(future)
            raise

    def run(self, work: Sequence[Work], on_progress=None, timeout: float | None = None) -> list:
        """`submit`, then wait for the result (cancelled if the wait is interrupted)."""
        return self.result(self.submit(work, on_progress), timeout)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until nothing is queued and no batch runs (False after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._step_lock, self._lock:
                if not self.scheduler.has_work():
                    return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        """Take no new requests; those submitted still run to the end."""
        self.closed = True

    def pending(self) -> int:
        """Requests submitted and not yet finished, failed or cancelled."""
        with self._lock:
            return len(self._futures)

    # --------------------------------------------------------------------------------------- loop

    def step(self) -> bool:
        """Run one batch; False when nothing was queued."""
        with self._step_lock:
            with self._lock:
                batch = self.scheduler.schedule()
                now = time.monotonic()
                waits = [now - self._waiting_since.pop(r) for r in self._requests_of(batch) if r in self._waiting_since]
            if batch is None:
                return False
            if self.observer is not None:
                for seconds in waits:
                    self.observer.on_queue_wait(seconds)
            try:
                outputs = self.runner.execute(batch, self.caches)
            except BaseException as err:
                self._fail(batch, err)
                if not isinstance(err, Exception):
                    raise
                return True
            if self.observer is not None:
                self.observer.on_batch(batch, time.monotonic() - now)
            self._complete(batch, outputs)
            return True

    @staticmethod
    def _requests_of(batch: Batch | None) -> list[int]:
        return [] if batch is None else list(dict.fromkeys(item.request for item in batch.items))

    def queued_tokens(self) -> int:
        with self._lock:
            return self.scheduler.queued_tokens()

    def run_until_idle(self) -> int:
        """Step until nothing is queued; returns the batches run."""
        n = 0
        while self.step():
            n += 1
        return n

    def _complete(self, batch: Batch, outputs: list) -> None:
        with self._lock:
            self.caches.release(batch.items)
            self.batches_run += 1
            self.batch_log.append((batch.group[:1], tuple(dict.fromkeys(item.request for item in batch.items))))
            counts: dict[int, int] = {}
            for item in batch.items:
                counts[item.request] = counts.get(item.request, 0) + 1
            callbacks = [(self._progress[r], n) for r, n in counts.items() if r in self._progress]
            done = []
            for request, outs in self.scheduler.complete(batch, outputs):
                self._progress.pop(request, None)
                future = self._futures.pop(request, None)
                if future is not None:
                    done.append((future, outs))
        for callback, n in callbacks:
            callback(n)
        for future, outs in done:
            future.set_result(outs)

    def _fail(self, batch: Batch, err: BaseException) -> None:
        requests = dict.fromkeys(item.request for item in batch.items)
        failed = []
        with self._lock:
            self.caches.release(batch.items)
            for request in requests:
                self.caches.release(self.scheduler.abort(request))
                self._progress.pop(request, None)
                self._waiting_since.pop(request, None)
                future = self._futures.pop(request, None)
                if future is not None:
                    failed.append(future)
        for future in failed:
            future.set_exception(err)

    def _work(self) -> None:
        """The worker thread: step while there is work; exit after `idle_s` without any."""
        try:
            while True:
                with self._lock:
                    while not self.scheduler.has_work():
                        if not self._wake.wait(timeout=self.idle_s) and not self.scheduler.has_work():
                            return
                self.step()
        finally:
            with self._lock:
                if self._worker is threading.current_thread():
                    self._worker = None
