"""Background timer, ``maintenance``: eviction under a byte budget per tenant, and cache gauges.

Every ``replay.interval_s * 12`` (a minute by default): scan each tenant's examples, evict those past
their TTL, then greedily by value density (decayed offloads per stored byte) until the tenant is
under ``replay.budget_bytes`` (``policy.replay.plan_eviction``), and publish the bank's size.

Error policy: Milvus unavailable -> skip this round (logged); eviction is never urgent enough to
block serving.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import faust

from agents.policy.replay import plan_eviction
from infra.errors import DependencyUnavailable
from infra.protocols import Example
from infra.resources import Resources
from streams.topology import Topics

from .state import DecisionState

__all__ = ["evict_once", "register_maintenance"]

log = logging.getLogger(__name__)


async def evict_once(res: Resources, *, now: float) -> int:
    store, s = res.store, res.settings.replay
    if store is None:
        return 0
    by_tenant: dict[str, list[Example]] = defaultdict(list)
    for ex in await store.scan(with_embeddings=False):  # eviction needs no vectors (most of the bytes)
        by_tenant[ex.tenant].append(ex)
    evicted = 0
    total_bytes = 0
    for tenant, examples in by_tenant.items():
        victims = plan_eviction(
            examples,
            budget_bytes=s.budget_bytes,
            now=now,
            ttl_s=s.ttl_s,
            decay_per_hour=s.value_decay_per_hour,
        )
        if victims:
            await store.delete(tenant, victims)
            evicted += len(victims)
        gone = set(victims)
        total_bytes += sum(e.stored_bytes for e in examples if e.example_id not in gone)
    res.metrics.cache_size.set(sum(len(v) for v in by_tenant.values()) - evicted)
    res.metrics.cache_bytes.set(total_bytes)
    if evicted:
        res.metrics.evicted.labels("budget_or_ttl").inc(evicted)
    return evicted


def register_maintenance(app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
    @app.timer(res.settings.replay.interval_s * 12, name="echolm.maintenance")  # type: ignore[untyped-decorator]
    async def maintenance() -> None:
        if not res.ready.is_set():
            return
        try:
            evicted = await evict_once(res, now=time.time())
        except DependencyUnavailable:
            log.warning("maintenance skipped: vector store unavailable", exc_info=True)
            return
        except Exception:  # a faust timer that raises crashes the worker; eviction can wait a tick
            log.exception("maintenance tick failed; serving is unaffected, the next tick retries")
            return
        if evicted:
            log.info("evicted %d examples", evicted)
