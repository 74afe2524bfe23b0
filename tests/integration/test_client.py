"""``EchoClient`` against a real local broker (Tansu): bounded memory and resuming the reply topic.

No worker runs: requests stay unanswered unless the test writes a reply itself, with a plain producer,
exactly as a worker would (a JSON object keyed by request id on the reply topic).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from devstack.localstack import TansuBroker, create_topics
from devstack.process import free_port
from echolm.client import EchoClient, Reply
from infra.errors import ClientOverloaded, ClientTimeout
from infra.settings import Settings, load_settings

pytestmark = pytest.mark.integration

_SENDS = 3_000
_MAX_OUTSTANDING = 300
_REMEMBER = 500


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TansuBroker]:
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    tansu = TansuBroker(port=free_port(), log_path=log_path)
    try:
        await tansu.start()
    except Exception as exc:  # every test here needs it
        pytest.skip(f"the Tansu broker could not start: {exc}")
    yield tansu
    await tansu.stop()


async def _settings(broker: TansuBroker, tmp_path: Path, **client: object) -> Settings:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": prefix, "partitions": 2},
        client={"max_outstanding": _MAX_OUTSTANDING, "remember_answered": _REMEMBER,
                "remember_expired": _REMEMBER, "reply_grace_s": 0.0, **client},
        stack={"data_dir": str(tmp_path)},
    )  # fmt: skip
    names = ("requests", "replies", "replies.private", "feedback")
    await create_topics(broker.bootstrap_servers, {settings.topic(name): 2 for name in names})
    return settings


async def _reply(settings: Settings, topic: str, *request_ids: str) -> None:
    """Write one worker-shaped reply per id to ``topic``."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for request_id in request_ids:
            body = {"request_id": request_id, "tenant": "t", "ok": True, "text": f"answer {request_id}"}
            await producer.send_and_wait(topic, orjson.dumps(body), key=request_id.encode())
    finally:
        await producer.stop()


async def _wait_for(condition: object, what: str, polls: int = 600) -> None:
    for _ in range(polls):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


async def test_unanswered_requests_expire_and_late_replies_are_dropped_and_counted(
    broker: TansuBroker, tmp_path: Path
) -> None:
    settings = await _settings(broker, tmp_path)
    largest: dict[str, int] = {}
    refused = 0
    async with EchoClient(settings) as client:
        sent: list[str] = []
        for i in range(_SENDS):
            for _ in range(400):  # a refused send waits for expiries to free a slot (20 s at most)
                try:
                    sent.append(await client.send(f"prompt {i}", tenant="t", expires_in_s=0.2))
                    break
                except ClientOverloaded:
                    refused += 1
                    await asyncio.sleep(0.05)
            else:
                pytest.fail(f"send {i} refused for 20 s: nothing expires ({client.sizes()})")
            for name, size in client.sizes().items():
                largest[name] = max(largest.get(name, 0), size)
        await _wait_for(lambda: client.outstanding == 0, "every request to expire")

        # An ask() that times out leaves nothing behind.
        with pytest.raises(ClientTimeout):
            await client.ask("no one answers", tenant="t", timeout=0.3)
        asked = client.expired

        # Replies that come after their request expired: dropped, counted, never queued.
        late = sent[-50:]
        await _reply(settings, settings.topic("replies"), *late)
        await _wait_for(lambda: client.late_replies == len(late), "the late replies to be counted")
        final = client.sizes()
        assert client.expired == asked == _SENDS + 1
        assert [reply async for reply in client.replies(timeout=0.3)] == []

    assert largest["outstanding"] <= _MAX_OUTSTANDING
    assert largest["expiries"] <= 2 * _MAX_OUTSTANDING + 64
    assert largest["expired"] <= _REMEMBER
    assert largest["waiters"] == 0
    assert largest["unread"] == 0
    assert final == {"outstanding": 0, "expiries": 0, "answered": 0, "expired": _REMEMBER,
                     "waiters": 0, "unread": 0, "streams": 0}  # fmt: skip
    print(f"sent {_SENDS}, refused {refused} times at the cap, largest structures {largest}")


async def test_a_restarted_client_resumes_its_reply_topic_where_it_stopped(
    broker: TansuBroker, tmp_path: Path
) -> None:
    settings = await _settings(broker, tmp_path, group_id=f"client-{uuid.uuid4().hex[:8]}")
    topic = settings.topic("replies.private")

    async with EchoClient(settings, reply_topic=topic) as first:
        ids = [await first.send(f"prompt {i}", tenant="t") for i in range(6)]
        await _reply(settings, topic, *ids[:3])
        got_first = [reply.request_id async for reply in _take(first, 3)]
    assert sorted(got_first) == sorted(ids[:3])

    await _reply(settings, topic, *ids[3:5])  # while no client runs

    async with EchoClient(settings, reply_topic=topic) as second:
        await _reply(settings, topic, ids[5])  # after the restart
        got_second = [reply.request_id async for reply in _take(second, 3)]
        assert [reply async for reply in second.replies(timeout=0.5)] == []
    assert sorted(got_second) == sorted(ids[3:])
    assert first.commit_failures == second.commit_failures == 0


async def _take(client: EchoClient, n: int) -> AsyncIterator[Reply]:
    taken = 0
    async for reply in client.replies(timeout=15.0):
        yield reply
        taken += 1
        if taken == n:
            return
