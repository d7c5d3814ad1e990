"""Token-budgeted batching of work items from many requests. Pure Python: no torch, no devices.

A request (one text x one method) expands into work items: one perturbed sequence, one IG step.
`add()` queues them; `schedule()` returns the next `Batch`; the caller runs it and hands the outputs
to `complete()`, which returns the requests whose every item is done, outputs in item order.

Packing rule: items only share a batch when they share a `group` (the runner that executes them and,
where rows must have equal length, the length). The next batch takes the group of the oldest pending
item and fills it with that group's items in submission order, until adding one more would exceed
`max_batch_tokens` or `max_batch_size`. A batch costs the sum of its items' tokens, or what the
runner's `batch_cost(group, items)` says when it lays items out with padding and shared cached
prefixes (rows x (prefix columns + query columns)), so the budget bounds the padded tokens a batch
holds in memory, whatever mix of texts it packs. Submission order within a group keeps requests finishing
roughly in order, so per-request state (a prefix cache) lives only while its items are in flight.
An item that alone exceeds `max_batch_tokens` runs alone: it cannot be split.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkItem:
    request: Hashable  # the request this item belongs to
    index: int  # position among its request's items; outputs come back in this order
    group: Hashable  # items run together only within one group (runner kind, sequence length, ...)
    tokens: int  # the tokens this item computes; a batch costs their sum, or `batch_cost` of them
    payload: Any = None  # what the runner needs (ids, step, ...); opaque to the scheduler


@dataclass
class Batch:
    group: Hashable  # the group every item shares
    items: list[WorkItem]  # in submission order
    tokens: int  # the batch's cost against max_batch_tokens


@dataclass
class _Request:
    n_items: int
    outputs: dict[int, Any] = field(default_factory=dict)  # item index -> output


class Scheduler:
    def __init__(
        self,
        max_batch_tokens: int,
        max_batch_size: int | None = None,
        batch_cost: Callable[[Hashable, list[WorkItem]], int] | None = None,
    ):
        """`batch_cost(group, items)`: a batch's cost when it is more than the sum of its items'
        tokens (padding, shared prefixes); it must be at least that sum and grow as items are added."""
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.batch_cost = batch_cost
        self._queues: dict[Hashable, deque[tuple[int, WorkItem]]] = {}  # group -> (sequence no., item)
        self._requests: dict[Hashable, _Request] = {}
        self._sequence = itertools.count()

    def add(self, request: Hashable, items: Iterable[WorkItem]) -> None:
        items = list(items)
        if request in self._requests:
            raise ValueError(f"request {request!r} was already added")
        if sorted(item.index for item in items) != list(range(len(items))):
            raise ValueError(f"request {request!r}: item indices must be 0..{len(items) - 1}")
        self._requests[request] = _Request(n_items=len(items))
        for item in items:
            if item.request != request:
                raise ValueError(f"item of request {item.request!r} added under {request!r}")
            self._queues.setdefault(item.group, deque()).append((next(self._sequence), item))

    def has_work(self) -> bool:
        return any(self._queues.values())

    def pending_requests(self) -> int:
        return len(self._requests)

    def schedule(self) -> Batch | None:
        """The next batch, or None when nothing is queued."""
        heads = [(queue[0][0], group) for group, queue in self._queues.items() if queue]
        if not heads:
            return None
        _, group = min(heads)
        queue = self._queues[group]
        # the longest run of queued items whose own tokens fit: a bound for any batch cost
        limit = len(queue) if self.max_batch_size is None else min(len(queue), self.max_batch_size)
        items, own = [], 0
        for _, item in itertools.islice(queue, limit):
            if items and own + item.tokens > self.max_batch_tokens:
                break
            items.append(item)
            own += item.tokens
        tokens = own
        if self.batch_cost is not None:
            items, tokens = self._fit(group, items)
        for _ in items:
            queue.popleft()
        if not queue:
            del self._queues[group]
        return Batch(group=group, items=items, tokens=tokens)

    def _fit(self, group: Hashable, items: list[WorkItem]) -> tuple[list[WorkItem], int]:
        """The longest leading run of `items` whose `batch_cost` fits the budget (at least one item),
        by bisection: the cost grows with the run, and each evaluation lays the batch out."""
        cost = self.batch_cost(group, items)
        if cost <= self.max_batch_tokens:
            return items, cost
        lo, hi = 1, len(items)  # the run of `lo` items fits (or lo == 1); `hi` items do not
        lo_cost = self.batch_cost(group, items[:1])
        while hi - lo > 1:
            mid = (lo + hi) // 2
            mid_cost = self.batch_cost(group, items[:mid])
            if mid_cost <= self.max_batch_tokens:
                lo, lo_cost = mid, mid_cost
            else:
                hi = mid
        return items[:lo], lo_cost

    def complete(self, batch: Batch, outputs: list) -> list[tuple[Hashable, list]]:
        """Record a batch's outputs (one per item, in item order); return finished (request, outputs)."""
        if len(outputs) != len(batch.items):
            raise ValueError(f"batch of {len(batch.items)} items got {len(outputs)} outputs")
        finished = []
        for item, output in zip(batch.items, outputs, strict=True):
            state = self._requests[item.request]
            state.outputs[item.index] = output
            if len(state.outputs) == state.n_items:
                del self._requests[item.request]
                finished.append((item.request, [state.outputs[i] for i in range(state.n_items)]))
        return finished
