"""Fakes for the agents' other boundaries: TGI backends, their queue probe, and Kafka topics.

* ``FakeGenerator`` implements ``infra.protocols.Generator`` with ``TGIGenerator``'s contract
  (``tests/contract/test_generator.py`` holds both to it): a ``Generation`` with text and token
  counts; more than ``max_concurrent_requests`` generations at once -> ``BackendOverloaded`` (TGI's
  429); ``unreachable`` -> ``BackendUnavailable`` (connection refused); a prompt over
  ``max_input_tokens`` -> ``BackendRejected`` (422); ``RuntimeError`` once closed. Scripted
  outcomes (``script``), latency (``latency_s`` plus ``token_latency_s`` per generated token) and a
  ``gate`` (generations wait until it is set) make failures and in-flight states deterministic.
* ``FakeProbe`` implements ``infra.protocols.QueueDepthProbe``: depths are set by the test, stamped
  on the monotonic clock the router uses (``age_s`` makes a sample stale).
* ``FakeTopic`` is the part of ``faust.TopicT`` the agents use (``send`` returning an awaitable of
  ``RecordMetadata``, ``get_topic_name``). A sent record is serialised with its own codec (so it
  must be wire-valid) and recorded on delivery; ``fail_next`` makes the next delivery fail.
  ``fake_topics`` builds a whole ``streams.topology.Topics`` of them.
* ``FakeTopicDirectory`` answers ``exists`` from a set instead of asking a broker.
* ``fake_factories`` wraps given adapters as ``infra.resources.AdapterFactories``; a ``None``
  embedder or store fails to open, as a down dependency does; the answered feed is a
  ``tests.fakes.answered.FakeAnsweredFeed`` (a fresh one unless given).
* ``agent_harness`` builds a worker with ``echolm.app.build_app`` on those factories, starts its
  ``Resources`` (no broker: the topic directory is a ``FakeTopicDirectory``) and hands out fake
  topics for the agents' shell classes (``Server``, ``Preparer``, ...) to send to.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

import faust
from faust.types import TP, RecordMetadata

from agents.state import DecisionState
from echolm.app import build_app
from infra.errors import (
    BackendOverloaded,
    BackendRejected,
    BackendUnavailable,
    DependencyUnavailable,
)
from infra.protocols import (
    AnsweredFeed,
    BackendInfo,
    ChatMessage,
    Embedder,
    Generation,
    GenerationParams,
    Generator,
    QueueDepth,
    QueueDepthProbe,
    StreamChunk,
    VectorStore,
)
from infra.resources import AdapterFactories, Resources
from infra.settings import Settings
from streams.topology import TOPIC_NAMES, Topics

from .answered import FakeAnsweredFeed

__all__ = [
    "AgentHarness",
    "FakeGenerator",
    "FakeProbe",
    "FakeTopic",
    "FakeTopicDirectory",
    "GenerateCall",
    "SentRecord",
    "agent_harness",
    "fake_factories",
    "fake_topics",
]

_WORD = re.compile(r"\S+")
Reply = str | Callable[[Sequence[ChatMessage], GenerationParams], str]
Step = str | BaseException  # a reply text, or an error to raise


@dataclass(frozen=True, slots=True)
class GenerateCall:
    messages: tuple[ChatMessage, ...]
    params: GenerationParams


class FakeGenerator:
    """Implements ``infra.protocols.Generator``. ``calls`` records every accepted generation."""

    def __init__(
        self,
        name: str = "small-0",
        *,
        reply: Reply = "a fake answer from a fake backend",
        latency_s: float = 0.0,
        token_latency_s: float = 0.0,
        max_concurrent_requests: int = 128,
        max_input_tokens: int = 2047,
        max_total_tokens: int = 2048,
        model_id: str = "fake-model",
        script: Iterable[Step] = (),
    ) -> None:
        self.name = name
        self.reply = reply
        self.latency_s = latency_s
        self.token_latency_s = token_latency_s  # decode time per generated token, on top of latency_s
        self.max_concurrent_requests = max_concurrent_requests
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.model_id = model_id
        self.script: deque[Step] = deque(script)
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()  # set once a generation has been accepted
        self.unreachable = False
        self.calls: list[GenerateCall] = []
        self.stream_breaks: deque[tuple[int, BaseException]] = deque()
        self.in_flight = 0
        self.closed = False

    # -- test knobs --------------------------------------------------------------------------------
    def fail_next(self, *errors: BaseException) -> None:
        """The next generations (after their latency) raise these, in order."""
        self.script.extend(errors)

    def hold(self) -> asyncio.Event:
        """Generations started from now on wait until the returned event is set."""
        self.gate = asyncio.Event()
        return self.gate

    # -- Generator -----------------------------------------------------------------------------------
    async def generate(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Generation:
        return await self._generate(messages, params, self.token_latency_s)

    def break_stream(self, after_words: int, error: BaseException) -> None:
        """The next streamed generation raises ``error`` after yielding ``after_words`` words."""
        self.stream_breaks.append((after_words, error))

    async def generate_stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[StreamChunk]:
        """``generate``'s contract, streamed: one word per chunk (the first bare, the others after a
        space, so the chunks join to ``generate``'s text), ``token_latency_s`` apart, then the final
        chunk with the finish reason and token counts."""
        broken = self.stream_breaks.popleft() if self.stream_breaks else None
        generation = await self._generate(messages, params, 0.0)
        words = generation.text.split(" ") if generation.text else []
        for i, word in enumerate(words):
            if broken is not None and i == broken[0]:
                raise broken[1]
            if self.token_latency_s:
                await asyncio.sleep(self.token_latency_s)
            yield StreamChunk(text=word if i == 0 else " " + word)
        if broken is not None:
            raise broken[1]
        yield StreamChunk(
            text="",
            finish_reason=generation.finish_reason,
            generated_tokens=generation.generated_tokens,
            prompt_tokens=generation.prompt_tokens,
        )

    async def _generate(
        self, messages: Sequence[ChatMessage], params: GenerationParams, token_latency_s: float
    ) -> Generation:
        if self.closed:
            raise RuntimeError(f"FakeGenerator {self.name!r} is closed")
        if self.unreachable:
            raise BackendUnavailable(
                f"backend {self.name!r}: POST /v1/chat/completions failed to connect (ConnectError: "
                "connection refused). Is the server running, and is the URL right?",
                backend=self.name,
            )
        if self.in_flight >= self.max_concurrent_requests:
            raise BackendOverloaded(
                f"backend {self.name!r} is overloaded: POST /v1/chat/completions answered HTTP 429 "
                "(Model is overloaded)",
                backend=self.name,
                status=429,
            )
        prompt_tokens = sum(len(_WORD.findall(m.content)) + 1 for m in messages)
        if prompt_tokens > self.max_input_tokens:
            raise BackendRejected(
                f"backend {self.name!r} rejected the request: {prompt_tokens} prompt tokens, over its "
                f"max_input_tokens={self.max_input_tokens}",
                backend=self.name,
                status=422,
            )
        self.calls.append(GenerateCall(tuple(messages), params))
        self.in_flight += 1
        self.started.set()
        started = time.perf_counter()
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if self.gate is not None:
                await self.gate.wait()
            step = self.script.popleft() if self.script else None
            if isinstance(step, BaseException):
                raise step
            text = step if step is not None else self._text(messages, params)
            words = _WORD.findall(text)
            kept = words[: params.max_new_tokens]
            if token_latency_s:
                await asyncio.sleep(token_latency_s * len(kept))
        finally:
            self.in_flight -= 1
        return Generation(
            text=" ".join(kept),
            backend=self.name,
            generated_tokens=len(kept),
            prompt_tokens=prompt_tokens,
            latency_s=time.perf_counter() - started,
            finish_reason="length" if len(words) > len(kept) else "stop",
        )

    async def info(self) -> BackendInfo:
        if self.unreachable:
            raise BackendUnavailable(f"backend {self.name!r}: GET /info failed to connect", backend=self.name)
        return BackendInfo(
            model_id=self.model_id,
            max_input_tokens=self.max_input_tokens,
            max_total_tokens=self.max_total_tokens,
            max_concurrent_requests=self.max_concurrent_requests,
        )

    async def aclose(self) -> None:
        self.closed = True

    async def __aenter__(self) -> FakeGenerator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _text(self, messages: Sequence[ChatMessage], params: GenerationParams) -> str:
        return self.reply if isinstance(self.reply, str) else self.reply(messages, params)


class FakeProbe:
    """Implements ``infra.protocols.QueueDepthProbe``; a backend never set is absent, as never scraped."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: dict[str, QueueDepth] = {}
        self.closed = False

    def set_depth(
        self,
        backend: str,
        waiting: float = 0.0,
        running: float = 0.0,
        *,
        healthy: bool = True,
        age_s: float = 0.0,
    ) -> None:
        self._samples[backend] = QueueDepth(
            backend=backend, waiting=waiting, running=running, at=self._clock() - age_s, healthy=healthy
        )

    def idle(self, *backends: str) -> None:
        for backend in backends:
            self.set_depth(backend)

    def forget(self, backend: str) -> None:
        self._samples.pop(backend, None)

    def snapshot(self) -> Mapping[str, QueueDepth]:
        return MappingProxyType(dict(self._samples))

    async def aclose(self) -> None:
        self.closed = True


