"""The pipeline's own overhead per stage, generation excluded, on the real local stack (issues 2 and 3).

    python -m bench.overhead                       # preset small: 10k examples, under 5 min on 2 cores
    python -m bench.overhead --preset full         # 100k examples (HNSW build included)
    python -m bench.overhead --set kafka.producer_max_batch_size=16384 --set embedding.batch_window_s=0.01

What runs: a Tansu broker, the embedded Milvus server, two dev TGI servers on the *emulated* engine
with every service time at 0 (they answer at once: what is left is HTTP and chat rendering), and one
``echolm worker`` subprocess (real MiniLM, real agents, ``worker.role=all``). The bench process is
the client (``EchoClient``) and shares the machine's cores with all of them.

Phases, in order (each bounded):

1. bank: N examples for one tenant written with ``MilvusExampleStore.upsert``. ``--real`` of them carry
   real MiniLM embeddings of generated support questions; the others are those vectors plus Gaussian
   noise (cosine 0.6-0.95 to their source), re-normalised, so searches see clustered, real-shaped
   neighbourhoods instead of random vectors. Then flush and wait for the HNSW index (or report that
   it did not finish);
2. micro (no worker running): ``select_examples`` on 20 hits found by exact cosine in that bank, and
   ``context_features`` + ``LinUCBBandit.expected`` + ``choose_backend``, many iterations each;
   MiniLM at batch 1 against batched (per sentence);
3. direct baseline: ``TGIGenerator.generate`` straight to the emulated backend at the steady rate
   (client -> backend, no echolm), with the message shape the pipeline sends (system + 5 examples + question);
4. pipeline: warm-up, then a steady open-loop rate for a fixed time (per-stage p50/p99 from the
   replies' ``timings_ms``, client end-to-end latency, ``echolm_stage_seconds`` deltas as a cross-check
   and for ``emit``, which replies do not carry), then a saturation burst (max replies/s).

Embed batch sizes are inferred from the replies: requests of one ``prepare`` batch carry the same
parse/embed/retrieve timings. Results: ``bench/results/overhead-<preset>.json`` and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from agents.policy.prompt import build_messages
from agents.policy.retrieval import Selected, SelectionResult, UtilityModel, select_examples
from agents.policy.routing import BackendView, LinUCBBandit, choose_backend, context_features
from devstack.localstack import LocalStack, create_topics, free_port
from devstack.workers import WorkerProcess
from echolm.client import EchoClient, Reply
from infra.embedding import SentenceTransformerEmbedder
from infra.milvus import MilvusExampleStore
from infra.protocols import Example, GenerationParams, QueueDepth, SearchHit
from infra.settings import Settings, load_settings, parse_overrides
from infra.tgi import TGIGenerator
from streams.topology import topic_specs

__all__ = ["PRESETS", "Preset", "main"]

TIMING_STAGES = ("parse", "embed", "retrieve", "select", "kafka_hop", "route", "generate")
METRIC_STAGES = (*TIMING_STAGES, "emit", "total")
INSTANT_BACKEND = (
    "--prefill-ms-per-token", "0", "--decode-ms-per-token", "0", "--batch-slowdown", "0",
    "--max-batch-size", "128", "--max-concurrent-requests", "1024",
)  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Preset:
    examples: int
    real: int  # rows with a real MiniLM embedding; the rest are perturbed copies
    rate: float  # steady phase, requests/s
    duration_s: float
    saturate: int  # requests in the saturation burst
    baseline_s: float
    micro_iterations: int
    index_timeout_s: float
    saturate_window_s: float = 60.0  # how long the burst's replies are collected
    low_rate: float = 10.0  # a first steady phase at a rate the stack sustains: the latency floor
    low_duration_s: float = 15.0
    max_new_tokens: int = 16


PRESETS = {
    "small": Preset(10_000, 1_000, 50.0, 30.0, 1_500, 10.0, 3_000, 120.0),
    "full": Preset(100_000, 2_000, 50.0, 45.0, 3_000, 15.0, 10_000, 300.0, 60.0),
}

# ------------------------------------------------------------------------------------ workload text
_SUBJECTS = (
    "password", "invoice", "order", "subscription", "refund", "account", "shipping address", "credit card",
    "delivery", "warranty", "hotel booking", "flight", "prescription", "doctor's appointment",
    "insurance claim", "wifi router", "printer", "laptop battery", "email settings", "phone plan",
    "gift card", "loyalty points", "tax return", "bank transfer", "rental car", "train ticket",
    "gym membership", "cloud backup", "two-factor login", "parking permit", "library card", "utility bill",
    "home insurance", "mortgage payment", "student loan", "pension plan", "travel visa", "passport",
    "driving licence", "VPN connection",
)  # fmt: skip
_ACTIONS = (
    "reset", "change", "cancel", "track", "update", "check the status of", "get a copy of", "dispute",
    "renew", "transfer", "set up", "pay for", "report a problem with", "upgrade", "verify",
    "close", "pause", "recover", "share", "download a receipt for",
)  # fmt: skip
_OPENERS = (
    "How do I", "How can I", "What is the fastest way to", "Can you explain how to", "I need help to",
    "Is it possible to", "What are the steps to", "Please tell me how to",
)  # fmt: skip
_QUALIFIERS = (
    "", " on the mobile app", " without logging in", " from abroad", " for my business account",
    " before the deadline", " if I forgot my details", " for a family member",
)  # fmt: skip


def question(rng: np.random.Generator) -> str:
    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    return f"{pick(_OPENERS)} {pick(_ACTIONS)} my {pick(_SUBJECTS)}{pick(_QUALIFIERS)}?"


def answer(prompt: str) -> str:
    topic = prompt.rstrip("?")
    return (
        f"To handle this ({topic.lower()}): sign in, open Settings, choose the matching section and "
        "follow the steps shown. Keep your reference number; changes take effect within one business "
        "day, and support can help if anything fails."
    )


def _example(tenant: str, request: str, vector: np.ndarray, rng: np.random.Generator, now: float) -> Example:
    key = hashlib.sha256(f"{tenant}\x00{request}".encode()).hexdigest()[:32]
    age = float(rng.uniform(0, 7 * 86400))
    return Example(
        example_id=key,
        tenant=tenant,
        request=request,
        response=answer(request),
        embedding=vector.astype(np.float32),
        model_tier="large",
        quality=float(rng.uniform(0.5, 0.95)),
        offloads=float(rng.integers(0, 5)),
        created_at=now - age,
        updated_at=now - age / 2,
    )


# ------------------------------------------------------------------------------------------ statistics
def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "p50": pct(values, 50), "p99": pct(values, 99), "mean": float(np.mean(values))}


def _histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus-style quantile from cumulative (le, count) buckets, linear inside a bucket."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    rank, prev_le, prev_count = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            share = (rank - prev_count) / max(count - prev_count, 1e-12)
            return prev_le + (le - prev_le) * share
        prev_le, prev_count = le, count
    return prev_le


def scrape_stages(port: int) -> dict[str, dict[str, Any]]:
    """``echolm_stage_seconds`` per stage: cumulative buckets, sum and count."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "echolm_stage_seconds":
            continue
        for sample in family.samples:
            stage = out.setdefault(sample.labels["stage"], {"buckets": {}, "sum": 0.0, "count": 0.0})
            if sample.name.endswith("_bucket"):
                stage["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                stage["sum"] = sample.value
            elif sample.name.endswith("_count"):
                stage["count"] = sample.value
    return out


def stage_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per-stage mean/p50/p99 (ms) of what the worker observed between two scrapes."""
    out: dict[str, dict[str, float]] = {}
    for stage, now in after.items():
        then = before.get(stage, {"buckets": {}, "sum": 0.0, "count": 0.0})
        count = now["count"] - then["count"]
        if count <= 0:
            continue
        buckets = sorted((le, c - then["buckets"].get(le, 0.0)) for le, c in now["buckets"].items())
        out[stage] = {
            "n": count,
            "mean": 1000 * (now["sum"] - then["sum"]) / count,
            "p50": 1000 * _histogram_quantile(buckets, 0.5),
            "p99": 1000 * _histogram_quantile(buckets, 0.99),
        }
    return out


def analyse(replies: Sequence[Reply], elapsed_s: float) -> dict[str, Any]:
    ok = [r for r in replies if r.ok]
    stages = {s: summary([r.timings_ms[s] for r in ok if s in r.timings_ms]) for s in TIMING_STAGES}
    e2e = [r.latency_s * 1000 for r in ok]
    overhead = [r.latency_s * 1000 - r.timings_ms.get("generate", 0.0) for r in ok]
    rest = [
        r.latency_s * 1000 - sum(r.timings_ms.get(s, 0.0) for s in TIMING_STAGES) for r in ok
    ]  # client->prepare hop, batch wait, reply+log send, reply hop back
    batches = Counter(
        (r.worker, r.timings_ms.get("parse"), r.timings_ms.get("embed"), r.timings_ms.get("retrieve"))
        for r in ok
    )
    sizes = list(batches.values())
    return {
        "replies": len(replies),
        "errors": Counter(r.error_code for r in replies if not r.ok),
        "replies_per_s": len(ok) / elapsed_s if elapsed_s > 0 else float("nan"),
        "stages_ms": stages,
        "end_to_end_ms": summary(e2e),
        "overhead_ms": summary(overhead),
        "unattributed_ms": summary(rest),
        "examples_per_request": float(np.mean([r.n_examples for r in ok])) if ok else 0.0,
        "tiers": Counter(r.tier for r in ok),
        "embed_batches": {
            "count": len(sizes),
            "mean": float(np.mean(sizes)) if sizes else 0.0,
            "p50": pct(sizes, 50),
            "max": max(sizes, default=0),
            "histogram": dict(sorted(Counter(sizes).items())),
        },
    }


# ---------------------------------------------------------------------------------- CPU accounting
def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


_ROLES = (("echolm.cli", "worker"), ("/bin/milvus", "milvus"), ("devstack.localstack", "milvus"),
          ("tansu", "broker"), ("devstack.tgi_dev", "backends"))  # fmt: skip


def _role(pid: int) -> str:
    if pid == os.getpid():
        return "client"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    return next((role for marker, role in _ROLES if marker in cmdline), "other")


def cpu_snapshot() -> dict[str, Any]:
    """Machine busy CPU seconds, and CPU seconds of this process tree by role (others share the cores)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    idle = fields[3] + fields[4]
    roles: dict[str, float] = {}
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            role = _role(pid)
            roles[role] = roles.get(role, 0.0) + (int(parts[11]) + int(parts[12])) / tick  # utime+stime
    return {
        "busy_s": (sum(fields) - idle) / tick,
        "total_s": sum(fields) / tick,
        "ours_s": sum(roles.values()),
        "roles": roles,
    }


def cpu_delta(before: dict[str, Any], after: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Cores used over ``wall_s``: the whole machine, this process tree (by role) and everyone else."""
    busy = after["busy_s"] - before["busy_s"]
    ours = after["ours_s"] - before["ours_s"]
    wall = max(wall_s, 1e-9)
    roles = {r: (after["roles"].get(r, 0.0) - before["roles"].get(r, 0.0)) / wall for r in after["roles"]}
    return {
        "machine_busy_pct": 100 * busy / max(after["total_s"] - before["total_s"], 1e-9),
        "ours_cores": ours / wall,
        "others_cores": max(busy - ours, 0.0) / wall,
        "ours_by_role_cores": {r: round(v, 3) for r, v in sorted(roles.items())},
        "cores": os.cpu_count() or 1,
        "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
    }


def cpu_per_reply(cpu: dict[str, Any], wall_s: float, replies: int) -> dict[str, Any]:
    """Add CPU ms per reply (this process tree, and without the client) and the throughput that CPU
    cost would allow on ``cores`` dedicated cores: a projection, not a measurement."""
    if replies <= 0:
        return cpu
    per = {r: 1000 * c * wall_s / replies for r, c in cpu["ours_by_role_cores"].items()}
    total = sum(per.values())
    server = total - per.get("client", 0.0)
    return cpu | {
        "cpu_ms_per_reply": round(total, 3),
        "cpu_ms_per_reply_by_role": {r: round(v, 3) for r, v in per.items()},
        "projected_replies_per_s_on_all_cores_without_client": 1000 * cpu["cores"] / server
        if server
        else None,
    }


def settle(
    role: str, timeout_s: float, threshold_cores: float = 0.15, window_s: float = 3.0
) -> dict[str, float]:
    """Wait until our ``role`` processes go idle: after a bulk load Milvus compacts and re-indexes in
    the background for a while, and a run that overlaps it measures Milvus's housekeeping."""
    began = time.monotonic()
    while True:
        before = cpu_snapshot()
        time.sleep(window_s)
        used = cpu_delta(before, cpu_snapshot(), window_s)["ours_by_role_cores"].get(role, 0.0)
        if used <= threshold_cores or time.monotonic() - began >= timeout_s:
            return {"role_cores": used, "waited_s": time.monotonic() - began}


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.5, window_s: float = 5.0) -> dict[str, float]:
    """Wait (up to ``max_wait_s``) until other processes use at most ``threshold_cores`` over a window."""
    began = time.monotonic()
    with tqdm(desc="waiting for a quiet machine", unit="check", disable=max_wait_s <= 0) as bar:
        while True:
            before = cpu_snapshot()
            time.sleep(window_s)
            load = cpu_delta(before, cpu_snapshot(), window_s)
            bar.set_postfix(others=f"{load['others_cores']:.2f}")
            bar.update()
            if load["others_cores"] <= threshold_cores or time.monotonic() - began >= max_wait_s:
                return {**load, "waited_s": time.monotonic() - began}


# --------------------------------------------------------------------------------------------- phases
async def preload(
    settings: Settings, embedder: SentenceTransformerEmbedder, preset: Preset, rng: np.random.Generator
) -> tuple[np.ndarray, list[Example], dict[str, float]]:
    """Write the bank; returns the real vectors, the real-text examples and timings (s)."""
    tenant, now = "bench", time.time()
    texts = list(dict.fromkeys(question(rng) for _ in range(preset.real * 3)))[: preset.real]
    began = time.perf_counter()
    real = np.vstack([await embedder.embed(texts[i : i + 256]) for i in range(0, len(texts), 256)])
    embed_s = time.perf_counter() - began
    base = [_example(tenant, t, v, rng, now) for t, v in zip(texts, real, strict=True)]
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
                    _example(tenant, f"{texts[s]} (case {written + i})", vectors[i], rng, now)
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


def _timed_us(call: Any, iterations: int) -> dict[str, float]:
    samples = []
    for i in range(iterations):
        t0 = time.perf_counter_ns()
        call(i)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return summary(samples)


def micro(
    settings: Settings, real: np.ndarray, bank: list[Example], queries: list[tuple[str, np.ndarray]], n: int
) -> tuple[dict[str, Any], list[list[SearchHit]]]:
    """Selection and routing as pure functions (µs). Hits: exact top-20 cosine over the real rows."""
    top_k, sel, now = settings.selection.top_k, settings.selection, time.time()
    hit_sets = []
    for _, vector in queries:
        sims = real @ vector
        best = np.argsort(-sims)[:top_k]
        hit_sets.append([SearchHit(bank[j], float(sims[j])) for j in best])
    scorer = UtilityModel.default()
    results: list[SelectionResult | None] = [None] * len(queries)

    def select(i: int) -> None:
        k = i % len(queries)
        results[k] = select_examples(
            queries[k][1], queries[k][0], hit_sets[k], scorer=scorer, threshold=sel.utility_threshold,
            max_examples=sel.max_examples, min_similarity=sel.min_similarity,
            duplicate_similarity=sel.duplicate_similarity, diversity=sel.diversity, token_budget=1024,
            target_tier="small", now=now, large_tier=settings.tgi.large_tier, tenant="bench",
        )  # fmt: skip

    selection = _timed_us(select, n)
    chosen = [list(r.selected) if r is not None else [] for r in results]
    bandit = LinUCBBandit.from_settings(
        settings.tgi.backends, settings.routing, large_tier=settings.tgi.large_tier
    )
    views = tuple(BackendView.from_settings(b) for b in settings.tgi.backends)
    mono = time.monotonic()
    depths = {b.name: QueueDepth(b.name, waiting=1.0, running=2.0, at=mono) for b in views}

    def route(i: int) -> None:
        k = i % len(queries)
        context = context_features(queries[k][1], chosen[k], prompt_text=queries[k][0])
        choose_backend(
            estimates=bandit.expected(context), backends=views, depths=depths, now=mono,
            stale_after_s=settings.tgi.stale_after_s, settings=settings.routing,
        )  # fmt: skip

    routing = _timed_us(route, n)
    both = [selection["p50"] + routing["p50"], selection["p99"] + routing["p99"]]
    return {
        "iterations": n,
        "select_examples_us": selection,
        "route_us": routing,
        "select_plus_route_us": {"p50": both[0], "p99": both[1]},
        "mean_selected": float(np.mean([len(c) for c in chosen])),
    }, hit_sets


async def embed_batching(settings: Settings, texts: list[str]) -> dict[str, Any]:
    """Per-sentence MiniLM cost at batch 1, 16 and 32, with the worker's embedding settings and with
    ``embedding.threads=2`` (which gives torch one intra-op thread: ``cores // threads``)."""
    out: dict[str, Any] = {}
    for threads in sorted({settings.embedding.threads, 2}):
        async with SentenceTransformerEmbedder(
            settings.embedding.model_copy(update={"threads": threads})
        ) as e:
            row: dict[str, float] = {}
            for size in (1, 16, 32):
                await e.embed(texts[:size])
                began = time.perf_counter()
                for i in range(0, len(texts), size):
                    await e.embed(texts[i : i + size])
                row[f"batch_{size}"] = 1000 * (time.perf_counter() - began) / len(texts)
            out[f"embedding.threads={threads} (torch {max(1, (os.cpu_count() or 1) // threads)})"] = row
    return out


async def direct_baseline(
    settings: Settings, messages: list[Any], rate: float, duration_s: float, max_new_tokens: int
) -> dict[str, Any]:
    """Client -> emulated backend with the adapter the worker uses; no echolm in between."""
    backend = next(b for b in settings.tgi.backends if b.tier != settings.tgi.large_tier)
    samples: list[float] = []
    params = GenerationParams(max_new_tokens=max_new_tokens)
    async with TGIGenerator.from_settings(backend, settings.tgi) as generator:
        await generator.generate(messages, params)

        async def one() -> None:
            t0 = time.perf_counter()
            await generator.generate(messages, params)
            samples.append(1000 * (time.perf_counter() - t0))

        tasks, start, count = [], time.perf_counter(), int(rate * duration_s)
        for i in tqdm(range(count), desc="direct baseline", unit="req"):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return {"backend": backend.name, "rate": rate, "latency_ms": summary(samples)}


async def fetch_wait_floor(
    bootstrap: str, waits_ms: Sequence[int], n: int = 40, gap_s: float = 0.05
) -> dict[str, Any]:
    """Produce -> consume latency on the broker alone, per consumer ``fetch_max_wait_ms``: the floor of
    every Kafka hop in the pipeline (faust's worker consumer uses 1500 ms, EchoClient aiokafka's 500)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    out: dict[str, Any] = {}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        for wait_ms in waits_ms:
            topic = f"bench.fetchwait.{wait_ms}.{uuid.uuid4().hex[:6]}"
            await create_topics(bootstrap, {topic: 4})
            consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=wait_ms)
            await consumer.start()
            partitions = [TopicPartition(topic, p) for p in range(4)]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)
            latencies: list[float] = []

            async def read(consumer: AIOKafkaConsumer = consumer, latencies: list[float] = latencies) -> None:
                async for message in consumer:
                    latencies.append(1000 * (time.time() - float(message.value or b"0")))
                    if len(latencies) == n:
                        return

            reader = asyncio.create_task(read())
            for i in range(n):
                await producer.send_and_wait(topic, repr(time.time()).encode(), partition=i % 4)
                await asyncio.sleep(gap_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader, 10)
            await consumer.stop()
            out[str(wait_ms)] = summary(latencies) | {"max": max(latencies, default=float("nan"))}
    finally:
        await producer.stop()
    return out


async def drive(
    client: EchoClient,
    prompts: list[str],
    *,
    rate: float | None,
    desc: str,
    max_new_tokens: int,
    timeout_s: float,
    max_inflight_sends: int = 64,
) -> tuple[list[Reply], float, float]:
    """Send every prompt (open loop at ``rate``, or as fast as sends allow when None); collect replies.

    Waits at most ``timeout_s`` after the last send. Returns the replies, the send duration and the
    time from the first send to the last reply (so replies/s holds even when some never came)."""
    ids: set[str] = set()
    replies: list[Reply] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="reply", mininterval=1.0)
    done = asyncio.Event()
    last_reply = time.perf_counter()

    async def collect() -> None:
        nonlocal last_reply
        async for reply in client.replies():
            if reply.request_id in ids:
                replies.append(reply)
                last_reply = time.perf_counter()
                bar.update()
                if len(replies) == len(prompts):
                    done.set()
                    return

    collector = asyncio.create_task(collect())
    gate = asyncio.Semaphore(max_inflight_sends)

    async def send(prompt: str, request_id: str) -> None:
        try:
            await client.send(prompt, tenant="bench", request_id=request_id, max_new_tokens=max_new_tokens)
        finally:
            gate.release()

    start = time.perf_counter()
    sends = []
    for i, prompt in enumerate(prompts):
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        await gate.acquire()
        request_id = uuid.uuid4().hex
        ids.add(request_id)
        sends.append(asyncio.create_task(send(prompt, request_id)))
    await asyncio.gather(*sends)
    send_s = time.perf_counter() - start
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout_s)
    elapsed = max(last_reply - start, 1e-9) if replies else time.perf_counter() - start
    collector.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await collector
    bar.close()
    return replies, send_s, elapsed


async def drain(client: EchoClient, timeout_s: float) -> dict[str, float]:
    """Wait until every request sent so far is answered (a backlog would skew the next phase)."""
    began = time.perf_counter()
    backlog = client.outstanding
    while client.outstanding and time.perf_counter() - began < timeout_s:  # noqa: ASYNC110 - polls a counter
        await asyncio.sleep(0.2)
    return {"backlog": backlog, "left": client.outstanding, "waited_s": time.perf_counter() - began}


# --------------------------------------------------------------------------------------------- runner
def _set_overrides(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    try:
        return parse_overrides(pairs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def _machine() -> dict[str, Any]:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    mem_kb = next(
        int(ln.split()[1])
        for ln in Path("/proc/meminfo").read_text().splitlines()
        if ln.startswith("MemTotal")
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, check=False)  # fmt: skip
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "commit": commit.stdout.strip(),
        "dirty_files": [ln[3:] for ln in dirty.stdout.splitlines()],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    preset = replace(
        preset,
        **{k: v for k, v in {
            "examples": args.examples, "rate": args.rate, "duration_s": args.duration,
            "low_rate": args.low_rate, "saturate": args.saturate, "micro_iterations": args.micro_iterations,
        }.items() if v is not None},
    )  # fmt: skip
    rng = np.random.default_rng(args.seed)
    tag = uuid.uuid4().hex[:8]
    data_dir = Path(tempfile.mkdtemp(prefix="echolm-overhead-"))
    overrides = _set_overrides(args.set)
    if args.fetch_max_wait_ms is not None:  # alias of --set kafka.fetch_max_wait_ms=MS
        overrides.setdefault("kafka", {})["fetch_max_wait_ms"] = args.fetch_max_wait_ms
    sections: dict[str, dict[str, Any]] = {
        "kafka": {"topic_prefix": f"ovh{tag}"},
        "milvus": {"collection": f"ovh{tag}"},
        "worker": {"app_id": f"ovh{tag}", "metrics_port": free_port(), "data_dir": str(data_dir / "worker")},
        "stack": {"data_dir": str(data_dir)},
    }
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    report: dict[str, Any] = {
        "preset": args.preset, "seed": args.seed, "config": asdict(preset), "overrides": overrides,
        "fetch_max_wait_ms": load_settings(**{k: v for k, v in overrides.items() if k == "kafka"})
        .kafka.fetch_max_wait_ms,
        "machine": _machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    base = load_settings(**sections)
    stack = LocalStack(
        base, milvus="server", ephemeral=True, data_dir=data_dir, backend_engine="emulated",
        backend_args=INSTANT_BACKEND, progress=lambda m: tqdm.write(f"[stack] {m}"),
    )  # fmt: skip
    worker: WorkerProcess | None = None
    began = time.perf_counter()
    try:
        await stack.start()
        settings = stack.apply(base)
        await create_topics(settings.kafka.bootstrap_servers, topic_specs(settings))
        # The bench's own embedder (bank and query vectors) uses one torch thread: fastest on shared cores.
        embedder = SentenceTransformerEmbedder(settings.embedding.model_copy(update={"threads": 2}))
        await embedder.warmup()
        real, bank, bank_timings = await preload(settings, embedder, preset, rng)
        timings: dict[str, Any] = bank_timings  # plus the index and settle reports below
        timings["index"] = await asyncio.to_thread(
            wait_for_index, settings, preset.examples, preset.index_timeout_s
        )
        timings["milvus_settle"] = await asyncio.to_thread(settle, "milvus", preset.index_timeout_s)
        report["bank"] = {"examples": preset.examples, "real_embeddings": len(bank), **timings}
        tqdm.write(f"[bank] {json.dumps(report['bank'])}")

        prompts = [question(rng) for _ in range(200)]
        qvecs = await embedder.embed(prompts)
        queries = list(zip(prompts, qvecs, strict=True))
        await embedder.aclose()
        if not args.pipeline_only:
            c0, t0 = cpu_snapshot(), time.perf_counter()
            report["micro"], hit_sets = micro(settings, real, bank, queries, preset.micro_iterations)
            report["micro"]["cpu"] = cpu_delta(c0, cpu_snapshot(), time.perf_counter() - t0)
            c0, t0 = cpu_snapshot(), time.perf_counter()
            report["embed_batching"] = await embed_batching(settings, prompts[:32])
            report["embed_batching"]["cpu"] = cpu_delta(c0, cpu_snapshot(), time.perf_counter() - t0)
            selected = [
                Selected(h.example, h.similarity, 0.6) for h in hit_sets[0][: settings.selection.max_examples]
            ]
            messages = build_messages(settings.tgi.system_prompt, selected, prompts[0])
            c0, t0 = cpu_snapshot(), time.perf_counter()
            report["direct"] = await direct_baseline(
                settings, messages, preset.rate, preset.baseline_s, preset.max_new_tokens
            )
            report["direct"]["cpu"] = cpu_delta(c0, cpu_snapshot(), time.perf_counter() - t0)
            tqdm.write(f"[micro] {json.dumps(report['micro'])}\n[direct] {json.dumps(report['direct'])}")

            report["fetch_wait_floor_ms"] = await fetch_wait_floor(
                settings.kafka.bootstrap_servers, (1500, 500, 100, 25, 10, 5)
            )
            tqdm.write(f"[fetch wait] {json.dumps(report['fetch_wait_floor_ms'])}")
        worker = WorkerProcess(settings, log_path=data_dir / "worker.log", name="bench-worker")
        worker.start()
        await worker.wait_ready(timeout_s=120)
        port = settings.worker.metrics_port
        async with EchoClient(settings) as client:
            await drive(client, [question(rng) for _ in range(100)], rate=25, desc="warm-up",
                        max_new_tokens=preset.max_new_tokens, timeout_s=60)  # fmt: skip
            report["warmup_drain"] = await drain(client, 60)
            steps = ((preset.low_rate, preset.low_duration_s), (preset.rate, preset.duration_s))
            phases: list[tuple[str, list[str], float | None, float]] = [
                (f"steady@{rate:g}", [question(rng) for _ in range(int(rate * seconds))], rate, 30.0)
                for rate, seconds in steps
                if rate > 0
            ]
            burst = [question(rng) for _ in range(preset.saturate)]
            phases.append(("saturation", burst, None, preset.saturate_window_s))
            for name, prompts, rate, wait_s in phases:
                scrape0, cpu0, t0 = (
                    await asyncio.to_thread(scrape_stages, port),
                    cpu_snapshot(),
                    time.perf_counter(),
                )
                replies, send_s, elapsed = await drive(
                    client, prompts, rate=rate, desc=name if rate is None else f"{name} {rate:g} req/s",
                    max_new_tokens=preset.max_new_tokens, timeout_s=wait_s,
                )  # fmt: skip
                scrape1, cpu1, t1 = (
                    await asyncio.to_thread(scrape_stages, port),
                    cpu_snapshot(),
                    time.perf_counter(),
                )
                report[name] = {
                    "rate": rate, "sent": len(prompts), "send_s": send_s, "sent_per_s": len(prompts) / send_s,
                    "elapsed_s": elapsed, **analyse(replies, elapsed),
                    "worker_metrics_ms": stage_deltas(scrape0, scrape1),
                    "cpu": cpu_per_reply(cpu_delta(cpu0, cpu1, t1 - t0), t1 - t0, len(replies)),
                }  # fmt: skip
                if name != "saturation":  # a backlog left by this phase would skew the next one
                    report[name]["drain"] = await drain(client, preset.saturate_window_s)
            report["client_duplicates"] = client.duplicates
    finally:
        if worker is not None:
            report["worker_exit"] = await worker.stop(timeout_s=20)
            report["worker_log_tail"] = worker.log_tail(15).splitlines()
        await stack.stop()
        report["wall_s"] = time.perf_counter() - began
        if not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            report["data_dir"] = str(data_dir)
    return report


# --------------------------------------------------------------------------------------------- output
def markdown(report: dict[str, Any]) -> str:
    def row(name: str, s: dict[str, float]) -> str:
        return f"| {name} | {s['p50']:.2f} | {s['p99']:.2f} |"

    lines = []
    for phase in [k for k in report if k.startswith("steady@")] + ["saturation"]:
        p = report.get(phase)
        if not p:
            continue
        m = p["worker_metrics_ms"]
        lines += [
            f"\n**{phase}** ({p['replies']} replies, {p['replies_per_s']:.1f} replies/s, errors "
            f"{dict(p['errors']) or 0}, embed batch mean {p['embed_batches']['mean']:.1f} / max "
            f"{p['embed_batches']['max']}; CPU: ours {p['cpu']['ours_cores']:.2f} cores, others "
            f"{p['cpu']['others_cores']:.2f} of {p['cpu']['cores']}; CPU ms/reply "
            f"{json.dumps(p['cpu'].get('cpu_ms_per_reply_by_role'))})\n",
            "| stage | p50 ms | p99 ms |", "| --- | ---: | ---: |",
            *(row(s, p["stages_ms"][s]) for s in TIMING_STAGES),
        ]  # fmt: skip
        if "emit" in m:
            lines.append(row("emit (worker histogram)", m["emit"]))
        lines += [
            row("unattributed (client hops, batch wait, emit)", p["unattributed_ms"]),
            row("**end to end (client)**", p["end_to_end_ms"]),
            row("**overhead = end to end - generate**", p["overhead_ms"]),
        ]
    micro_ = report.get("micro", {})
    if micro_:
        lines += [
            "\n| pure decision (µs) | p50 | p99 |", "| --- | ---: | ---: |",
            row("select_examples (20 hits)", micro_["select_examples_us"]),
            row("context_features + expected + choose_backend", micro_["route_us"]),
        ]  # fmt: skip
    if "direct" in report:
        lines.append(f"\ndirect client -> backend: {json.dumps(report['direct']['latency_ms'])}")
    embed = {k: v for k, v in report.get("embed_batching", {}).items() if k != "cpu"}
    if embed:
        lines += ["\n| MiniLM ms/sentence | batch 1 | batch 16 | batch 32 |", "| --- | ---: | ---: | ---: |"]
        lines += [
            f"| {k} | {v['batch_1']:.1f} | {v['batch_16']:.1f} | {v['batch_32']:.1f} |"
            for k, v in embed.items()
        ]
    floor = report.get("fetch_wait_floor_ms", {})
    if floor:
        lines += ["\n| consumer fetch_max_wait_ms | hop p50 ms | hop max ms |", "| ---: | ---: | ---: |"]
        lines += [f"| {k} | {v['p50']:.1f} | {v['max']:.1f} |" for k, v in floor.items()]
    return "\n".join(lines)


def compare(paths: Sequence[Path]) -> str:
    """One row per result file: the settings it changed and its headline numbers (Markdown)."""

    def cell(phase: dict[str, Any] | None, key: str) -> str:
        if not phase or not phase.get(key, {}).get("n"):
            return "-"
        return f"{phase[key]['p50']:.0f} / {phase[key]['p99']:.0f}"

    lines = [
        "| run | changed | overhead p50 / p99 ms @ low rate | replies/s @ rate "
        "| overhead p50 / p99 ms @ rate | saturation replies/s "
        "| CPU ms/reply (worker, milvus, broker, client) | other load (cores) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for path in paths:
        r = json.loads(Path(path).read_text())
        if "steady" in r:  # files written before the low-rate phase existed
            old = r.pop("steady")
            r[f"steady@{old['rate']:g}"] = old
        steady = sorted((k for k in r if k.startswith("steady@")), key=lambda k: float(k.split("@")[1]))
        low, high = (r[steady[0]] if len(steady) > 1 else None), (r[steady[-1]] if steady else None)
        sat = r.get("saturation", {})
        busiest = max([sat, high or {}], key=lambda p: p.get("replies", 0))
        by_role = busiest.get("cpu", {}).get("cpu_ms_per_reply_by_role", {})
        cpu = ", ".join(f"{by_role.get(k, 0):.1f}" for k in ("worker", "milvus", "broker", "client"))
        changed = [f"{s}.{k}={v}" for s, kv in r.get("overrides", {}).items() for k, v in kv.items()]
        if r.get("fetch_max_wait_ms") is not None:
            changed.append(f"fetch_max_wait_ms={r['fetch_max_wait_ms']}")
        others = [r[k]["cpu"]["others_cores"] for k in [*steady, "saturation"] if k in r]
        lines.append(
            f"| {Path(path).stem} | {'<br>'.join(changed) or 'defaults'} | {cell(low, 'overhead_ms')} "
            f"| {high['replies_per_s']:.1f} of {high['rate']:g} | {cell(high, 'overhead_ms')} "
            f"| {sat.get('replies_per_s', float('nan')):.1f} | {cpu} | {np.mean(others):.2f} |"
            if high
            else f"| {Path(path).stem} | incomplete | | | | | | |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="Per-stage pipeline overhead with instant (emulated) backends on the local stack.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--examples", type=int, help="examples in the bank (preset: 10k small, 100k full)")
    p.add_argument("--rate", type=float, help="steady-phase requests/s (preset: 50)")
    p.add_argument("--duration", type=float, help="steady-phase seconds")
    p.add_argument("--low-rate", type=float, help="first steady phase, requests/s for 15 s (0 skips it)")
    p.add_argument("--saturate", type=int, help="requests in the saturation burst")
    p.add_argument("--micro-iterations", type=int)
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="settings override for the stack and worker (JSON value), e.g. embedding.batch_window_s=0.01",
    )  # fmt: skip
    p.add_argument(
        "--fetch-max-wait-ms", type=int, metavar="MS",
        help="alias of --set kafka.fetch_max_wait_ms=MS (1500 reproduces faust's own wait)",
    )  # fmt: skip
    p.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="S",
        help="first wait up to S seconds for other processes to use under half a core (shared machines)",
    )  # fmt: skip
    p.add_argument(
        "--pipeline-only", action="store_true",
        help="skip the micro, embedding, direct-backend and fetch-wait baselines (for A/B runs of settings)",
    )  # fmt: skip
    p.add_argument(
        "--compare", nargs="+", type=Path, metavar="JSON", help="print a table of earlier results; exit"
    )
    p.add_argument("--output", type=Path, help="default: bench/results/overhead-<preset>.json")
    p.add_argument(
        "--plot", nargs="+", type=Path, metavar="JSON", help="plot per-stage overhead of result files; exit"
    )
    p.add_argument(
        "--plot-out",
        type=Path,
        default=RESULTS.parent.parent / "docs" / "plots" / "overhead-stages.png",
        help="PNG for --plot",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the temporary stack folder (logs)")
    return p.parse_args(argv)


async def _run_until_signal(args: argparse.Namespace) -> dict[str, Any]:
    """SIGTERM/SIGINT cancel the run, so its ``finally`` stops the worker and the stack."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    return await run(args)


_PLOT_STAGES = ("embed", "retrieve", "select", "kafka_hop", "route", "emit", "unattributed")


def plot_stages(results: Sequence[Path], out: Path) -> Path:
    """Per-stage p50 and p99 overhead (ms, log scale) per phase of each result file: one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, dict[str, tuple[float, float]]]] = []
    for path in results:
        r = json.loads(path.read_text())
        for phase in ("steady@5", "steady@10", "steady@50", "saturation"):
            ph = r.get(phase)
            if not ph:
                continue
            stages: dict[str, tuple[float, float]] = {}
            for name in _PLOT_STAGES:
                if name == "emit":
                    d = ph.get("worker_metrics_ms", {}).get("emit")
                elif name == "unattributed":
                    d = ph.get("unattributed_ms")
                else:
                    d = ph.get("stages_ms", {}).get(name)
                if d and d.get("p50") is not None:
                    stages[name] = (float(d["p50"]), float(d["p99"]))
            rows.append((f"{path.stem}\n{phase} ({ph.get('replies_per_s', 0):.1f} replies/s)", stages))
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.75 * len(rows) * 1.0 + 1.5))
    height = 0.8 / len(_PLOT_STAGES)
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(_PLOT_STAGES):
        ys = [j + i * height for j in range(len(rows))]
        p50 = [stages.get(name, (0.0, 0.0))[0] for _, stages in rows]
        p99 = [stages.get(name, (0.0, 0.0))[1] for _, stages in rows]
        ax.barh(ys, p99, height=height, color=colours(i), alpha=0.3)
        ax.barh(ys, p50, height=height, color=colours(i), label=name)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per request (solid: p50, pale: p99; log scale)")
    ax.set_title("echolm pipeline overhead per stage (instant emulated backends)")
    ax.axvline(15, color="grey", ls="--", lw=0.8)
    ax.text(15, len(rows) - 0.25, " target p50 15 ms", fontsize=7, color="grey")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        print(f"wrote {plot_stages(args.plot, args.plot_out)}")
        return 0
    if args.compare:
        print(compare(args.compare))
        return 0
    quiet = wait_quiet(args.wait_quiet)
    try:
        report = asyncio.run(_run_until_signal(args))
    except asyncio.CancelledError:
        print("stopped by a signal; every process it started was stopped", file=sys.stderr)
        return 143
    report["before_start"] = quiet
    output = args.output or RESULTS / f"overhead-{args.preset}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown(report))
    print(f"\nwritten to {output} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
