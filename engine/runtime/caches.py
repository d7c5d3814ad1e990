"""Clean prefix caches of causal-LM texts, shared by content and counted by the items that need them.

A perturbation of a text runs from its first changed token over the clean text's per-layer keys and
values. The cache is keyed by the clean ids themselves (two callers attributing the same text share
one), built the first time a batch needs it, and freed as soon as the last queued or running item that
reads it is done or aborted: memory follows the batches in flight, not the number of texts or callers.

The clean pass computes the same keys and values before the perturbations exist (they need its
prediction), so a caller may `pin` texts whose perturbations it is about to submit: the clean pass
then `keep`s their caches (instead of a second forward over the same texts when their first
perturbation runs), and `unpin` frees whatever no item reads any more. The caller bounds what it pins
(`Explainer` pins at most one batch budget of tokens). The counts change under the loop's lock; only
the loop's thread builds and reads caches.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable

from .types import SuffixPayload, WorkItem


def _keys(items: Iterable[WorkItem]):
    return (item.payload.prefix for item in items if isinstance(item.payload, SuffixPayload))


class PrefixCaches:
    def __init__(self):
        self._caches: dict[tuple[int, ...], list] = {}  # clean ids -> per-layer (keys, values)
        self._users: Counter = Counter()  # clean ids -> items (queued or running) that read its cache
        self._pins: Counter = Counter()  # clean ids -> callers that asked the clean pass to keep its cache
        # a cache is stored (`keep`, by the loop's thread) and freed (by a caller's `unpin` or `cancel`)
        # each as one check-and-act: neither may see the counts between the other's check and act
        self._guard = threading.Lock()
        self.hits = 0  # batches' texts whose cache was already built
        self.misses = 0  # ... and those built for it

    def retain(self, items: Iterable[WorkItem]) -> None:
        self._users.update(_keys(items))

    def release(self, items: Iterable[WorkItem]) -> None:
        for key in _keys(items):
            self._users[key] -= 1
            if self._users[key] <= 0:
                del self._users[key]
                self._free_unread(key)

    def pin(self, keys: Iterable[tuple[int, ...]]) -> None:
        self._pins.update(keys)

    def unpin(self, keys: Iterable[tuple[int, ...]]) -> None:
        for key in keys:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]
                self._free_unread(key)

    def _free_unread(self, key) -> None:
        with self._guard:
            if key not in self._users and key not in self._pins:
                self._caches.pop(key, None)

    def keep(self, key: tuple[int, ...], cache: list) -> None:
        """Store a cache the clean pass computed, where its text is pinned or read (else it is dropped)."""
        with self._guard:
            if (key in self._pins or key in self._users) and key not in self._caches:
                self._caches[key] = cache

    def drop(self, keys: Iterable[tuple[int, ...]]) -> None:
        """Forget built caches (rebuilt on next use): a cache built beside a non-finite text may be NaN."""
        for key in keys:
            self._caches.pop(key, None)

    def get(self, keys: list[tuple[int, ...]], build: Callable[[list], list]) -> list[list]:
        """The caches of `keys`, building the missing ones with `build(missing ids)` (one packed forward)."""
        missing = [key for key in keys if key not in self._caches]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            built = build(missing)
            self._caches.update(zip(missing, built, strict=True))
        return [self._caches[key] for key in keys]

    def live(self) -> int:
        """Caches built and still held."""
        return len(self._caches)

    def needed(self) -> int:
        """Distinct texts that queued or running items still need a cache for, or that are pinned."""
        return len(self._users.keys() | self._pins.keys())
