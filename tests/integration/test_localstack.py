"""The no-Docker local stack: Tansu broker, topics, a produce/consume round trip, Milvus restarts.

These tests start their own services (a broker is ready in about 0.1 s); they do not use the
session-wide ``local_stack`` fixture, so they stay fast and independent of the dev TGI servers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from devstack.localstack import (
    LocalStack,
    LocalStackError,
    MilvusServer,
    TansuBroker,
    create_topics,
    free_port,
)
from infra.settings import Settings, load_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TansuBroker]:
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    async with TansuBroker(port=free_port(), log_path=log_path) as running:
        yield running


def milvus_binary_runs(pid: int) -> bool:
    try:
        return "milvus" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return False


def unique(name: str) -> str:
    return f"{name}.{uuid.uuid4().hex[:8]}"


async def test_broker_is_up_and_start_stop_are_idempotent(broker: TansuBroker) -> None:
    assert broker.running
    await broker.start()  # no second process
    assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
    assert "ready" in broker.log_path.read_text()


async def test_topics_get_the_requested_partitions_and_creation_is_idempotent(broker: TansuBroker) -> None:
    wanted = {unique("requests"): 4, unique("replies"): 1, unique("log"): 3}
    assert await create_topics(broker.bootstrap_servers, wanted) == wanted
    changed = dict.fromkeys(wanted, 2)
    assert await create_topics(broker.bootstrap_servers, changed) == wanted  # existing topics are left alone
    assert await create_topics(broker.bootstrap_servers, {}) == {}


async def test_produce_consume_round_trip(broker: TansuBroker) -> None:
    topic = unique("roundtrip")
    await create_topics(broker.bootstrap_servers, {topic: 2})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, max_batch_size=16384)
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(
                topic, f"value-{i}".encode(), key=f"key-{i}".encode(), headers=[("n", b"%d" % i)]
            )
            for i in range(6)
        ]
    finally:
        await producer.stop()
    assert {m.partition for m in sent} <= {0, 1}
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        group_id=unique("group"),
        auto_offset_reset="earliest",
        session_timeout_ms=2000,
        heartbeat_interval_ms=300,
    )
    await consumer.start()
    try:
        received: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(20):
            while len(received) < 6:
                batch = await consumer.getmany(timeout_ms=500)
                received += [m for messages in batch.values() for m in messages]
        await consumer.commit()
    finally:
        await consumer.stop()
    by_key = {m.key: (m.value, m.headers) for m in received}
    assert by_key == {f"key-{i}".encode(): (f"value-{i}".encode(), (("n", b"%d" % i),)) for i in range(6)}


async def test_a_taken_port_is_reported(broker: TansuBroker, tmp_path: Path) -> None:
    with pytest.raises(LocalStackError, match="in use"):
        await TansuBroker(port=broker.port, log_path=tmp_path / "second.log").start()


async def test_lite_stack_gives_workers_their_settings(tmp_path: Path) -> None:
    base = load_settings(stack={"data_dir": str(tmp_path)})
    topics = {unique("requests"): 3}
    messages: list[str] = []
    async with LocalStack(
        base, milvus="lite", backends=False, ephemeral=True, topics=topics, progress=messages.append
    ) as stack:
        settings = stack.apply()
        assert settings.kafka.bootstrap_servers == stack.bootstrap_servers != base.kafka.bootstrap_servers
        assert settings.milvus.uri == str(stack.data_dir / "milvus.db")
        assert settings.tgi == base.tgi  # no backends started, none rewired
        assert Settings(**stack.overrides()).milvus.uri == settings.milvus.uri
        assert stack.environment()["ECHOLM_KAFKA__BOOTSTRAP_SERVERS"] == stack.bootstrap_servers
        assert await create_topics(stack.bootstrap_servers, topics) == topics
    await stack.stop()  # idempotent
    assert not stack.broker.running
    assert any("ready" in m for m in messages)


async def test_backend_urls_follow_the_ports(tmp_path: Path) -> None:
    stack = LocalStack(load_settings(stack={"data_dir": str(tmp_path), "backend_ports": [28081, 28082]}))
    urls = stack.backend_urls()
    assert urls == {"small-0": "http://127.0.0.1:28081", "large-0": "http://127.0.0.1:28082"}
    applied = stack.apply()
    assert [b.url for b in applied.tgi.backends] == list(urls.values())
    assert json.loads(stack.environment()["ECHOLM_TGI__BACKENDS"])[1]["url"] == urls["large-0"]


@pytest.mark.timeout(300)  # two server starts and a restart recovery: about 55 s on 2 busy cores
async def test_milvus_server_keeps_data_and_reaps_a_leftover_binary(tmp_path: Path) -> None:
    """Kill the supervisor child with SIGKILL (its binary lives on), then start again on the same folder."""
    from infra.milvus import MilvusExampleStore
    from infra.protocols import Example
    from infra.settings import MilvusSettings

    port = free_port()
    first = MilvusServer(data_dir=tmp_path / "milvus", port=port)
    try:
        await first.start()
    except LocalStackError as exc:
        pytest.skip(f"the embedded Milvus server did not start: {exc}")
    settings = MilvusSettings(uri=first.uri, dimension=8, collection="kept")
    async with MilvusExampleStore(settings) as store:
        await store.upsert([Example("e1", "acme", "q", "a", np.ones(8, dtype=np.float32))])
    info = json.loads(first.ready_file.read_text())
    os.kill(info["supervisor_pid"], signal.SIGKILL)
    await first.stop()  # reaps the child; the orphaned binary is killed by the reaper
    second = MilvusServer(data_dir=tmp_path / "milvus", port=port)
    await second.start()
    try:
        assert not milvus_binary_runs(info["server_pid"])
        async with MilvusExampleStore(settings) as store:
            assert [e.example_id for e in await store.get("acme", ["e1"])] == ["e1"]
    finally:
        await second.stop()
    assert not second.running
