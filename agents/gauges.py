"""Every worker, once a second: publish what the router sees as Prometheus gauges.

Queue depth per backend (waiting and running, from the probe's last sample), the age of that sample,
and whether the backend's circuit is open; every 30 seconds, the example bank's size. These are the
numbers an operator needs next to ``echolm_router_load_bias`` to decide whether to add replicas.
"""

from __future__ import annotations

import logging
import time

import faust

from infra.errors import DependencyUnavailable
from infra.resources import Resources
from streams.topology import Topics

from .state import DecisionState

__all__ = ["publish_gauges", "register_gauges"]

log = logging.getLogger(__name__)


def publish_gauges(res: Resources, state: DecisionState, *, now_mono: float) -> None:
    m = res.metrics
    probe = res.probe
    snapshot = probe.snapshot() if probe is not None else {}
    open_circuits = state.breaker.open_backends(now_mono)
    for backend in state.backends:
        sample = snapshot.get(backend.name)
        if sample is not None:
            m.queue_depth.labels(backend.name, "waiting").set(sample.waiting)
            m.queue_depth.labels(backend.name, "running").set(sample.running)
            m.queue_age.labels(backend.name).set(max(0.0, now_mono - sample.at))
        m.circuit_open.labels(backend.name).set(1.0 if backend.name in open_circuits else 0.0)
    hits, misses = getattr(res.embedder, "hits", None), getattr(res.embedder, "misses", None)
    if isinstance(hits, int) and isinstance(misses, int):  # the exact-repeat LRU (infra.embedding)
        m.sync_embed_cache(hits, misses)


def register_gauges(app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
    ticks = {"n": 0}

    @app.timer(1.0, name="echolm.gauges")  # type: ignore[untyped-decorator]
    async def gauges() -> None:
        if not res.ready.is_set():
            return
        try:  # a faust timer that raises crashes the worker; a gauge can wait a second
            publish_gauges(res, state, now_mono=time.monotonic())
        except Exception:
            log.exception("gauges not published this tick")
        ticks["n"] += 1
        store = res.store
        if store is not None and ticks["n"] % 30 == 1:
            try:
                res.metrics.cache_size.set(await store.count())
            except DependencyUnavailable:
                log.debug("bank size not refreshed: vector store unavailable")
