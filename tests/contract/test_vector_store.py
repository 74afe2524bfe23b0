"""One contract for every ``VectorStore``: the in-memory fake, Milvus Lite and a Milvus server.

The real variants are marked ``integration``; ``-m "not integration"`` runs the fake alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from infra.errors import DependencyUnavailable, LimitExceeded, SchemaError
from infra.protocols import Example, VectorStore
from infra.settings import MilvusSettings
from tests.fakes.vector_store import FakeVectorStore

DIM = 16
STORES = [
    "fake",
    pytest.param("milvus-lite", marks=pytest.mark.integration),
    pytest.param("milvus-server", marks=pytest.mark.integration),
]


def unit(*weights: float) -> npt.NDArray[np.float32]:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(weights)] = weights
    return (v / np.linalg.norm(v)).astype(np.float32)


def example(
    example_id: str, tenant: str = "acme", vector: npt.NDArray[np.float32] | None = None, **kw: object
) -> Example:
    fields: dict[str, object] = {
        "request": f"question {example_id}",
        "response": f"answer {example_id}",
        "embedding": unit(1.0) if vector is None else vector,
    }
    fields.update(kw)
    return Example(example_id=example_id, tenant=tenant, **fields)  # type: ignore[arg-type]


@pytest.fixture(params=STORES)
def store_uri(request: pytest.FixtureRequest) -> str:
    """ "fake", or the URI of the real back-end (a sync fixture: it may start the session's server)."""
    if request.param == "fake":
        return "fake"
    return str(
        request.getfixturevalue("milvus_lite_uri" if request.param == "milvus-lite" else "milvus_server_uri")
    )


@pytest.fixture
async def store(store_uri: str, collection_name: str) -> AsyncIterator[VectorStore]:
    if store_uri == "fake":
        fake = FakeVectorStore(dimension=DIM)
        yield fake
        await fake.aclose()
        return
    from infra.milvus import MilvusExampleStore

    settings = MilvusSettings(uri=store_uri, dimension=DIM, collection=collection_name)
    real = MilvusExampleStore(settings)
    await real.ensure_collection()
    try:
        yield real
    finally:
        await real.aclose()  # the test may have closed it already: drop through a fresh client
        async with MilvusExampleStore(settings) as cleanup:
            await cleanup.drop()


class TestVectorStoreContract:
    async def test_upsert_then_get_round_trips_every_field(self, store: VectorStore) -> None:
        original = example(
            "e1", request="héllo wörld", response="ответ", model_tier="small", quality=0.7, gain=0.125,
            offloads=3.5, replay_rounds=2, created_at=1_700_000_000.25, updated_at=1_700_000_100.5,
            usable=False, vector=unit(0.3, 0.4, 0.5),
        )  # fmt: skip
        await store.upsert([original])
        [got] = await store.get("acme", ["e1"])
        np.testing.assert_allclose(got.embedding, original.embedding, rtol=1e-6)
        assert got.embedding.dtype == np.float32
        assert replace(got, embedding=original.embedding) == original

    async def test_search_orders_by_cosine_similarity(self, store: VectorStore) -> None:
        await store.upsert([
            example("far", vector=unit(0.0, 1.0)),
            example("near", vector=unit(1.0, 0.1)),
            example("mid", vector=unit(1.0, 1.0)),
        ])  # fmt: skip
        [hits] = await store.search("acme", unit(1.0)[None, :], limit=3)
        assert [h.example.example_id for h in hits] == ["near", "mid", "far"]
        expected = [float(unit(1.0) @ unit(1.0, 0.1)), float(unit(1.0) @ unit(1.0, 1.0)), 0.0]
        assert [h.similarity for h in hits] == pytest.approx(expected, abs=1e-4)
        [top] = await store.search("acme", unit(1.0)[None, :], limit=1)
        assert [h.example.example_id for h in top] == ["near"]

    async def test_search_answers_each_query_row(self, store: VectorStore) -> None:
        await store.upsert([example("x", vector=unit(1.0)), example("y", vector=unit(0.0, 1.0))])
        results = await store.search("acme", np.stack([unit(0.0, 1.0), unit(1.0)]), limit=1)
        assert [[h.example.example_id for h in row] for row in results] == [["y"], ["x"]]
        assert await store.search("acme", np.zeros((0, DIM), dtype=np.float32), limit=3) == []

    async def test_search_batch_answers_each_row_from_its_own_tenant(self, store: VectorStore) -> None:
        await store.upsert([
            example("a-x", tenant="a", vector=unit(1.0)),
            example("a-y", tenant="a", vector=unit(0.0, 1.0)),
            example("b-x", tenant="b", vector=unit(1.0, 0.1)),
            example("b-bad", tenant="b", vector=unit(1.0), usable=False),
        ])  # fmt: skip
        queries = np.stack([unit(1.0), unit(1.0), unit(0.0, 1.0), unit(1.0)])
        results = await store.search_batch(["a", "b", "a", "nobody"], queries, limit=5)
        assert [[h.example.example_id for h in row] for row in results] == [
            ["a-x", "a-y"],
            ["b-x"],
            ["a-y", "a-x"],
            [],
        ]
        # the same hits, scores and order as one search per row
        for tenant, row, hits in zip(["a", "b", "a", "nobody"], queries, results, strict=True):
            [alone] = await store.search(tenant, row[None, :], limit=5)
            assert [(h.example.example_id, round(h.similarity, 4)) for h in hits] == [
                (h.example.example_id, round(h.similarity, 4)) for h in alone
            ]
        [with_bad] = await store.search_batch(["b"], unit(1.0)[None, :], limit=5, include_unusable=True)
        assert [h.example.example_id for h in with_bad] == ["b-bad", "b-x"]
        assert await store.search_batch([], np.zeros((0, DIM), dtype=np.float32), limit=3) == []
        with pytest.raises(ValueError, match="one tenant per query row"):
            await store.search_batch(["a"], queries, limit=1)
        with pytest.raises(SchemaError):
            await store.search_batch(["a", ""], queries[:2], limit=1)

    async def test_near_identical_vectors_never_cross_tenants(self, store: VectorStore) -> None:
        await store.upsert([
            example("a-1", tenant="a", vector=unit(1.0, 0.001)),
            example("b-1", tenant="b", vector=unit(1.0)),
            example("b-2", tenant="b", vector=unit(1.0, 0.0001)),
        ])  # fmt: skip
        [hits_a] = await store.search("a", unit(1.0)[None, :], limit=10, include_unusable=True)
        assert [h.example.example_id for h in hits_a] == ["a-1"]
        [hits_b] = await store.search("b", unit(1.0)[None, :], limit=10)
        assert {h.example.tenant for h in hits_b} == {"b"}
        [hits_c] = await store.search("c", unit(1.0)[None, :], limit=10)
        assert hits_c == []
        assert await store.get("a", ["b-1", "b-2"]) == []

    async def test_tenant_values_are_quoted_not_interpreted(self, store: VectorStore) -> None:
        odd = 'we"ird\\tenant'
        await store.upsert([example("o-1", tenant=odd), example("v-1", tenant="victim")])
        assert [e.example_id for e in await store.get(odd, ["o-1"])] == ["o-1"]
        injected = 'x" or tenant != "'
        assert await store.get(injected, ["v-1", "o-1"]) == []
        assert await store.search(injected, unit(1.0)[None, :], limit=10) == [[]]
        assert await store.count(injected) == 0
        with pytest.raises(SchemaError):
            await store.get("bad\ntenant", ["v-1"])
        with pytest.raises(SchemaError):
            await store.search("", unit(1.0)[None, :], limit=1)

    async def test_search_skips_unusable_unless_asked(self, store: VectorStore) -> None:
        await store.upsert(
            [example("ok", vector=unit(1.0, 0.5)), example("bad", vector=unit(1.0), usable=False)]
        )
        [hits] = await store.search("acme", unit(1.0)[None, :], limit=5)
        assert [h.example.example_id for h in hits] == ["ok"]
        [hits] = await store.search("acme", unit(1.0)[None, :], limit=5, include_unusable=True)
        assert [h.example.example_id for h in hits] == ["bad", "ok"]

    async def test_a_stale_ok_search_never_returns_what_was_taken_back(self, store: VectorStore) -> None:
        """The request path's relaxed search (``stale_ok``) may miss a fresh admission, never a
        retraction: right after a delete or an upsert marking an example unusable, it is gone."""
        await store.upsert([example("keep", vector=unit(1.0, 0.5)), example("gone", vector=unit(1.0)),
                            example("bad", vector=unit(1.0, 0.1))])  # fmt: skip
        [hits] = await store.search("acme", unit(1.0)[None, :], limit=5)  # exact: all three visible now
        assert {h.example.example_id for h in hits} == {"keep", "gone", "bad"}
        for _ in range(3):  # the relaxed path sees them too once they have reached the query nodes
            [hits] = await store.search("acme", unit(1.0)[None, :], limit=5, stale_ok=True)
        await store.delete("acme", ["gone"])
        [hits] = await store.search("acme", unit(1.0)[None, :], limit=5, stale_ok=True)
        assert "gone" not in {h.example.example_id for h in hits}
        await store.upsert([example("bad", vector=unit(1.0, 0.1), usable=False)])
        [hits] = await store.search("acme", unit(1.0)[None, :], limit=5, stale_ok=True)
        assert [h.example.example_id for h in hits] == ["keep"]
        queries = np.stack([unit(1.0), unit(1.0)])
        both = await store.search_batch(["acme", "zeta"], queries, limit=5, stale_ok=True)
        assert [h.example.example_id for h in both[0]] == ["keep"] and both[1] == []

    async def test_get_keeps_the_asked_order_and_skips_missing(self, store: VectorStore) -> None:
        await store.upsert([example("g1"), example("g2"), example("g3"), example("other", tenant="zeta")])
        got = await store.get("acme", ["g3", "missing", "g1", "other", "g3"])
        assert [e.example_id for e in got] == ["g3", "g1"]
        assert await store.get("acme", []) == []

    async def test_delete_touches_only_the_tenant(self, store: VectorStore) -> None:
        await store.upsert([example("d1"), example("d2"), example("z1", tenant="zeta")])
        await store.delete("acme", ["d1", "z1", "missing"])
        await store.delete("acme", [])
        assert [e.example_id for e in await store.scan()] == ["d2", "z1"]

    async def test_upsert_with_the_same_id_overwrites(self, store: VectorStore) -> None:
        await store.upsert([example("u1", quality=0.1), example("u2")])
        await store.upsert([example("u1", quality=0.9, response="better", vector=unit(0.0, 1.0))])
        await store.upsert([example("u2", gain=1.0), example("u2", gain=2.0)])  # last of duplicates wins
        assert await store.count("acme") == 2
        u1, u2 = await store.get("acme", ["u1", "u2"])
        assert (u1.quality, u1.response, u2.gain) == (0.9, "better", 2.0)
        [hits] = await store.search("acme", unit(0.0, 1.0)[None, :], limit=1)
        assert hits[0].example.example_id == "u1"
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-4)

    async def test_scan_pages_through_everything_in_id_order(self, store: VectorStore) -> None:
        ids = [f"s{i:02d}" for i in (5, 3, 9, 1, 7, 2, 8)]
        await store.upsert([example(i, vector=unit(1.0, float(n))) for n, i in enumerate(ids)])
        await store.upsert([example("q1", tenant="zeta"), example("q0", tenant="zeta", usable=False)])
        scanned = await store.scan("acme", batch_size=3)
        assert [e.example_id for e in scanned] == sorted(ids)
        assert [e.example_id for e in await store.scan(batch_size=2)] == sorted([*ids, "q0", "q1"])
        assert await store.scan("nobody") == []

    async def test_scan_without_embeddings_keeps_everything_else(self, store: VectorStore) -> None:
        originals = [
            example("w1", quality=0.25, vector=unit(0.3, 0.4)),
            example("w2", usable=False, gain=2.0),
        ]
        await store.upsert(originals)
        light = await store.scan("acme", with_embeddings=False)
        assert [e.embedding.shape for e in light] == [(0,), (0,)]
        assert [replace(e, embedding=o.embedding) for e, o in zip(light, originals, strict=True)] == originals
        full = await store.scan("acme")
        np.testing.assert_allclose(full[0].embedding, originals[0].embedding, rtol=1e-6)

    async def test_count(self, store: VectorStore) -> None:
        assert await store.count() == 0
        await store.upsert([example("c1"), example("c2", usable=False), example("c3", tenant="zeta")])
        assert (await store.count(), await store.count("acme"), await store.count("zeta")) == (3, 2, 1)

    async def test_text_over_the_limit_is_refused(self, store: VectorStore) -> None:
        with pytest.raises(LimitExceeded, match="request"):
            await store.upsert([example("long", request="é" * 8193)])  # 16386 bytes of UTF-8
        with pytest.raises(LimitExceeded, match="response"):
            await store.upsert([example("long", response="x" * (32 * 1024 + 1))])
        await store.upsert([example("fits", request="x" * 16 * 1024, response="y" * 32 * 1024)])
        assert [e.example_id for e in await store.scan()] == ["fits"]

    async def test_wrong_dimension_is_a_configuration_error(self, store: VectorStore) -> None:
        with pytest.raises(ValueError, match=r"dimension|shape|-d"):
            await store.upsert([example("w", vector=np.ones(DIM + 1, dtype=np.float32))])
        with pytest.raises(ValueError, match="shape"):
            await store.search("acme", np.ones((1, DIM - 1), dtype=np.float32), limit=1)

    async def test_closed_store_raises_dependency_unavailable(self, store: VectorStore) -> None:
        await store.aclose()
        await store.aclose()  # idempotent
        with pytest.raises(DependencyUnavailable):
            await store.count()


