"""The systems echolm is compared with, and the open-loop driver every system is fed by.

* ``DirectDispatcher``: plain serving, as a load balancer in front of TGI would do it: each request
  goes straight to the replica of one tier with the fewest requests in flight (join-shortest-queue),
  through the same ``TGIGenerator`` adapter echolm uses. No Kafka, no embedding, no cache. This is
  the *large-only* and *small-only* baseline.
* ``SemanticCache``: GPTCache / Databricks-style semantic caching over a Milvus collection seeded with
  the same bank as echolm's: embed the request (the same MiniLM), take the nearest cached request of
  the tenant; at cosine >= ``threshold`` return its stored answer, else ask the large tier and store
  the new answer. ``simulate_semantic_cache`` replays the same decision offline over the whole stream
  for many thresholds (hit rate and modelled quality do not depend on timing), which gives the
  quality-vs-hit-rate curve the live run is one point of.
* The load-blind router is echolm itself with ``routing.load_lambda = 0`` (a RouteLLM-style router:
  a threshold on predicted quality that never looks at load); it runs in ``bench/fleet``.

``open_loop`` sends every request at its scheduled time whatever happened to earlier ones, and every
latency counts from the scheduled time (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agents.policy.admission import example_id
from agents.policy.prompt import build_messages
from bench.calibrate import Condition, QualityModel
from bench.report import RequestResult
from infra.errors import BackendError
from infra.protocols import Embedder, Example, GenerationParams, VectorStore
from infra.settings import BackendSettings, TGISettings

__all__ = [
    "DirectDispatcher",
    "Scheduled",
    "SemanticCache",
    "open_loop",
    "serve_direct",
    "serve_semantic_cache",
    "simulate_semantic_cache",
]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Scheduled:
    """One request of a phase: when it arrives (s from the phase start), what it asks, and how many
    tokens its answer has."""

    request_id: str
    group_id: str
    text: str
    at: float
    max_new_tokens: int


Handler = Callable[[Scheduled, Callable[[], float]], Coroutine[Any, Any, RequestResult]]


async def open_loop(
    schedule: Sequence[Scheduled],
    handle: Handler,
    *,
    system: str,
    phase: str,
    timeout_s: float,
    progress: Callable[[int], None] | None = None,
) -> list[RequestResult]:
    """Run ``handle`` for every request at its time; ``handle`` gets the request and a clock that reads
    seconds since the phase start. Requests still running ``timeout_s`` after the last arrival are
    cancelled and reported as failed (``done_s`` None)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2

    def clock() -> float:
        return loop.time() - t0

    tasks: list[asyncio.Task[RequestResult]] = []
    for item in schedule:
        delay = item.at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(handle(item, clock), name=f"bench-{item.request_id}")
        if progress is not None:
            task.add_done_callback(lambda _t: progress(1))
        tasks.append(task)
    done, pending = await asyncio.wait(tasks, timeout=timeout_s) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    out = []
    for item, task in zip(schedule, tasks, strict=True):
        if task in done and task.exception() is None:
            out.append(task.result())
        else:
            out.append(_failed(item, system, phase))
    return out


def _failed(item: Scheduled, system: str, phase: str) -> RequestResult:
    return RequestResult(
        system=system,
        phase=phase,
        request_id=item.request_id,
        group_id=item.group_id,
        arrival_s=item.at,
        sent_s=item.at,
        done_s=None,
        ok=False,
        condition="failed",
        quality=0.0,
    )


def _served(
    item: Scheduled,
    system: str,
    phase: str,
    *,
    sent: float,
    done: float,
    tier: str,
    backend: str,
    condition: Condition,
    quality: QualityModel,
    generate_ms: float,
) -> RequestResult:
    """A request answered (by a backend or from the cache), scored by its serving condition."""
    return RequestResult(
        system=system,
        phase=phase,
        request_id=item.request_id,
        group_id=item.group_id,
        arrival_s=item.at,
        sent_s=sent,
        done_s=done,
        ok=True,
        tier=tier,
        backend=backend,
        condition=condition,
        quality=quality.quality(condition),
        generate_ms=generate_ms,
    )


