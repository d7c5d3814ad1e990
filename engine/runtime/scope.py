"""A call's scope: its deadline and the loop requests it has in flight, so that another thread (a
server noticing that its client left) can cancel the call, and the call stops waiting at its deadline.

    with ex.scope(timeout_s=2.0) as scope:   # on the calling thread
        ex.attribute(texts, "leave_one_out")  # raises DeadlineExceeded after 2 s, its work purged
    scope.cancel()                            # from any thread: the call raises CallCancelled
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout  # the builtin TimeoutError from 3.11 on
from contextlib import contextmanager

_current = threading.local()


class DeadlineExceeded(TimeoutError):
    """The call's deadline passed; its queued work was cancelled."""


class CallCancelled(CancelledError):
    """The call was cancelled from another thread (`CallScope.cancel`); its queued work is gone."""


class CallScope:
    def __init__(self, timeout_s: float | None = None):
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.cancelled = False
        self._lock = threading.Lock()
        self._in_flight: list[tuple[object, Future]] = []  # (loop, future)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise if the call may not go on (cancelled, or past its deadline)."""
        if self.cancelled:
            raise CallCancelled("the call was cancelled")
        left = self.remaining()
        if left is not None and left <= 0:
            raise DeadlineExceeded("the call's deadline passed")

    def track(self, loop, future: Future) -> None:
        with self._lock:
            self._in_flight = [(lp, f) for lp, f in self._in_flight if not f.done()]
            self._in_flight.append((loop, future))
            cancelled = self.cancelled
        if cancelled:
            loop.cancel(future)

    def cancel(self) -> None:
        """Cancel the call from any thread: its queued requests leave the loop now."""
        with self._lock:
            self.cancelled = True
            in_flight = list(self._in_flight)
        for loop, future in in_flight:
            loop.cancel(future)


def current() -> CallScope | None:
    return getattr(_current, "scope", None)


def scoped(timeout_s: float | None = None):
    """A new scope for the calls made on this thread inside the block (nested: the inner one applies)."""
    return using(CallScope(timeout_s))


def check_current() -> None:
    """Raise if this thread's scope (if any) says the call may not go on."""
    scope = current()
    if scope is not None:
        scope.check()


def wait(loop, future: Future) -> list:
    """`loop.result(future)` under the thread's scope: its deadline, its cancellation."""
    scope = current()
    if scope is None:
        return loop.result(future)
    scope.track(loop, future)
    try:
        return loop.result(future, scope.remaining())
    except FutureTimeout as err:
        raise DeadlineExceeded("the call's deadline passed; its queued work was cancelled") from err
    except CancelledError as err:
        raise CallCancelled("the call was cancelled; its queued work is gone") from err


@contextmanager
def using(scope: CallScope):
    """Make an existing scope (created on another thread, which may cancel it) this thread's."""
    previous = current()
    _current.scope = scope
    try:
        yield scope
    finally:
        _current.scope = previous
