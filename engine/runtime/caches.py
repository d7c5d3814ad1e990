"""Clean prefix caches of causal-LM texts, shared by content and counted by the items that need them.

A perturbation of a text runs from its first changed token over the clean text's per-layer keys and
values. The cache is keyed by the clean ids themselves (two callers attributing the same text share
one), built the first time a batch needs it, and freed as soon as the last queued or running item that
reads it is done or aborted: memory follows the batches in flight, not the number of texts or callers.
Only the engine loop's thread touches it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from .types import SuffixPayload, WorkItem


def _keys(items: Iterable[WorkItem]):
    return (item.payload.prefix for item in items if isinstance(item.payload, SuffixPayload))


class PrefixCaches:
    def __init__(self):
        self._caches: dict[tuple[int, ...], list] = {}  # clean ids -> per-layer (keys, values)
        self._users: Counter = Counter()  # clean ids -> items (queued or running) that read its cache
        self.hits = 0  # batches' texts whose cache was already built
        self.misses = 0  # ... and those built for it

    def retain(self, items: Iterable[WorkItem]) -> None:
        self._users.update(_keys(items))

    def release(self, items: Iterable[WorkItem]) -> None:
        for key in _keys(items):
            self._users[key] -= 1
            if self._users[key] <= 0:
                del self._users[key]
                self._caches.pop(key, None)

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
        """Distinct texts that queued or running items still need a cache for."""
        return len(self._users)