# --------------------------------------------------------------------------------------- plain serving
class DirectDispatcher:
    """Join-shortest-queue over the replicas of one tier, by requests in flight from this client."""

    def __init__(self, backends: Sequence[BackendSettings], tgi: TGISettings) -> None:
        if not backends:
            raise ValueError("a dispatcher needs at least one backend")
        self.backends = list(backends)
        self.tgi = tgi
        self.inflight = {b.name: 0 for b in backends}
        self._generators: dict[str, Any] = {}
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> DirectDispatcher:
        from infra.tgi import TGIGenerator

        for b in self.backends:
            self._generators[b.name] = await self._stack.enter_async_context(
                TGIGenerator.from_settings(b, self.tgi)
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def pick(self) -> BackendSettings:
        return min(self.backends, key=lambda b: (self.inflight[b.name], b.name))

    async def generate(self, prompt: str, max_new_tokens: int) -> tuple[BackendSettings, Any]:
        backend = self.pick()
        self.inflight[backend.name] += 1
        try:
            messages = build_messages(self.tgi.system_prompt, [], prompt)
            generation = await self._generators[backend.name].generate(
                messages, GenerationParams(max_new_tokens=max_new_tokens)
            )
        finally:
            self.inflight[backend.name] -= 1
        return backend, generation


def serve_direct(
    dispatcher: DirectDispatcher, *, system: str, phase: str, quality: QualityModel, large_tier: str
) -> Handler:
    """A handler that sends each request straight to the dispatcher's tier."""

    async def handle(item: Scheduled, clock: Callable[[], float]) -> RequestResult:
        sent = clock()
        try:
            backend, generation = await dispatcher.generate(item.text, item.max_new_tokens)
        except BackendError:
            return _failed(item, system, phase)
        done = clock()
        condition: Condition = "large" if backend.tier == large_tier else "small_alone"
        return _served(
            item, system, phase, sent=sent, done=done, tier=backend.tier, backend=backend.name,
            condition=condition, quality=quality, generate_ms=generation.latency_s * 1e3,
        )  # fmt: skip

    return handle


# ------------------------------------------------------------------------------------- semantic cache
class SemanticCache:
    """The nearest cached request at cosine >= ``threshold`` answers; misses go to the large tier and
    are stored."""

    def __init__(
        self,
        *,
        store: VectorStore,
        embedder: Embedder,
        tenant: str,
        threshold: float,
        group_of: Mapping[str, str],
    ) -> None:
        self.store, self.embedder, self.tenant = store, embedder, tenant
        self.threshold = threshold
        self.group_of = group_of  # example id -> paraphrase group, to judge a hit
        self.hits = 0
        self.lookups = 0

    async def lookup(self, text: str) -> tuple[Any, Any]:
        vector = (await self.embedder.embed([text]))[0]
        found = await self.store.search(self.tenant, vector[None, :], limit=1)
        self.lookups += 1
        best = found[0][0] if found and found[0] else None
        if best is not None and best.similarity >= self.threshold:
            self.hits += 1
            return vector, best
        return vector, None

    async def admit(self, text: str, vector: Any, answer: str) -> None:
        now = time.time()
        await self.store.upsert(
            [
                Example(
                    example_id=example_id(self.tenant, text),
                    tenant=self.tenant,
                    request=text,
                    response=answer,
                    embedding=vector,
                    created_at=now,
                    updated_at=now,
                )
            ]
        )


def serve_semantic_cache(
    cache: SemanticCache, dispatcher: DirectDispatcher, *, system: str, phase: str, quality: QualityModel
) -> Handler:
    async def handle(item: Scheduled, clock: Callable[[], float]) -> RequestResult:
        sent = clock()
        vector, hit = await cache.lookup(item.text)
        if hit is not None:
            same = cache.group_of.get(hit.example.example_id) == item.group_id
            condition: Condition = "cache_match" if same else "cache_other"
            return _served(
                item, system, phase, sent=sent, done=clock(), tier="cache", backend="cache",
                condition=condition, quality=quality, generate_ms=0.0,
            )  # fmt: skip
        try:
            backend, generation = await dispatcher.generate(item.text, item.max_new_tokens)
        except BackendError:
            return _failed(item, system, phase)
        done = clock()
        await cache.admit(item.text, vector, generation.text)
        return _served(
            item, system, phase, sent=sent, done=done, tier=backend.tier, backend=backend.name,
            condition="large", quality=quality, generate_ms=generation.latency_s * 1e3,
        )  # fmt: skip

    return handle


def simulate_semantic_cache(
    bank_vectors: FloatArray,
    bank_groups: Sequence[str],
    stream_vectors: FloatArray,
    stream_groups: Sequence[str],
    thresholds: Sequence[float],
    quality: QualityModel,
) -> list[dict[str, float]]:
    """Hit rate and modelled quality of semantic caching over one request stream, per threshold.

    In stream order, each request is a hit when its nearest neighbour among the bank and the
    requests already stored has cosine >= threshold (quality ``cache_match`` when that neighbour is a
    rewording of it, else ``cache_other``); a miss is answered by the large model (``large``) and
    stored. Vectors must be unit length. Pure: the same input gives the same rows.
    """
    n = len(stream_groups)
    if stream_vectors.shape[0] != n or bank_vectors.shape[0] != len(bank_groups):
        raise ValueError("vectors and groups must have the same lengths")
    if n == 0:
        return []
    if len(bank_groups):
        bank_sims = stream_vectors @ bank_vectors.T
        best_bank = bank_sims.argmax(axis=1)
        best_bank_sim = bank_sims[np.arange(n), best_bank]
        best_bank_same = np.asarray([bank_groups[j] == stream_groups[i] for i, j in enumerate(best_bank)])
    else:
        best_bank_sim = np.full(n, -np.inf)
        best_bank_same = np.zeros(n, dtype=bool)
    stream_sims = stream_vectors @ stream_vectors.T
    same_group = np.asarray(stream_groups)[:, None] == np.asarray(stream_groups)[None, :]
    rows = []
    for threshold in thresholds:
        stored = np.zeros(n, dtype=bool)
        hits = match = 0
        total_quality = 0.0
        for i in range(n):
            sim, same = best_bank_sim[i], bool(best_bank_same[i])
            if stored.any():
                candidates = np.where(stored, stream_sims[i], -np.inf)
                j = int(candidates.argmax())
                if candidates[j] > sim:
                    sim, same = candidates[j], bool(same_group[i, j])
            if sim >= threshold:
                hits += 1
                match += same
                total_quality += quality.quality("cache_match" if same else "cache_other")
            else:
                stored[i] = True
                total_quality += quality.quality("large")
        rows.append(
            {
                "threshold": float(threshold),
                "hit_rate": hits / n,
                "quality": total_quality / n,
                "hit_precision": match / hits if hits else float("nan"),
            }
        )
    return rows
