"""Prometheus metrics for the HTTP server: requests, tokens, time to first token, per-token latency, queue depth,
batch size, prefix-cache and media-feature-cache use, per model.

prometheus_client renders the text format; counters and histograms are fed by each engine's finished requests
(Engine.listeners), and the gauges are read from the engines' status when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.request import Event

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineGauges(Collector):
    """Gauges read from the engines at scrape time: queue depth, active requests, batch size, prefix cache."""

    def __init__(self, statuses: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.statuses = statuses

    def collect(self) -> Iterator[Any]:
        """Yield the current values (called by prometheus_client on every scrape)."""
        queued = GaugeMetricFamily("gallery_queue_depth", "Requests waiting for a slot", labels=["model"])
        active = GaugeMetricFamily("gallery_active_requests", "Requests being decoded", labels=["model"])
        batch = GaugeMetricFamily("gallery_batch_size", "Rows in the continuous batch", labels=["model"])
        hits = CounterMetricFamily(
            "gallery_prefix_cache_hits", "Prompts that reused a cached prefix", labels=["model", "route"]
        )
        reused = CounterMetricFamily(
            "gallery_prefix_cache_reused_tokens",
            "Prompt tokens reused from the cache",
            labels=["model", "route"],
        )
        cache_bytes = GaugeMetricFamily(
            "gallery_prefix_cache_bytes", "Memory held by cached prompts", labels=["model"]
        )
        vision = {
            kind: CounterMetricFamily(f"gallery_vision_cache_{kind}", text, labels=["model"])
            for kind, text in (
                ("hits", "Tower calls answered from the media feature cache"),
                ("misses", "Tower calls that ran the tower (media feature cache misses)"),
            )
        }
        vision_held = {
            kind: GaugeMetricFamily(
                f"gallery_vision_cache_{kind}", f"Media feature cache {kind} held", labels=["model"]
            )
            for kind in ("entries", "bytes")
        }
        weights = GaugeMetricFamily(
            "gallery_model_weights_bytes", "Memory held by a loaded model's weights", labels=["model"]
        )
        process = GaugeMetricFamily(
            "gallery_process_memory_bytes",
            "The server process's memory (rss, mlx_active, …)",
            labels=["kind"],
        )
        statuses = self.statuses()
        for model, status in statuses.items():
            weights.add_metric([model], status.get("weights_bytes", 0))
            queued.add_metric([model], status.get("queued", 0))
            active.add_metric([model], status.get("active", 0))
            batch.add_metric([model], status.get("batch", 0))
            for route, cache in (status.get("prefix_cache") or {}).items():
                hits.add_metric([model, route], cache.get("hits", 0))
                reused.add_metric([model, route], cache.get("reused_tokens", 0))
                if "bytes" in cache:
                    cache_bytes.add_metric([model], cache["bytes"])
            features = status.get("vision_cache") or {}  # VLMs only
            for kind in ("hits", "misses") if features else ():
                vision[kind].add_metric([model], features.get(kind, 0))
            for kind in ("entries", "bytes") if features else ():
                vision_held[kind].add_metric([model], features.get(kind, 0))
        for status in list(statuses.values())[:1]:  # one process: every engine reports the same figures
            for kind, value in (status.get("memory") or {}).items():
                process.add_metric([kind], value)
        yield from (queued, active, batch, hits, reused, cache_bytes, *vision.values(), *vision_held.values())
        yield from (weights, process)


class ServerMetrics:
    """The HTTP server's metrics registry."""

    def __init__(self, statuses: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gallery_requests",
            "Finished generation requests",
            ["model", "finish_reason"],
            registry=self.registry,
        )
        self.tokens = Counter("gallery_tokens", "Tokens processed", ["model", "kind"], registry=self.registry)
        self.ttft = Histogram(
            "gallery_time_to_first_token_seconds",
            "Queue plus prompt time until the first token",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.per_token = Histogram(
            "gallery_time_per_output_token_seconds",
            "Mean time between generated tokens",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.http = Counter(
            "gallery_http_responses",
            "HTTP responses by route template and status",
            ["path", "status"],
            registry=self.registry,
        )
        self.registry.register(_EngineGauges(statuses))
        self.device = Gauge(
            "gallery_device_info",
            "The device MLX computes on (value 1)",
            ["kind", "backend", "name"],
            registry=self.registry,
        )

    def set_device(self, info: dict[str, str]) -> None:
        """Record the device (once MLX is up)."""
        self.device.labels(info["kind"], info["backend"], info["name"]).set(1)

    def listener(self, model: str) -> Callable[[Event], None]:
        """What an engine calls with every finished request of `model`."""

        def observe(final: Event) -> None:
            usage, timings = final.usage, final.timings
            self.requests.labels(model, final.finish_reason or "unknown").inc()
            if usage is not None:
                self.tokens.labels(model, "prompt").inc(usage.prompt_tokens)
                self.tokens.labels(model, "cached_prompt").inc(usage.cached_tokens)
                self.tokens.labels(model, "completion").inc(usage.completion_tokens)
            if timings is not None and usage is not None and usage.completion_tokens:
                self.ttft.labels(model).observe(timings.queued_s + timings.prompt_s)
                if usage.completion_tokens > 1:
                    self.per_token.labels(model).observe(timings.generation_s / (usage.completion_tokens - 1))

        return observe

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
