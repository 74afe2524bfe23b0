"""``agents.serve`` for a streaming request: reply chunks on the reply topic as tokens arrive, the
final reply and the log record as for any request, and a retry after a partial stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from echolm.streaming import StreamAssembler
from infra.errors import BackendUnavailable, StreamDiverged
from streams.records import LogRecord, ReplyChunkRecord, ReplyRecord
from tests.fakes.backends import FakeGenerator, FakeProbe, agent_harness, fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore
from tests.unit.test_agents_serve import DIM, LARGE, SMALL, Fleet, prepared, settings

ANSWER = "one two three four five"


@asynccontextmanager
async def streaming_fleet(window_s: float, **tgi: Any) -> AsyncIterator[Fleet]:
    small, large = FakeGenerator(SMALL, reply=ANSWER), FakeGenerator(LARGE, reply=ANSWER)
    probe = FakeProbe()
    probe.idle(SMALL, LARGE)
    factories = fake_factories(
        embedder=FakeEmbedder(DIM), store=FakeVectorStore(DIM), generators=[small, large], probe=probe
    )
    base = settings(**tgi)
    worker = base.worker.model_copy(update={"stream_window_s": window_s})
    async with agent_harness(base.model_copy(update={"worker": worker}), factories, agents=("serve",)) as h:
        yield Fleet(h, small, large, probe)


async def _serve(fleet: Fleet, *, stream: bool = True) -> tuple[list[ReplyChunkRecord], ReplyRecord]:
    record = await prepared()
    record.request.stream = stream
    await fleet.server.handle(record)
    values = fleet.replies.values
    chunks = [v for v in values if isinstance(v, ReplyChunkRecord)]
    finals = [v for v in values if isinstance(v, ReplyRecord)]
    assert len(finals) == 1 and values[-1] is finals[0]  # every chunk goes before the final reply
    assert {r.key for r in fleet.replies.sent} == {record.request.request_id}  # keyed: one partition
    return chunks, finals[0]


async def test_a_streaming_request_sends_ordered_chunks_then_the_whole_reply() -> None:
    async with streaming_fleet(0.0) as fleet:
        chunks, reply = await _serve(fleet)
    assert [c.text for c in chunks] == ["one", " two", " three", " four", " five"]
    assert [c.seq for c in chunks] == [0, 1, 2, 3, 4] and len({c.attempt for c in chunks}) == 1
    assert reply.ok and reply.text == ANSWER and reply.kind == "reply"
    assert (reply.completion_tokens, reply.finish_reason) == (5, "stop") and reply.prompt_tokens > 0
    logged = fleet.log.values[0]
    assert isinstance(logged, LogRecord) and logged.reply.text == ANSWER and logged.generated_tokens == 5


async def test_the_window_bounds_the_chunks_a_request_sends() -> None:
    async with streaming_fleet(60.0) as fleet:  # tokens come at once: the first alone, the rest together
        chunks, reply = await _serve(fleet)
    assert [c.text for c in chunks] == ["one", " two three four five"] and reply.text == ANSWER


async def test_a_request_that_does_not_stream_sends_only_its_reply() -> None:
    async with streaming_fleet(0.0) as fleet:
        chunks, reply = await _serve(fleet, stream=False)
    assert chunks == [] and reply.text == ANSWER and reply.finish_reason == "stop"


async def _retried(fleet: Fleet) -> tuple[list[ReplyChunkRecord], ReplyRecord]:
    """The large backend fails after streaming two words; serve retries on the small one."""
    fleet.large.break_stream(2, BackendUnavailable("connection reset", backend=LARGE))
    chunks, reply = await _serve(fleet)
    assert reply.backend == SMALL and len(fleet.large.calls) == 1
    return chunks, reply


def _shown(chunks: list[ReplyChunkRecord], reply: ReplyRecord) -> str:
    reader = StreamAssembler()
    return "".join(reader.chunk(c.attempt, c.seq, c.text) for c in chunks) + reader.final(reply.text)


async def test_a_retry_after_a_partial_stream_never_shows_text_twice() -> None:
    async with streaming_fleet(0.0) as fleet:
        chunks, reply = await _retried(fleet)
    attempts = list(dict.fromkeys(c.attempt for c in chunks))
    assert len(attempts) == 2  # the retry is a new sequence
    assert [c.seq for c in chunks if c.attempt == attempts[1]] == [0, 1, 2, 3, 4]
    assert "".join(c.text for c in chunks) == "one two" + ANSWER  # what a naive reader would show
    assert _shown(chunks, reply) == ANSWER == reply.text


async def test_a_retry_that_generates_other_text_is_reported_not_mixed() -> None:
    async with streaming_fleet(0.0) as fleet:
        fleet.small.reply = "something else entirely"
        chunks, reply = await _retried(fleet)
    assert reply.text == "something else entirely"
    with pytest.raises(StreamDiverged):
        _shown(chunks, reply)
