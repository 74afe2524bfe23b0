"""``OnnxEmbedder`` against the torch model it is exported from: the same vectors, padding that does
not leak between rows, one export reused, and the worker's factory choosing it by setting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from infra.embedding import CachedEmbedder, SentenceTransformerEmbedder
from infra.embedding_onnx import OnnxEmbedder
from infra.resources import default_factories
from infra.settings import EmbeddingSettings, Settings

pytestmark = pytest.mark.integration

TEXTS = [
    "How do I reset my password?",
    "Why can't I export the billing address from the mobile app after the last update? I tried twice.",
    "ok",
    "Wie kann ich mein Abonnement kündigen, ohne meine Daten zu verlieren?",
    "refund " * 300,  # longer than max_seq_length: truncated alike by both
]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
async def onnx(onnx_dir: Path) -> AsyncIterator[OnnxEmbedder]:
    async with OnnxEmbedder(EmbeddingSettings(onnx_dir=onnx_dir, cache_size=0)) as embedder:
        yield embedder


async def test_onnx_vectors_match_the_torch_model(onnx: OnnxEmbedder) -> None:
    async with SentenceTransformerEmbedder(EmbeddingSettings(cache_size=0)) as torch_model:
        reference = await torch_model.embed(TEXTS)
    got = await onnx.embed(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(got * reference, axis=1)
    assert cosine.min() > 0.9999, cosine


async def test_padding_does_not_change_a_row(onnx: OnnxEmbedder) -> None:
    batched = await onnx.embed(TEXTS)
    alone = np.vstack([await onnx.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, alone, atol=2e-5)
    assert (await onnx.embed([])).shape == (0, 384)
    with pytest.raises(TypeError):
        await onnx.embed("one string")  # type: ignore[arg-type]


async def test_a_second_embedder_reuses_the_export(onnx: OnnxEmbedder, onnx_dir: Path) -> None:
    assert onnx.onnx_path is not None and onnx.onnx_path.parent == onnx_dir
    written = onnx.onnx_path.stat().st_mtime_ns
    async with OnnxEmbedder(EmbeddingSettings(onnx_dir=onnx_dir)) as again:
        assert again.onnx_path == onnx.onnx_path
    assert onnx.onnx_path.stat().st_mtime_ns == written
    left = await asyncio.to_thread(lambda: [p.name for p in onnx_dir.iterdir()])
    assert left == [onnx.onnx_path.name]  # no partial file left


async def test_the_worker_factory_picks_onnx_by_setting(onnx_dir: Path) -> None:
    settings = Settings(embedding=EmbeddingSettings(backend="onnx", onnx_dir=onnx_dir))
    embedder = await default_factories().embedder(settings)
    try:
        assert isinstance(embedder, CachedEmbedder) and isinstance(embedder.inner, OnnxEmbedder)
        assert (await embedder.embed(["hello"])).shape == (1, 384)
    finally:
        await embedder.aclose()
