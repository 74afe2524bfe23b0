"""The bank: N examples written to Milvus (real MiniLM rows plus perturbed copies), then the index wait."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.overhead.config import Preset
from bench.overhead.workload import bank_example, question
from infra.embedding import SentenceTransformerEmbedder
from infra.milvus import MilvusExampleStore
from infra.protocols import Example
from infra.settings import Settings

__all__ = ["preload", "wait_for_index"]


async def preload(
    settings: Settings, embedder: SentenceTransformerEmbedder, preset: Preset, rng: np.random.Generator
) -> tuple[np.ndarray, list[Example], dict[str, float]]:
    """Write the bank; returns the real vectors, the real-text examples and timings (s)."""
    tenant, now = "bench", time.time()
    texts = list(dict.fromkeys(question(rng) for _ in range(preset.real * 3)))[: preset.real]
    began = time.perf_counter()
    real = np.vstack([await embedder.embed(texts[i : i + 256]) for i in range(0, len(texts), 256)])
    embed_s = time.perf_counter() - began
    base = [bank_example(tenant, t, v, rng, now) for t, v in zip(texts, real, strict=True)]
    store = MilvusExampleStore(settings.milvus)
    began = time.perf_counter()
    with tqdm(total=preset.examples, desc="bank upsert", unit="ex") as bar:
        async with store:
            await store.upsert(base)
            bar.update(len(base))
            written = len(base)
            while written < preset.examples:
                n = min(2_000, preset.examples - written)
                src = rng.integers(len(texts), size=n)
                cos = rng.uniform(0.6, 0.95, size=n)
                noise = rng.standard_normal((n, real.shape[1])).astype(np.float32)
                noise /= np.linalg.norm(noise, axis=1, keepdims=True)
                radius = np.sqrt(1 / cos**2 - 1)[:, None].astype(np.float32)
                vectors = real[src] + radius * noise  # unit + orthogonal-ish noise of that norm
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                batch = [
                    bank_example(tenant, f"{texts[s]} (case {written + i})", vectors[i], rng, now)
                    for i, s in enumerate(src)
                ]
                await store.upsert(batch)
                written += n
                bar.update(n)
    upsert_s = time.perf_counter() - began
    return real, base, {"embed_s": embed_s, "upsert_s": upsert_s}


def wait_for_index(settings: Settings, rows: int, timeout_s: float) -> dict[str, Any]:
    """Flush, then poll the HNSW build (blocking; run in a thread). Reports, never raises on timeout."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=settings.milvus.uri, timeout=60)
    name = settings.milvus.collection
    began = time.perf_counter()
    try:
        client.flush(name)
        flush_s = time.perf_counter() - began
        index = client.list_indexes(name)[0]
        info: dict[str, Any] = {}
        with tqdm(total=rows, desc="HNSW build", unit="row") as bar:
            while time.perf_counter() - began < timeout_s:
                info = client.describe_index(name, index_name=index)
                indexed = int(info.get("indexed_rows", 0))
                bar.update(indexed - bar.n)
                if indexed >= rows and int(info.get("pending_index_rows", 0)) == 0:
                    break
                time.sleep(1.0)
        return {
            "flush_s": flush_s,
            "wait_s": time.perf_counter() - began,
            "indexed_rows": int(info.get("indexed_rows", 0)),
            "total_rows": int(info.get("total_rows", rows)),
            "complete": int(info.get("indexed_rows", 0)) >= rows,
            "state": str(info.get("state", "")),
        }
    finally:
        client.close()
