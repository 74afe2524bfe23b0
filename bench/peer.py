"""The same work as the pipeline, done in one process with no Kafka: the peer echolm is compared with.

Per request: embed (the worker's embedder, batched exactly like ``prepare``: the requests that arrive
within ``embedding.batch_window_s``, up to ``embedding.batch_size``), search (``search_batch``, the
worker's ``top_k``), ``select_examples``, ``context_features`` + ``LinUCBBandit.expected`` +
``choose_backend`` on live ``TGIQueueProbe`` depths, ``build_messages`` and one ``TGIGenerator.generate``
to the chosen backend, at most ``worker.concurrency`` generations at once. Requests arrive open-loop
at ``rate``; overhead = latency - generate, as for the pipeline. No broker, no records, no replies on
a topic: whatever echolm costs beyond this is its streaming machinery.

``gptcache_lookup`` times GPTCache's own similarity lookup over the same MiniLM and Milvus
collection, when ``gptcache`` is installed (it is not a dependency of echolm).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from agents.policy.prompt import build_messages
from agents.policy.retrieval import UtilityModel, select_examples
from agents.policy.routing import BackendView, LinUCBBandit, choose_backend, context_features
from infra.protocols import Embedder, GenerationParams, Generator, QueueDepthProbe, VectorStore
from infra.settings import Settings

__all__ = ["InProcessPeer"]


def _settle(
    future: asyncio.Future[dict[str, float]],
) -> Callable[[asyncio.Task[dict[str, float]]], None]:
    """A done callback that passes a serve task's result, or its exception, to the request's future."""

    def done(task: asyncio.Task[dict[str, float]]) -> None:
        if task.cancelled():
            future.cancel()
        elif (exc := task.exception()) is not None:
            future.set_exception(exc)
        else:
            future.set_result(task.result())

    return done


class InProcessPeer:
    """embed -> search -> select -> route -> generate with the worker's adapters and policies."""

    def __init__(
        self,
        settings: Settings,
        *,
        embedder: Embedder,
        store: VectorStore,
        generators: Mapping[str, Generator],
        probe: QueueDepthProbe | None,
        tenant: str,
        max_new_tokens: int,
    ) -> None:
        self.settings, self.embedder, self.store = settings, embedder, store
        self.generators, self.probe, self.tenant = generators, probe, tenant
        self.params = GenerationParams(max_new_tokens=max_new_tokens)
        self.bandit = LinUCBBandit.from_settings(
            settings.tgi.backends, settings.routing, large_tier=settings.tgi.large_tier
        )
        self.backends = tuple(BackendView.from_settings(b) for b in settings.tgi.backends)
        self.scorer = UtilityModel.prior(settings.selection.prior_similarity)
        self._queue: asyncio.Queue[tuple[str, float, asyncio.Future[dict[str, float]]]] = asyncio.Queue()
        self._gate = asyncio.Semaphore(settings.worker.concurrency)

    async def batcher(self) -> None:
        """Like ``prepare``: take up to ``batch_size`` requests or wait ``batch_window_s``, then
        embed and search the batch at once; each request then selects, routes and generates."""
        emb = self.settings.embedding
        while True:
            batch = [await self._queue.get()]
            deadline = time.perf_counter() + emb.batch_window_s
            while len(batch) < emb.batch_size and (left := deadline - time.perf_counter()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            t0 = time.perf_counter()
            vectors = await self.embedder.embed([p for p, _, _ in batch])
            t1 = time.perf_counter()
            hits = await self.store.search_batch(
                [self.tenant] * len(batch), vectors, limit=self.settings.selection.top_k, stale_ok=True
            )
            t2 = time.perf_counter()
            for i, (prompt, _, future) in enumerate(batch):
                stages = {"embed": 1000 * (t1 - t0), "retrieve": 1000 * (t2 - t1)}
                task = asyncio.create_task(self._serve(prompt, vectors[i], hits[i], stages))
                task.add_done_callback(_settle(future))

    async def _serve(
        self, prompt: str, vector: np.ndarray, hits: Sequence[Any], stages: dict[str, float]
    ) -> dict[str, float]:
        s = self.settings
        t0 = time.perf_counter()
        result = select_examples(
            vector, prompt, hits, scorer=self.scorer, threshold=s.selection.utility_threshold,
            max_examples=s.selection.max_examples, min_similarity=s.selection.min_similarity,
            duplicate_similarity=s.selection.duplicate_similarity, diversity=s.selection.diversity,
            token_budget=1024, target_tier="small", now=time.time(), large_tier=s.tgi.large_tier,
            tenant=self.tenant,
        )  # fmt: skip
        t1 = time.perf_counter()
        now = time.monotonic()
        context = context_features(vector, list(result.selected), prompt_text=prompt)
        decision = choose_backend(
            estimates=self.bandit.expected(context),
            backends=self.backends, depths=self.probe.snapshot() if self.probe else {}, now=now,
            stale_after_s=s.tgi.stale_after_s, settings=s.routing,
        )  # fmt: skip
        messages = build_messages(s.tgi.system_prompt, list(result.selected), prompt)
        t2 = time.perf_counter()
        async with self._gate:
            t3 = time.perf_counter()
            await self.generators[decision.backend].generate(messages, self.params)
        t4 = time.perf_counter()
        return stages | {
            "select": 1000 * (t1 - t0),
            "route": 1000 * (t2 - t1),
            "generate": 1000 * (t4 - t3),
            "n_examples": float(len(result.selected)),
        }

    async def request(self, prompt: str) -> dict[str, float]:
        began = time.perf_counter()
        future: asyncio.Future[dict[str, float]] = asyncio.get_running_loop().create_future()
        await self._queue.put((prompt, began, future))
        out = await future
        out["end_to_end"] = 1000 * (time.perf_counter() - began)
        out["overhead"] = out["end_to_end"] - out["generate"]
        return out

    async def drive(self, prompts: Sequence[str], rate: float | None) -> tuple[list[dict[str, float]], float]:
        """Open loop at ``rate`` (None: all at once); returns per-request timings and the elapsed s."""
        batcher = asyncio.create_task(self.batcher())
        began = time.perf_counter()
        tasks = []
        try:
            for i, prompt in enumerate(prompts):
                if rate:
                    await asyncio.sleep(max(0.0, began + i / rate - time.perf_counter()))
                tasks.append(asyncio.create_task(self.request(prompt)))
            results = await asyncio.gather(*tasks)
        finally:
            batcher.cancel()
        return list(results), time.perf_counter() - began
