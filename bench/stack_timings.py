"""Local-stack timings behind docs/local-stack.md: broker start, Milvus server vs Lite, search and insert.

    python -m bench.stack_timings                          # 1k and 20k rows, 300 queries (about 6 min)
    python -m bench.stack_timings --sizes 1000 --queries 100 --backends lite
    python -m bench.stack_timings --out bench/results/stack-timings.json

What it measures, each through the real adapters (``MilvusExampleStore``, ``TansuBroker``):

1. broker: ``TansuBroker.start()`` (port open and a metadata request answered) and ``stop()``;
2. open: ``MilvusServer.start()`` (the embedded 2.3.5 server in its child) against opening Milvus
   Lite (``ensure_collection()`` on a new ``.db`` file, which starts Lite's in-process gRPC server);
3. per back-end and size: upsert throughput (batches of 500 rows: 384-d unit vectors, about 300 bytes
   of text), then ``search`` latency p50/p99 of one query (limit 20, tenant filter, ``Session``
   consistency, every field returned, as the prepare stage asks), with the data as the app sees it
   right after writing (server: growing segments; Lite: its in-memory memtable, flushed only past
   128 MiB) and again after ``flush`` (server: and the HNSW build; Lite: segment files + index);
4. client: the same searches through ``AsyncMilvusClient`` (what the store uses) and through the sync
   ``MilvusClient`` in ``asyncio.to_thread``, one at a time and 8 at once.

Vectors: 64 random centres, rows are noisy copies (cosine about 0.8 to their centre), queries are
fresh noisy copies, so neighbourhoods look like real paraphrase clusters rather than uniform noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.hostfacts import host_facts, loadavg, metadata
from bench.stats import percentile
from devstack.localstack import MilvusServer, TansuBroker, free_port
from infra.milvus import MilvusExampleStore
from infra.protocols import Example
from infra.settings import MilvusSettings

__all__ = ["bench_backend", "bench_broker", "main", "percentiles"]

DIM = 384
TENANT = "bench"


def clustered(n: int, rng: np.random.Generator, centres: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    picks = centres[rng.integers(0, len(centres), n)]
    noisy = picks + rng.normal(0, 0.75 / np.sqrt(DIM), (n, DIM)).astype(np.float32)
    out: npt.NDArray[np.float32] = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(1000 * percentile(samples, 50, method="nearest"), 2),
        "p99_ms": round(1000 * percentile(samples, 99, method="nearest"), 2),
        "mean_ms": round(1000 * statistics.fmean(samples), 2),
    }


async def timed(calls: list[Callable[[], Awaitable[Any]]], concurrency: int = 1) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(calls)

    async def worker() -> None:
        while queue:
            call = queue.pop()
            began = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - began


async def bench_broker(tmp: Path, runs: int = 5) -> dict[str, Any]:
    starts, stops = [], []
    for i in range(runs):
        broker = TansuBroker(port=free_port(), log_path=tmp / f"tansu-{i}.log")
        began = time.perf_counter()
        await broker.start()
        starts.append(time.perf_counter() - began)
        began = time.perf_counter()
        await broker.stop()
        stops.append(time.perf_counter() - began)
    return {"start_s": [round(s, 3) for s in starts], "stop_s": [round(s, 3) for s in stops]}


async def fill(store: MilvusExampleStore, vectors: npt.NDArray[np.float32], start: int) -> float:
    """Upsert rows start.. with these vectors; returns rows per second."""
    began = time.perf_counter()
    for offset in range(0, len(vectors), 500):
        batch = [
            Example(
                example_id=f"e{start + offset + i:08d}",
                tenant=TENANT,
                request=f"how do I do task {start + offset + i} with the product? " * 2,
                response="Open the settings page, choose the option and confirm. " * 4,
                embedding=v,
                quality=0.8,
            )
            for i, v in enumerate(vectors[offset : offset + 500])
        ]
        await store.upsert(batch)
    return len(vectors) / (time.perf_counter() - began)


async def search_latency(
    store: MilvusExampleStore, queries: npt.NDArray[np.float32], concurrency: int = 1
) -> dict[str, Any]:
    def call(q: npt.NDArray[np.float32]) -> Callable[[], Awaitable[Any]]:
        return lambda: store.search(TENANT, q[None, :], limit=20)

    calls = [call(q) for q in queries]
    await timed(calls[:10])  # warm-up
    latencies, wall = await timed(calls, concurrency)
    return percentiles(latencies) | {"qps": round(len(calls) / wall, 1), "concurrency": concurrency}


async def client_comparison(store: MilvusExampleStore, queries: npt.NDArray[np.float32]) -> dict[str, Any]:
    """The same search through the async client and through the sync client in a thread."""
    from infra.milvus_schema import ALL_FIELDS, search_params, tenant_filter

    caps = store.capabilities
    assert caps is not None and store._async is not None and store._sync is not None
    async_client, sync_client = store._async, store._sync
    kwargs: dict[str, Any] = {
        "anns_field": "embedding",
        "filter": tenant_filter(TENANT) + " and usable == true",
        "limit": 20,
        "output_fields": ALL_FIELDS,
        "search_params": search_params(caps.index_type, 20),
        "consistency_level": "Session",
    }

    def via_async(q: npt.NDArray[np.float32]) -> Callable[[], Awaitable[Any]]:
        return lambda: async_client.search(store.collection, data=[q.tolist()], **kwargs)

    def via_thread(q: npt.NDArray[np.float32]) -> Callable[[], Awaitable[Any]]:
        return lambda: asyncio.to_thread(sync_client.search, store.collection, data=[q.tolist()], **kwargs)

    out: dict[str, Any] = {}
    for name, make in (("async", via_async), ("sync_in_thread", via_thread)):
        calls = [make(q) for q in queries]
        await timed(calls[:10])
        for concurrency in (1, 8):
            latencies, wall = await timed(calls, concurrency)
            out[f"{name}_c{concurrency}"] = percentiles(latencies) | {"qps": round(len(calls) / wall, 1)}
    return out


async def wait_for_index(store: MilvusExampleStore, rows: int, timeout_s: float = 300) -> float:
    client = store._sync
    assert client is not None
    began = time.perf_counter()
    await asyncio.to_thread(client.flush, store.collection)
    while store.backend == "server" and time.perf_counter() - began < timeout_s:
        indexes = await asyncio.to_thread(client.list_indexes, store.collection)
        info = await asyncio.to_thread(client.describe_index, store.collection, indexes[0])
        if int(info.get("indexed_rows", 0)) >= rows:
            break
        await asyncio.sleep(1)
    return time.perf_counter() - began


async def bench_backend(
    name: str, uri: str, index_type: str, sizes: list[int], n_queries: int, rng: np.random.Generator
) -> dict[str, Any]:
    settings = MilvusSettings(uri=uri, dimension=DIM, collection=f"bench_{name.replace('-', '_')}",
                              index_type=index_type)  # fmt: skip
    centres = clustered(64, rng, np.eye(DIM, dtype=np.float32)[rng.integers(0, DIM, 64)])
    result: dict[str, Any] = {"uri": uri}
    began = time.perf_counter()
    store = MilvusExampleStore(settings)
    await store.drop()
    await store.ensure_collection()
    result["open_s"] = round(time.perf_counter() - began, 3)
    result["capabilities"] = str(store.capabilities)
    try:
        have = 0
        for size in sorted(sizes):
            rate = await fill(store, clustered(size - have, rng, centres), have)
            have = size
            queries = clustered(n_queries, rng, centres)
            entry: dict[str, Any] = {"upsert_rows_per_s": round(rate, 1)}
            entry["search_fresh"] = await search_latency(store, queries)
            entry["search_fresh_c8"] = await search_latency(store, queries, concurrency=8)
            entry["flush_and_index_s"] = round(await wait_for_index(store, size), 1)
            entry["search_flushed"] = await search_latency(store, queries)
            entry["clients"] = await client_comparison(store, queries[: max(50, n_queries // 2)])
            result[str(size)] = entry
            print(f"{name} {size}: {json.dumps(entry)}", flush=True)
    finally:
        await store.drop()
        await store.aclose()
    return result


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    tmp = Path(tempfile.mkdtemp(prefix="stack-timings-"))
    command = shlex.join(["python", "-m", "bench.stack_timings", *args.argv])
    report: dict[str, Any] = {
        **metadata("stack-timings", command=command, started_at=time.time(), wall_s=None),
        "machine": host_facts(loadavg_start=loadavg()),
    }
    began = time.perf_counter()
    report["broker"] = await bench_broker(tmp)
    print(f"broker: {report['broker']}", flush=True)
    lite_open = time.perf_counter()
    lite = MilvusExampleStore(MilvusSettings(uri=str(tmp / "open.db"), dimension=DIM, collection="open"))
    await lite.ensure_collection()
    report["lite_open_new_s"] = round(time.perf_counter() - lite_open, 3)
    await lite.aclose()
    for backend in args.backends:
        if backend == "server":
            server = MilvusServer(data_dir=tmp / "milvus", port=free_port())
            began = time.perf_counter()
            await server.start()
            report["server_start_s"] = round(time.perf_counter() - began, 2)
            print(f"server started in {report['server_start_s']} s", flush=True)
            try:
                report["server-HNSW"] = await bench_backend(
                    "server-HNSW", server.uri, "HNSW", args.sizes, args.queries, rng
                )
            finally:
                await server.stop()
        elif backend == "lite":
            report["lite-AUTOINDEX"] = await bench_backend(
                "lite-AUTOINDEX", str(tmp / "bench.db"), "HNSW", args.sizes, args.queries, rng
            )
        elif backend == "lite-flat":
            report["lite-FLAT"] = await bench_backend(
                "lite-FLAT", str(tmp / "bench-flat.db"), "FLAT", args.sizes, args.queries, rng
            )
    report["wall_s"] = round(time.perf_counter() - began, 1)
    report["machine"]["loadavg_end"] = loadavg()
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.stack_timings", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--backends", nargs="+", default=["server", "lite", "lite-flat"],
                        choices=["server", "lite", "lite-flat"])  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args()
    arguments.argv = sys.argv[1:]
    results = asyncio.run(main(arguments))
    text = json.dumps(results, indent=2)
    if arguments.out:
        arguments.out.write_text(text + "\n")
    print(text)