@pytest.mark.integration
async def test_lite_and_server_capabilities(
    milvus_lite_uri: str, milvus_server_uri: str, collection_name: str
) -> None:
    from infra.milvus import MilvusExampleStore

    for uri, backend, partition_key in (
        (milvus_lite_uri, "lite", True),
        (milvus_server_uri, "server", False),
    ):
        async with MilvusExampleStore(
            MilvusSettings(uri=uri, dimension=DIM, collection=collection_name)
        ) as store:
            await store.ensure_collection()  # idempotent
            caps = store.capabilities
            assert caps is not None and caps.backend == backend
            # The embedded server is 2.3.5: upsert mis-routes partition-key rows, so tenant is a plain field.
            assert caps.partition_key is partition_key or not caps.server_version.startswith("v2.3")
            await store.drop()


async def test_unreachable_server_raises_dependency_unavailable(collection_name: str) -> None:
    from devstack.localstack import free_port
    from infra.milvus import MilvusExampleStore

    settings = MilvusSettings(uri=f"http://127.0.0.1:{free_port()}", dimension=DIM, timeout_s=1.0)
    store = MilvusExampleStore(settings, collection=collection_name)
    with pytest.raises(DependencyUnavailable, match="server is running"):
        await store.ensure_collection()
    await store.aclose()
