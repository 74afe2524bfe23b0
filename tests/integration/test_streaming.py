"""Token streaming through Kafka on the real local stack (Tansu, embedded Milvus, dev TGI with SmolLM2):
``EchoClient.stream`` receives pieces while the worker is still generating, the pieces join to the
final reply, and the log holds the whole reply as for a request that does not stream."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from echolm.bank import read_log, read_topic
from echolm.client import EchoClient, Reply
from infra.settings import Settings
from streams.records import LogRecord

from .conftest import PipelineFactory

pytestmark = pytest.mark.integration


async def _logged(settings: Settings, request_id: str) -> LogRecord:
    for _ in range(60):
        for record in await read_log(settings):
            if record.request.request_id == request_id:
                return record
        await asyncio.sleep(0.5)
    raise AssertionError(f"no log record for {request_id}")


async def test_a_streamed_reply_arrives_in_pieces_before_the_generation_ends(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = await pipeline_factory(workers=1)
    settings = pipeline.settings
    async with EchoClient(settings) as client:
        received: list[tuple[float, str]] = []
        final: Reply | None = None
        async for delta in client.stream(
            messages=[{"role": "user", "content": "Count from one to thirty in words."}],
            tenant="acme",
            max_tokens=48,
            timeout=120,
        ):
            received.append((time.time(), delta.text))
            final = delta.reply
        assert final is not None and final.ok, final
        assert client.sizes()["streams"] == 0

    pieces = [text for _, text in received if text]
    assert len(pieces) > 2, pieces  # not one piece at the end
    assert "".join(pieces) == final.text  # in order, nothing twice, nothing missing
    assert final.completion_tokens > 0 and final.finish_reason in ("stop", "length")

    # the worker's own chunk records: the first piece reached the client before the last was produced
    chunks = [
        data
        for value in await read_topic(settings, settings.topic("replies"))
        if (data := orjson.loads(value)).get("request_id") == final.request_id and data.get("kind") == "chunk"
    ]
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and len({c["attempt"] for c in chunks}) == 1
    first_received = next(at for at, text in received if text)
    assert first_received < max(c["sent_at"] for c in chunks)

    logged = await _logged(settings, final.request_id)
    assert logged.request.stream and logged.reply.text == final.text  # the log sees the whole reply
