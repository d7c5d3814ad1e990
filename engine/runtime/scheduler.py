"""Token-budgeted batching of work items from many requests. Pure Python: no torch, no devices.

A request (one caller's call: its texts x one method) expands into work items: one perturbed sequence,
one IG step. `add()` queues them; `schedule()` returns the next `Batch`; the caller runs it and hands
the outputs to `complete()`, which returns the requests whose every item is done, outputs in item
order. `abort()` takes a request's queued items out (a cancelled call); outputs of its items already in
a running batch are dropped when they come back.

Packing rule: items only share a batch when they share a `group` (the runner that executes them and,
where rows must have equal length, the length). The next batch takes the group of the oldest pending
item and fills it with that group's items in submission order, until adding one more would exceed
`max_batch_tokens` or `max_batch_size`. While items of other owners wait in the group, one owner (a
request, or the caller that submitted several: `add(..., owner=)`) takes at most `max_request_share`
of the batch's tokens (the batch's first item always fits), so a large request cannot starve the
small ones that arrive behind it. A batch costs the sum of its items' tokens,
or what `batch_cost(group, items)` says when the runner lays items out with padding and shared cached
prefixes (`runtime.layout`), so the budget bounds the padded tokens a batch holds in memory, whatever
mix of texts it packs. Submission order within a group keeps requests finishing roughly in order, so
per-text state (a prefix cache) lives only while its items are in flight. An item that alone exceeds
`max_batch_tokens` runs alone: it cannot be split.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .types import Batch, WorkItem

__all__ = ["Batch", "Scheduler", "WorkItem"]


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
        max_request_share: float | None = None,
    ):
        """`batch_cost(group, items)`: a batch's cost when it is more than the sum of its items'
        tokens (padding, shared prefixes); it must be at least that sum and grow as items are added.
        `max_request_share`: the fraction of `max_batch_tokens` one request may take while others wait
        (None: no cap, strict submission order)."""
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_request_share is not None and not 0 < max_request_share <= 1:
            raise ValueError(f"max_request_share must be in (0, 1] or None, got {max_request_share}")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.batch_cost = batch_cost
        self.max_request_share = max_request_share
        self._queues: dict[Hashable, deque[tuple[int, WorkItem]]] = {}  # group -> (sequence no., item)
        self._requests: dict[Hashable, _Request] = {}
        self._owners: dict[Hashable, Hashable] = {}  # request -> owner, for the per-owner share
        self._queued_tokens = 0  # the tokens of every queued item (admission control reads it)
        self._sequence = itertools.count()

    def add(self, request: Hashable, items: Iterable[WorkItem], owner: Hashable | None = None) -> None:
        """Queue a request's items; `owner` (default: the request) is what `max_request_share` caps."""
        items = list(items)
        if request in self._requests:
            raise ValueError(f"request {request!r} was already added")
        if sorted(item.index for item in items) != list(range(len(items))):
            raise ValueError(f"request {request!r}: item indices must be 0..{len(items) - 1}")
        self._requests[request] = _Request(n_items=len(items))
        self._owners[request] = request if owner is None else owner
        for item in items:
            if item.request != request:
                raise ValueError(f"item of request {item.request!r} added under {request!r}")
            self._queues.setdefault(item.group, deque()).append((next(self._sequence), item))
            self._queued_tokens += item.tokens

    def abort(self, request: Hashable) -> list[WorkItem]:
        """Take a request's queued items out; returns them. Its items in a batch already scheduled
        are ignored when that batch completes. Unknown (finished or aborted) requests: no-op."""
        if self._requests.pop(request, None) is None:
            return []
        del self._owners[request]
        removed = []
        for group in list(self._queues):
            queue = self._queues[group]
            kept = deque(entry for entry in queue if entry[1].request != request)
            removed.extend(item for _, item in queue if item.request == request)
            if kept:
                self._queues[group] = kept
            else:
                del self._queues[group]
        self._queued_tokens -= sum(item.tokens for item in removed)
        return removed

    def has_work(self) -> bool:
        return any(self._queues.values())

    def pending_requests(self) -> int:
        return len(self._requests)

    def queued_tokens(self) -> int:
        return self._queued_tokens

    def queued_items(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def schedule(self) -> Batch | None:
        """The next batch, or None when nothing is queued."""
        heads = [(queue[0][0], group) for group, queue in self._queues.items() if queue]
        if not heads:
            return None
        _, group = min(heads)
        queue = self._queues[group]
        limit = len(queue) if self.max_batch_size is None else min(len(queue), self.max_batch_size)
        cap = float("inf")
        owner = self._owners.get
        if self.max_request_share is not None and len({owner(item.request) for _, item in queue}) > 1:
            cap = self.max_request_share * self.max_batch_tokens
        # the longest run of queued items whose own tokens fit (a bound for any batch cost), skipping
        # the items of a request past its share while others wait
        chosen, items, own, taken = [], [], 0, Counter()
        for position, (_, item) in enumerate(queue):
            if len(items) == limit or (items and own + item.tokens > self.max_batch_tokens):
                break
            if items and taken[owner(item.request)] + item.tokens > cap:
                continue
            chosen.append(position)
            items.append(item)
            own += item.tokens
            taken[owner(item.request)] += item.tokens
        tokens = own
        if self.batch_cost is not None:
            items, tokens = self._fit(group, items)
            chosen = chosen[: len(items)]
        if chosen[-1] == len(chosen) - 1:  # a leading run: the common case
            for _ in chosen:
                queue.popleft()
        else:
            taken_positions = set(chosen)
            self._queues[group] = queue = deque(e for p, e in enumerate(queue) if p not in taken_positions)
        if not queue:
            del self._queues[group]
        self._queued_tokens -= sum(item.tokens for item in items)
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
            state = self._requests.get(item.request)
            if state is None:  # aborted while its batch ran
                continue
            state.outputs[item.index] = output
            if len(state.outputs) == state.n_items:
                del self._requests[item.request]
                del self._owners[item.request]
                finished.append((item.request, [state.outputs[i] for i in range(state.n_items)]))
        return finished
