"""``CachedEmbedder`` (exact-repeat LRU) on a fake model, and the torch thread sizing. No torch load."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from infra.embedding import CachedEmbedder, auto_torch_threads, cache_key, torch_threads
from infra.protocols import Embedder, Vector
from infra.settings import EmbeddingSettings
from tests.fakes.embedder import FakeEmbedder


class FailingEmbedder(FakeEmbedder):
    async def embed(self, texts: Sequence[str]) -> Vector:
        raise RuntimeError("model crashed")


def _cached(size: int = 8) -> tuple[CachedEmbedder, FakeEmbedder]:
    model = FakeEmbedder(dimension=16)
    return CachedEmbedder(model, size), model


# -------------------------------------------------------------------------------------------- cache
async def test_implements_the_embedder_protocol() -> None:
    cached, _ = _cached()
    assert isinstance(cached, Embedder)
    assert cached.dimension == 16


async def test_a_repeat_is_a_hit_and_skips_the_model() -> None:
    cached, model = _cached()
    first = await cached.embed(["reset my password"])
    again = await cached.embed(["reset my password"])
    assert model.calls == [["reset my password"]]
    np.testing.assert_array_equal(first, again)
    assert (cached.hits, cached.misses) == (1, 1)


async def test_only_misses_go_to_the_model_and_output_order_is_kept() -> None:
    cached, model = _cached()
    await cached.embed(["b", "d"])
    texts = ["a", "b", "c", "d", "e"]
    out = await cached.embed(texts)
    assert model.calls[-1] == ["a", "c", "e"]
    np.testing.assert_allclose(out, await FakeEmbedder(dimension=16).embed(texts), atol=1e-7)
    assert out.dtype == np.float32
    assert out.shape == (5, 16)
    assert out.flags.c_contiguous
    assert (cached.hits, cached.misses) == (2, 5)


async def test_duplicates_in_one_batch_are_encoded_once() -> None:
    cached, model = _cached()
    out = await cached.embed(["x", "y", "x", "x", "y"])
    assert model.calls == [["x", "y"]]
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(out[0], out[3])
    np.testing.assert_array_equal(out[1], out[4])
    assert (cached.hits, cached.misses) == (3, 2)


async def test_whitespace_variants_share_an_entry() -> None:
    cached, model = _cached()
    await cached.embed(["reset  my\tpassword\n"])
    await cached.embed([" reset my password"])
    assert len(model.calls) == 1
    assert cache_key("  a \r\n b\t") == "a b"
    assert cache_key("Case Kept") != cache_key("case kept")
    assert cache_key("a\x0bb") != cache_key("a b")  # deleted, not spaced, by BERT's normaliser


async def test_lru_evicts_the_least_recently_used() -> None:
    cached, model = _cached(size=2)
    await cached.embed(["a", "b"])
    await cached.embed(["a"])  # a is now the most recent
    await cached.embed(["c"])  # evicts b
    assert len(cached) == 2
    model.calls.clear()
    await cached.embed(["a", "c"])
    assert model.calls == []
    await cached.embed(["b"])
    assert model.calls == [["b"]]


async def test_a_batch_larger_than_the_cache_keeps_its_last_entries() -> None:
    cached, model = _cached(size=2)
    out = await cached.embed(["a", "b", "c"])
    assert out.shape == (3, 16)
    assert len(cached) == 2
    model.calls.clear()
    await cached.embed(["b", "c"])
    assert model.calls == []


async def test_size_zero_passes_everything_through() -> None:
    cached, model = _cached(size=0)
    await cached.embed(["a", "a"])
    await cached.embed(["a"])
    assert model.calls == [["a", "a"], ["a"]]
    assert (cached.hits, cached.misses, len(cached)) == (0, 0, 0)


async def test_cached_vectors_are_not_shared_with_callers() -> None:
    cached, _ = _cached()
    out = await cached.embed(["a"])
    expected = out.copy()
    out[:] = 0.0
    np.testing.assert_array_equal(await cached.embed(["a"]), expected)


async def test_a_failed_model_call_caches_nothing() -> None:
    cached = CachedEmbedder(FailingEmbedder(dimension=16), 8)
    with pytest.raises(RuntimeError, match="model crashed"):
        await cached.embed(["a"])
    assert (cached.hits, cached.misses, len(cached)) == (0, 0, 0)


async def test_empty_input_and_a_bare_string() -> None:
    cached, _ = _cached()
    assert (await cached.embed([])).shape == (0, 16)
    with pytest.raises(TypeError):
        await cached.embed("not a list")


async def test_from_settings_and_aclose() -> None:
    model = FakeEmbedder(dimension=16)
    cached = CachedEmbedder.from_settings(model, EmbeddingSettings(cache_size=3))
    assert cached.max_entries == 3
    assert EmbeddingSettings().cache_size == 4096
    await cached.embed(["a"])
    await cached.aclose()
    assert len(cached) == 0
    assert model._closed
    with pytest.raises(ValueError):
        CachedEmbedder(model, -1)


# ------------------------------------------------------------------------------------ torch threads
@pytest.mark.parametrize(
    ("cores", "threads", "expected"),
    [(1, 1, 1), (2, 1, 1), (2, 2, 1), (4, 1, 3), (4, 2, 1), (8, 2, 3), (9, 1, 8), (64, 1, 8), (64, 4, 8)],
)
def test_auto_torch_threads(cores: int, threads: int, expected: int) -> None:
    assert auto_torch_threads(cores, threads) == expected


def test_an_explicit_torch_threads_wins() -> None:
    assert torch_threads(EmbeddingSettings(torch_threads=2), cores=2) == 2
    assert torch_threads(EmbeddingSettings(torch_threads=16), cores=64) == 16
    assert torch_threads(EmbeddingSettings(), cores=2) == 1
    assert torch_threads(EmbeddingSettings(threads=2), cores=16) == 7
    assert EmbeddingSettings().torch_threads is None


def test_cache_totals_are_exported_as_a_prometheus_counter() -> None:
    from infra.metrics import Metrics

    m = Metrics()

    def value(result: str) -> float | None:
        return m.registry.get_sample_value("echolm_embed_cache_total", {"result": result})

    m.sync_embed_cache(3, 2)
    assert (value("hit"), value("miss")) == (3.0, 2.0)
    m.sync_embed_cache(5, 2)
    assert (value("hit"), value("miss")) == (5.0, 2.0)
    m.sync_embed_cache(1, 1)  # totals never go back: a counter only moves forward
    assert (value("hit"), value("miss")) == (5.0, 2.0)
