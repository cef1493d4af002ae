"""/metrics in Prometheus' text format (prometheus-client), every name prefixed qwen3_mlx_ and by
Prometheus' conventions (`_total` counters, `_seconds` and `_bytes` units, `model` and `route` labels):

    qwen3_mlx_requests_total{route, model, status}            every answered request, refusals included
    qwen3_mlx_prompt_tokens_total, _cached_prompt_tokens_total  prompt tokens; those the prefix store held
    qwen3_mlx_generation_tokens_total                          tokens generated (what usage counts)
    qwen3_mlx_prefix_hits_total{tier}                          requests that reused a stored prefix
    qwen3_mlx_speculative_drafted_tokens_total, _accepted_...   speculative decoding's drafts and kept tokens
    qwen3_mlx_time_to_first_token_seconds                      request in -> first token (histogram)
    qwen3_mlx_time_per_output_token_seconds                    first token -> last, per later token (histogram)
    qwen3_mlx_model_loads_total, _unloads_total, _load_seconds  models loaded and let go, and how long loads took
    qwen3_mlx_queue_length, qwen3_mlx_running_rows             read from the engine at each scrape
    qwen3_mlx_kv_cache_bytes, _prefix_store_bytes, qwen3_mlx_memory_{limit,active,peak}_bytes

Each app has its own registry, so two apps in one process (the tests') count apart.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..generation.response import Chunk, GenerationStats

# Seconds: a tiny model's first token on a CPU takes milliseconds, a 12k-token prompt on a Mac tens of seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
UNMATCHED = "unmatched"  # the route label of a path no route serves (a bounded label, whatever is asked)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# engine.memory()'s figures (what /health reports) as gauges: their names and what they count.
_MEMORY = {"kv": ("kv_cache", "Bytes of the KV caches held now (the batch's and the prompts being computed)"),
           "prefix_store": ("prefix_store", "Bytes of the prefix store's caches"),
           "limit": ("memory_limit", "The memory ceiling, in bytes"),
           "active": ("memory_active", "Bytes of MLX's memory in use now"),
           "peak": ("memory_peak", "Bytes of MLX's memory at its peak")}


class Metrics:
    """The server's counters and histograms, and the engine's gauges read at each scrape."""

    def __init__(self, engine: Any, model: str) -> None:
        self.model = model
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qwen3_mlx_requests", "HTTP requests answered, by route, model and status",
                                ["route", "model", "status"], registry=r)
        self.prompt_tokens = Counter("qwen3_mlx_prompt_tokens", "Prompt tokens of generation requests",
                                     ["model"], registry=r)
        self.cached_tokens = Counter("qwen3_mlx_cached_prompt_tokens", "Prompt tokens found in the prefix store, "
                                     "not computed again", ["model"], registry=r)
        self.generated = Counter("qwen3_mlx_generation_tokens", "Tokens generated: reasoning, answer, forced text "
                                 "and the end of turn (what usage counts)", ["model"], registry=r)
        self.prefix_hits = Counter("qwen3_mlx_prefix_hits", "Requests whose prompt began with a stored prefix, by "
                                   "where it was found", ["model", "tier"], registry=r)
        self.drafted = Counter("qwen3_mlx_speculative_drafted_tokens", "Draft tokens checked by the model",
                               ["model"], registry=r)
        self.accepted = Counter("qwen3_mlx_speculative_accepted_tokens", "Draft tokens the model kept",
                                ["model"], registry=r)
        self.ttft = Histogram("qwen3_mlx_time_to_first_token_seconds", "From the request's arrival to its first "
                              "generated token", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("qwen3_mlx_time_per_output_token_seconds", "From the first generated token to the "
                              "last, over the tokens after the first", ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.loads = Counter("qwen3_mlx_model_loads", "Models loaded", ["model"], registry=r)
        self.unloads = Counter("qwen3_mlx_model_unloads", "Models let go", ["model"], registry=r)
        self.load_seconds = Histogram("qwen3_mlx_model_load_seconds", "How long a model took to load", ["model"],
                                      buckets=LOAD_BUCKETS, registry=r)
        r.register(EngineCollector(engine, model))

    def loaded(self, model: str, seconds: float) -> None:
        """A model was loaded in `seconds`."""
        self.loads.labels(model).inc()
        self.load_seconds.labels(model).observe(seconds)

    def exposition(self) -> bytes:
        """The text /metrics answers (CONTENT_TYPE)."""
        return generate_latest(self.registry)

    def finished(self, stats: GenerationStats, first: float | None, last: float | None, started: float) -> None:
        """One generation request's counts: its tokens, its prefix hit, its drafts, its timings."""
        model = self.model
        self.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        self.cached_tokens.labels(model).inc(stats.cached_tokens)
        self.generated.labels(model).inc(len(stats.token_ids))
        if stats.cached_tokens:
            self.prefix_hits.labels(model, "memory").inc()
        self.drafted.labels(model).inc(stats.drafted_tokens)
        self.accepted.labels(model).inc(stats.accepted_tokens)
        if first is not None:
            self.ttft.labels(model).observe(first - started)
        if first is not None and last is not None and len(stats.token_ids) > 1:
            self.tpot.labels(model).observe((last - first) / (len(stats.token_ids) - 1))

    async def watch(self, chunks: AsyncIterator[Chunk], started: float) -> AsyncIterator[Chunk]:
        """The chunks as they come, timed: the first and last token's times, counted once the reply ends
        (a reply whose client went away too)."""
        stats, first, last = None, None, None
        try:
            async for chunk in chunks:
                stats = chunk.stats
                if stats.token_ids:
                    last = time.perf_counter()
                    first = first or last
                yield chunk
        finally:
            if stats is not None:
                self.finished(stats, first, last, started)


class EngineCollector(Collector):
    """The engine's state at each scrape: its queue, its rows and its memory (what /health reports)."""

    def __init__(self, engine: Any, model: str) -> None:
        self.engine, self.model = engine, model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self.engine
        scheduler = getattr(engine, "scheduler", None)
        gauges = {"queue_length": ("Requests waiting for a row", len(scheduler.waiting) if scheduler else 0),
                  "running_rows": ("Requests being decoded", engine.rows)}
        figures = engine.memory() if hasattr(engine, "memory") else {}
        for key, (name, what) in _MEMORY.items():
            if key in figures:
                gauges[f"{name}_bytes"] = (what, figures[key])
        for name, (what, value) in gauges.items():
            family = GaugeMetricFamily(f"qwen3_mlx_{name}", what, labels=["model"])
            family.add_metric([self.model], value)
            yield family


class MetricsMiddleware:
    """ASGI middleware: stamps each request's arrival (request.state.started, for the time to first token)
    and counts it by its route's template, the model and the status it was answered with."""

    def __init__(self, app: Any, metrics: Metrics, paths: Callable[[], Iterable[str]]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths
        self.known: set[str] | None = None  # the app's paths, read once it has them all

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["started"] = time.perf_counter()
        status = 500  # an exception that escapes every handler

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(self._route(scope), self.metrics.model, str(status)).inc()

    def _route(self, scope: dict) -> str:
        """The route's path template; for a request refused before routing (the key, the body's size,
        the drain), its path when a route has it."""
        route = getattr(scope.get("route"), "path", None)
        if route is None:
            self.known = self.known if self.known is not None else set(self.paths())
            route = scope["path"] if scope["path"] in self.known else None
        return route or UNMATCHED
