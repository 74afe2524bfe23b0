"""``agents.maintenance.evict_once``: TTL and per-tenant byte budgets over ``FakeVectorStore``, and
the cache gauges it publishes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from agents.maintenance import evict_once
from infra.errors import DependencyUnavailable
from infra.protocols import Example
from infra.resources import Resources
from infra.settings import load_settings
from tests.fakes.backends import agent_harness, fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore

DIM = 384
NOW = 1_700_000_000.0
HOUR = 3600.0
BUDGET = 2048  # bytes of request + response text per tenant
EMBEDDER = FakeEmbedder(DIM)


@asynccontextmanager
async def worker(store: FakeVectorStore | None) -> AsyncIterator[Resources]:
    settings = load_settings(
        kafka={"topic_prefix": "unit"}, replay={"budget_bytes": BUDGET, "ttl_s": 24 * HOUR}
    )
    async with agent_harness(settings, fake_factories(embedder=FakeEmbedder(DIM), store=store)) as harness:
        yield harness.resources


async def example(
    name: str, *, tenant: str = "acme", size: int = 500, age_h: float = 1.0, offloads: float = 0.0
) -> Example:
    request = f"question {name}"
    (vector,) = await EMBEDDER.embed([request])
    return Example(
        example_id=f"{tenant}-{name}",
        tenant=tenant,
        request=request,
        response="x" * (size - len(request.encode())),
        embedding=vector,
        offloads=offloads,
        created_at=NOW - age_h * HOUR,
        updated_at=NOW - age_h * HOUR,
    )


async def ids(store: FakeVectorStore, tenant: str | None = None) -> set[str]:
    return {e.example_id for e in await store.scan(tenant)}


def gauge(res: Resources, name: str) -> float | None:
    return res.metrics.registry.get_sample_value(name)


async def test_expired_examples_are_evicted_even_under_budget() -> None:
    store = FakeVectorStore(DIM)
    await store.upsert([await example("old", age_h=25), await example("new", age_h=1)])
    async with worker(store) as res:
        assert await evict_once(res, now=NOW) == 1
        assert await ids(store) == {"acme-new"}
        assert gauge(res, "echolm_cache_examples") == 1
        assert gauge(res, "echolm_cache_bytes") == 500
        assert (
            res.metrics.registry.get_sample_value(
                "echolm_examples_evicted_total", {"reason": "budget_or_ttl"}
            )
            == 1
        )


async def test_over_budget_the_least_valuable_per_byte_go_first() -> None:
    store = FakeVectorStore(DIM)
    await store.upsert(
        [
            await example("useful", offloads=5.0),
            await example("some-use", offloads=1.0),
            await example("unused-a"),
            await example("unused-b", age_h=2),
            await example("unused-c", age_h=3),
        ]
    )  # 2500 bytes against a 2048-byte budget: one 500-byte example must go
    async with worker(store) as res:
        assert await evict_once(res, now=NOW) == 1
        left = await ids(store)
        assert {"acme-useful", "acme-some-use"} <= left
        assert "acme-unused-c" not in left  # of the worthless ones, the oldest goes
        assert gauge(res, "echolm_cache_bytes") == 2000


async def test_budgets_are_per_tenant() -> None:
    store = FakeVectorStore(DIM)
    crowded = [await example(f"a{i}", tenant="acme", age_h=i + 1) for i in range(5)]
    quiet = [await example(f"g{i}", tenant="globex") for i in range(2)]
    await store.upsert(crowded + quiet)
    async with worker(store) as res:
        assert await evict_once(res, now=NOW) == 1
        assert len(await ids(store, "acme")) == 4
        assert await ids(store, "globex") == {"globex-g0", "globex-g1"}
        assert gauge(res, "echolm_cache_examples") == 6


async def test_a_bank_within_budget_is_left_alone() -> None:
    store = FakeVectorStore(DIM)
    await store.upsert([await example("a"), await example("b")])
    async with worker(store) as res:
        assert await evict_once(res, now=NOW) == 0
        assert store.calls["delete"] == 0
        assert gauge(res, "echolm_cache_examples") == 2


async def test_without_a_store_nothing_happens() -> None:
    async with worker(None) as res:
        assert await evict_once(res, now=NOW) == 0


async def test_a_store_that_fails_mid_round_raises_for_the_timer_to_skip_it() -> None:
    store = FakeVectorStore(DIM)
    async with worker(store) as res:
        store.unavailable = True
        with pytest.raises(DependencyUnavailable):
            await evict_once(res, now=NOW)
