"""The server's Prometheus metrics, in a registry of its own (several servers in one process, as in
the tests, do not collide)."""

from __future__ import annotations


class ServerMetrics:
    def __init__(self, ex):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from ..methods import available_methods

        self.known = set(available_methods())
        self.registry = CollectorRegistry()
        r = self.registry
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("engine_requests", "HTTP explain requests by outcome", ["outcome"], registry=r)
        self.instances = Counter(
            "engine_instances", "instances by method and outcome", ["method", "outcome"], registry=r
        )
        self.latency = Histogram(
            "engine_request_seconds", "end-to-end latency of explain requests", buckets=latency, registry=r
        )
        self.queue_wait = Histogram(
            "engine_queue_wait_seconds", "submit to first batch, per loop request", buckets=latency, registry=r
        )
        self.inference = Histogram("engine_batch_seconds", "execution time per batch", buckets=latency, registry=r)
        self.batches = Counter("engine_batches", "batches run", registry=r)
        self.batch_tokens = Histogram(
            "engine_batch_tokens",
            "tokens per batch (padded cost)",
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.batch_requests = Histogram(
            "engine_batch_requests", "loop requests per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        Gauge("engine_queued_tokens", "tokens of queued work items", registry=r).set_function(ex.loop.queued_tokens)
        Gauge("engine_prefix_cache_hits", "batches' texts whose prefix cache was already built (cumulative)",
              registry=r).set_function(lambda: ex.loop.caches.hits)  # fmt: skip
        Gauge("engine_prefix_cache_misses", "prefix caches built (cumulative)", registry=r).set_function(
            lambda: ex.loop.caches.misses
        )

    def request(self, outcome: str, seconds: float, methods=None, answers=None) -> None:
        """One HTTP request's outcome and latency; with `methods`, one count per instance (or per method
        of a comparison) by its own outcome, from `answers` (None where the request got none)."""
        self.requests.labels(outcome).inc()
        self.latency.observe(seconds)
        if methods is None:
            return
        for method, answer in zip(methods, answers or [None] * len(methods), strict=True):
            kind = outcome if answer is None else ("failed" if "error" in answer else "ok")
            # a label per registered method only: a client's made-up names must not grow the series
            self.instances.labels(method if method in self.known else "unknown", kind).inc()

    # the engine loop's observer (called on its thread)
    def on_batch(self, batch, seconds: float) -> None:
        self.batches.inc()
        self.inference.observe(seconds)
        self.batch_tokens.observe(batch.tokens)
        self.batch_requests.observe(len({item.request for item in batch.items}))

    def on_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
