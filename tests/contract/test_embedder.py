"""One contract for every ``Embedder``: the hashing fake and all-MiniLM-L6-v2 (marked ``integration``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from infra.errors import DependencyUnavailable
from infra.protocols import Embedder
from infra.settings import EmbeddingSettings
from tests.fakes.embedder import FakeEmbedder

TEXTS = ["How do I reset my password?", "The weather in Paris is sunny today.", "", "naïve café ☕"]


@pytest.fixture(scope="session")
async def real_embedder() -> AsyncIterator[Embedder]:
    from infra.embedding import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(EmbeddingSettings())
    await embedder.warmup()  # about 7 s: torch import and model load, in a thread
    yield embedder
    await embedder.aclose()


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.integration)])
def embedder(request: pytest.FixtureRequest) -> Embedder:
    if request.param == "fake":
        return FakeEmbedder()
    real: Embedder = request.getfixturevalue("real_embedder")
    return real


class TestEmbedderContract:
    async def test_shape_dtype_and_unit_norm(self, embedder: Embedder) -> None:
        vectors = await embedder.embed(TEXTS)
        assert embedder.dimension == 384
        assert vectors.shape == (len(TEXTS), 384)
        assert vectors.dtype == np.float32
        assert vectors.flags.c_contiguous
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    async def test_deterministic_within_and_across_calls(self, embedder: Embedder) -> None:
        first = await embedder.embed(["same text", "other", "same text"])
        again = await embedder.embed(["same text"])
        np.testing.assert_allclose(first[0], first[2], atol=1e-6)
        np.testing.assert_allclose(first[0], again[0], atol=1e-5)

    async def test_a_paraphrase_is_closer_than_an_unrelated_sentence(self, embedder: Embedder) -> None:
        question, paraphrase, unrelated = await embedder.embed([
            "How do I reset my password?",
            "I forgot my password, how can I reset it?",
            "The stock market closed higher on Friday.",
        ])  # fmt: skip
        assert float(question @ paraphrase) > float(question @ unrelated) + 0.2

    async def test_empty_batch_and_bad_input(self, embedder: Embedder) -> None:
        empty = await embedder.embed([])
        assert empty.shape == (0, 384)
        assert empty.dtype == np.float32
        with pytest.raises(TypeError):
            await embedder.embed("not a list")


@pytest.mark.integration
async def test_real_embedder_does_not_block_the_loop(real_embedder: Embedder) -> None:
    texts = [f"sentence number {i} about booking a flight to Lisbon" for i in range(128)]
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    try:
        await real_embedder.embed(texts)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(gaps) >= 3, "the loop did not run while encode() was busy"
    assert max(gaps) < 1.0  # one blocking encode of 128 sentences would stall it for seconds


@pytest.mark.integration
async def test_real_embedder_close_is_idempotent_and_final() -> None:
    from infra.embedding import SentenceTransformerEmbedder

    async with SentenceTransformerEmbedder(EmbeddingSettings(batch_size=2)) as embedder:
        assert (await embedder.embed(["a", "b", "c"])).shape == (3, 384)  # several batches
    await embedder.aclose()
    with pytest.raises(DependencyUnavailable, match="closed"):
        await embedder.embed(["after close"])
