"""Prometheus metrics for every stage. One ``Metrics`` per app, on its own registry, so tests can
build many apps in one process. ``serve_metrics`` exposes it on ``worker.metrics_port`` at
``/metrics``, and the worker's liveness (infra/liveness.py) at ``/livez``: 200 or 503 with JSON.

Names follow Prometheus conventions (``echolm_`` prefix, ``_seconds``, ``_total``). Labels are
bounded: stage, backend, tier, outcome/code and reason are small sets; tenants are never labels.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from urllib.parse import urlparse

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

from .liveness import Liveness

__all__ = ["STAGES", "Metrics", "serve_metrics"]

STAGES = (
    "parse",
    "embed",
    "retrieve",
    "select",
    "kafka_hop",
    "handoff",
    "route",
    "generate",
    "emit",
    "total",
)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.stage_seconds = Histogram(
            "echolm_stage_seconds",
            "Time spent per pipeline stage",
            ["stage"],
            registry=r,
            buckets=(*_FAST, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0),
        )
        self.requests = Counter(
            "echolm_requests_total", "Requests finished, by outcome", ["outcome"], registry=r
        )
        self.served = Counter(
            "echolm_served_total",
            "Requests answered, by tier and whether examples were used",
            ["tier", "with_examples"],
            registry=r,
        )
        self.offload_ratio = Gauge(
            "echolm_offload_ratio",
            "Share of answered requests served by a non-large tier (since start)",
            registry=r,
        )
        self.examples_selected = Histogram(
            "echolm_examples_selected",
            "In-context examples prepended per request",
            registry=r,
            buckets=(0, 1, 2, 3, 4, 5, 8),
        )
        self.cache_hits = Counter(
            "echolm_cache_hits_total", "Requests with at least one example selected", registry=r
        )
        self.cache_lookups = Counter(
            "echolm_cache_lookups_total", "Requests that searched the example bank", registry=r
        )
        self.embed_cache = Counter(
            "echolm_embed_cache_total",
            "Prompt embeddings answered by the exact-repeat LRU (hit) or the model (miss)",
            ["result"],
            registry=r,
        )
        self._embed_cache_seen = {"hit": 0, "miss": 0}
        self.cache_size = Gauge(
            "echolm_cache_examples", "Examples stored in the bank (last count)", registry=r
        )
        self.cache_bytes = Gauge("echolm_cache_bytes", "Stored example text bytes (last scan)", registry=r)
        self.admitted = Counter(
            "echolm_examples_admitted_total", "Examples written to the bank", ["reason"], registry=r
        )
        self.evicted = Counter("echolm_examples_evicted_total", "Examples evicted", ["reason"], registry=r)
        self.replayed = Counter("echolm_replays_total", "Replay attempts, by result", ["result"], registry=r)
        self.queue_depth = Gauge(
            "echolm_backend_queue_depth", "Last scraped queue depth", ["backend", "kind"], registry=r
        )
        self.queue_age = Gauge(
            "echolm_backend_depth_age_seconds", "Age of the last good depth sample", ["backend"], registry=r
        )
        self.load_bias = Gauge(
            "echolm_router_load_bias",
            "Load-driven bias away from costly tiers (autoscaling signal)",
            registry=r,
        )
        self.route = Counter("echolm_route_total", "Routing decisions", ["backend", "reason"], registry=r)
        self.backend_errors = Counter(
            "echolm_backend_errors_total", "Backend failures", ["backend", "code"], registry=r
        )
        self.circuit_open = Gauge(
            "echolm_backend_circuit_open", "1 while a backend's circuit is open", ["backend"], registry=r
        )
        self.bypass = Counter(
            "echolm_selection_bypass_total", "Requests served without selection", ["reason"], registry=r
        )
        self.dead_letters = Counter(
            "echolm_dead_letters_total", "Records dead-lettered", ["code"], registry=r
        )
        self.handler_failures = Counter(
            "echolm_handler_failures_total",
            "Records whose handler raised, answered and dead-lettered by the guard, by stage",
            ["stage"],
            registry=r,
        )
        self.feedback = Counter(
            "echolm_feedback_total", "Feedback records, by join result", ["result"], registry=r
        )
        self.idempotency = Counter(
            "echolm_idempotency_total",
            "serve's idempotency check: stored replies re-sent instead of generated (resent), waits for "
            "this worker's own generation of the same id (waited), catch-ups that timed out (unsynced)",
            ["result"],
            registry=r,
        )
        self.answered_entries = Gauge(
            "echolm_answered_entries", "Answers remembered for the idempotency check", registry=r
        )
        self.answered_bytes = Gauge(
            "echolm_answered_bytes", "Bytes of answers remembered for the idempotency check", registry=r
        )
        self.inflight = Gauge(
            "echolm_inflight_requests", "Requests being generated by this worker", registry=r
        )
        self._served_small = 0
        self._served_all = 0

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def count_served(self, tier: str, large_tier: str, n_examples: int) -> None:
        self.served.labels(tier, str(n_examples > 0).lower()).inc()
        self._served_all += 1
        if tier != large_tier:
            self._served_small += 1
        self.offload_ratio.set(self._served_small / self._served_all)

    def sync_embed_cache(self, hits: int, misses: int) -> None:
        """Advance ``echolm_embed_cache_total`` to the embedder's running totals (called by a timer)."""
        for result, total in (("hit", hits), ("miss", misses)):
            delta = total - self._embed_cache_seen[result]
            if delta > 0:
                self.embed_cache.labels(result).inc(delta)
                self._embed_cache_seen[result] = total


class _Handler(MetricsHandler):
    liveness: Liveness | None = None

    def do_GET(self) -> None:
        if urlparse(self.path).path != "/livez":
            super().do_GET()
            return
        if self.liveness is None:
            status, body = 404, b'{"error": "this server has no liveness check"}'
        else:
            report = self.liveness.report()
            status, body = (200 if report.ok else 503), orjson.dumps(report.as_dict())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_metrics(
    metrics: Metrics, port: int, addr: str = "0.0.0.0", *, liveness: Liveness | None = None
) -> ThreadingHTTPServer | None:
    """Serve ``/metrics`` (and ``/livez`` when ``liveness`` is given) on a daemon thread; None if port 0."""
    if not port:
        return None
    handler = type("Handler", (_Handler,), {"registry": metrics.registry, "liveness": liveness})
    server = ThreadingHTTPServer((addr, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="echolm-metrics", daemon=True).start()
    return server
