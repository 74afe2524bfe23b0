"""Adapter lifetimes, owned in one place.

``Resources`` is a ``mode.Service`` registered with ``app.service``: it opens every adapter on
start (through an ``AsyncExitStack``) and closes them in reverse order on stop. Agents receive it
as their dependency bundle and never create clients themselves.

Degradation: if Milvus or the embedding model cannot be opened, the worker still starts and
serves without examples (``store``/``embedder`` stay None, counted in
``echolm_selection_bypass_total``); a background task retries every few seconds and swaps them
in when they come back. Backends are always constructed (their failures are per request). The
answered feed (``infra/answered.py``) is constructed here and closed here; it opens its consumer on
first use, so a worker that never serves never reads the answered topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from mode import Service

from .kafka import kafka_client_kwargs
from .metrics import Metrics
from .protocols import AnsweredFeed, Embedder, Generator, QueueDepthProbe, VectorStore
from .settings import Settings
from .topics import TopicDirectory

__all__ = ["AdapterFactories", "Resources", "default_factories"]

log = logging.getLogger(__name__)


@dataclass
class AdapterFactories:
    """How adapters are built; tests pass fakes here. Each returns an object with ``aclose()``."""

    embedder: Callable[[Settings], Awaitable[Embedder]]
    store: Callable[[Settings], Awaitable[VectorStore]]
    generators: Callable[[Settings], Awaitable[Mapping[str, Generator]]]
    probe: Callable[[Settings], Awaitable[QueueDepthProbe]]
    answered: Callable[[Settings], Awaitable[AnsweredFeed]] | None = None  # None: the Kafka feed


async def _real_answered(settings: Settings) -> AnsweredFeed:
    from .answered import KafkaAnsweredFeed

    return KafkaAnsweredFeed(settings)


async def _real_embedder(settings: Settings) -> Embedder:
    from .embedding import CachedEmbedder, SentenceTransformerEmbedder

    if settings.embedding.backend == "onnx":
        from .embedding_onnx import OnnxEmbedder

        onnx = OnnxEmbedder(settings.embedding)
        await onnx.warmup()
        return CachedEmbedder.from_settings(onnx, settings.embedding)
    embedder = SentenceTransformerEmbedder(settings.embedding)
    await embedder.warmup()
    return CachedEmbedder.from_settings(embedder, settings.embedding)


async def _real_store(settings: Settings) -> VectorStore:
    from .milvus import MilvusExampleStore

    store = MilvusExampleStore(settings.milvus)
    await store.ensure_collection()
    return store


async def _real_generators(settings: Settings) -> Mapping[str, Generator]:
    from .tgi import TGIGenerator

    return {b.name: TGIGenerator.from_settings(b, settings.tgi) for b in settings.tgi.backends}


async def _real_probe(settings: Settings) -> QueueDepthProbe:
    from .tgi import TGIQueueProbe

    probe = TGIQueueProbe.from_settings(settings.tgi)
    await probe.start()
    return probe


def default_factories() -> AdapterFactories:
    return AdapterFactories(_real_embedder, _real_store, _real_generators, _real_probe, _real_answered)


@dataclass
class _State:
    embedder: Embedder | None = None
    store: VectorStore | None = None
    generators: dict[str, Generator] = field(default_factory=dict)
    probe: QueueDepthProbe | None = None
    answered: AnsweredFeed | None = None


class Resources(Service):
    """Every adapter a worker uses, plus its identity and metrics."""

    def __init__(
        self,
        settings: Settings,
        *,
        factories: AdapterFactories | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.factories = factories or default_factories()
        self.metrics = metrics or Metrics()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._state = _State()
        self._stack = AsyncExitStack()
        self.ready = asyncio.Event()
        self.topic_directory = TopicDirectory(kafka_client_kwargs(settings))
        self.inflight = 0  # requests taken from a topic and not yet answered (for graceful drain)
        # set on SIGTERM (echolm/worker.py): agents take no new record; those they hold stay un-acked
        self.draining = False
        self._retry_task: asyncio.Task[None] | None = None
        super().__init__()

    # -- accessors -------------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder | None:
        return self._state.embedder

    @property
    def store(self) -> VectorStore | None:
        return self._state.store

    @property
    def generators(self) -> Mapping[str, Generator]:
        return self._state.generators

    @property
    def probe(self) -> QueueDepthProbe | None:
        return self._state.probe

    @property
    def answered(self) -> AnsweredFeed | None:
        """The answered topic's feed (None before start)."""
        return self._state.answered

    # -- lifecycle -------------------------------------------------------------------------------
    async def on_start(self) -> None:
        await self._open_all()
        self._retry_task = asyncio.create_task(self._reopen_missing(), name="echolm-resources-retry")
        self.ready.set()
        log.info(
            "echolm resources ready: embedder=%s store=%s backends=%s",
            "up" if self._state.embedder else "DOWN",
            "up" if self._state.store else "DOWN",
            sorted(self.generators),
        )

    async def _open_all(self) -> None:
        s, f = self.settings, self.factories
        self._stack.push_async_callback(self.topic_directory.aclose)
        generators = await f.generators(s)
        for g in generators.values():
            self._stack.push_async_callback(g.aclose)
        self._state.generators = dict(generators)
        self._state.probe = await f.probe(s)
        self._stack.push_async_callback(self._close_probe)
        self._state.answered = await (f.answered or _real_answered)(s)
        self._stack.push_async_callback(self._state.answered.aclose)
        await self._try_open_embedder()
        await self._try_open_store()

    async def _try_open_embedder(self) -> None:
        try:
            self._state.embedder = await self.factories.embedder(self.settings)
        except Exception:  # degrade, retry later; log.exception keeps the traceback
            log.exception("embedding model unavailable: serving without examples until it loads")

    async def _try_open_store(self) -> None:
        try:
            self._state.store = await self.factories.store(self.settings)
        except Exception:  # degrade, retry later; log.exception keeps the traceback
            log.exception(
                "vector store %s unavailable: serving without examples, retrying", self.settings.milvus.uri
            )

    async def _close_probe(self) -> None:
        probe = self._state.probe
        close = getattr(probe, "aclose", None)
        if close is not None:
            await close()

    async def _reopen_missing(self) -> None:
        while True:
            await asyncio.sleep(3.0)
            if self._state.embedder is None:
                await self._try_open_embedder()
            if self._state.store is None:
                await self._try_open_store()

    async def on_stop(self) -> None:
        if self._retry_task is not None:
            self._retry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry_task
        for closer in (self._state.store, self._state.embedder):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.aclose()
        self._state.store = None
        self._state.embedder = None
        await self._stack.aclose()