@dataclass(frozen=True, slots=True)
class SentRecord:
    key: Any
    value: Any
    partition: int | None


class FakeTopic:
    """What the agents use of ``faust.TopicT``. ``sent`` holds delivered records, in delivery order."""

    def __init__(self, name: str, *, journal: list[tuple[str, SentRecord]] | None = None) -> None:
        self.name = name
        self.sent: list[SentRecord] = []
        self.journal = journal if journal is not None else []  # (topic, record), shared across topics
        self._failures: deque[BaseException] = deque()

    def get_topic_name(self) -> str:
        return self.name

    def fail_next(self, exc: BaseException) -> None:
        """The next send's delivery future fails with ``exc`` (the record is not delivered)."""
        self._failures.append(exc)

    @property
    def values(self) -> list[Any]:
        return [r.value for r in self.sent]

    async def send(
        self, *, key: Any = None, value: Any = None, partition: int | None = None, **_: Any
    ) -> Awaitable[RecordMetadata]:
        if isinstance(value, faust.Record):
            value.dumps()  # must be serialisable with its own codec, as the producer would
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        if self._failures:
            future.set_exception(self._failures.popleft())
            return future
        offset = len(self.sent)
        record = SentRecord(key=key, value=value, partition=partition)
        self.sent.append(record)
        self.journal.append((self.name, record))
        p = partition if partition is not None else 0
        future.set_result(RecordMetadata(self.name, p, TP(self.name, p), offset, time.time(), 0))
        return future


def fake_topics(settings: Settings) -> Topics:
    """A ``Topics`` of ``FakeTopic``s named as ``settings`` would name the real ones, sharing one
    ``journal`` (every delivery in order, across topics)."""
    journal: list[tuple[str, SentRecord]] = []
    made = {name: FakeTopic(settings.topic(name), journal=journal) for name in TOPIC_NAMES}
    return Topics(**{name.replace("-", "_"): cast("faust.TopicT", topic) for name, topic in made.items()})


class FakeTopicDirectory:
    """``infra.topics.TopicDirectory`` without a broker: topics exist when listed in ``known``."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        self.known = set(known)
        self.closed = False

    async def exists(self, topic: str) -> bool:
        return topic in self.known

    async def aclose(self) -> None:
        self.closed = True


def fake_factories(
    *,
    embedder: Embedder | None = None,
    store: VectorStore | None = None,
    generators: Sequence[Generator] = (),
    probe: QueueDepthProbe | None = None,
    answered: FakeAnsweredFeed | None = None,
) -> AdapterFactories:
    """``AdapterFactories`` that hand out the given adapters; a missing embedder or store fails to open."""

    async def open_embedder(settings: Settings) -> Embedder:
        if embedder is None:
            raise DependencyUnavailable("no embedder in this test (the fake factory models it as down)")
        return embedder

    async def open_store(settings: Settings) -> VectorStore:
        if store is None:
            raise DependencyUnavailable("no vector store in this test (the fake factory models it as down)")
        return store

    async def open_generators(settings: Settings) -> Mapping[str, Generator]:
        return {g.name: g for g in generators}

    async def open_probe(settings: Settings) -> QueueDepthProbe:
        return probe if probe is not None else FakeProbe()

    feed = answered if answered is not None else FakeAnsweredFeed()

    async def open_answered(settings: Settings) -> AnsweredFeed:
        return feed

    return AdapterFactories(open_embedder, open_store, open_generators, open_probe, open_answered)


@dataclass(frozen=True)
class AgentHarness:
    settings: Settings
    app: faust.App
    app_topics: Topics  # the app's real topics (what registered agents read)
    topics: Topics  # FakeTopics, for shell classes built in the test
    resources: Resources
    state: DecisionState

    def topic(self, name: str) -> FakeTopic:
        """The fake topic for a logical name (``replies``, ``log``, ``model-updates``, ...)."""
        return cast("FakeTopic", getattr(self.topics, name.replace("-", "_")))


@asynccontextmanager
async def agent_harness(
    settings: Settings,
    factories: AdapterFactories,
    *,
    agents: tuple[str, ...] = (),
    known_topics: Iterable[str] = (),
) -> AsyncIterator[AgentHarness]:
    """A worker built by ``build_app`` (registering only ``agents``) with its ``Resources`` started."""
    built = build_app(settings, factories=factories, agents=agents)
    resources = built.resources
    resources.topic_directory = cast("Any", FakeTopicDirectory(known_topics))
    await resources.start()
    try:
        yield AgentHarness(
            settings=settings,
            app=built.app,
            app_topics=built.topics,
            topics=fake_topics(settings),
            resources=resources,
            state=built.state,
        )
    finally:
        await resources.stop()
