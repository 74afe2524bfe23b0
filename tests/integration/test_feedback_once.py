"""A redelivered rating reaches the models once: ``ModelSync`` (agents/models.py) reading a real
``model-updates`` topic on a local Tansu broker, across a worker restart from its checkpoint.

The duplicate is what ``learn`` publishes when its feedback record is delivered again (a crash before
the offset commit, a rebalance): a second, identical ``ModelUpdateRecord`` on the topic.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from agents.models import ModelSync
from agents.policy.routing import CONTEXT_DIM
from agents.state import DecisionState
from devstack.localstack import TansuBroker, create_topics
from devstack.process import free_port
from infra.resources import Resources
from infra.settings import Settings, load_settings
from streams.codecs import register_codecs
from streams.records import ModelUpdateRecord

pytestmark = pytest.mark.integration
register_codecs()


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TansuBroker]:
    tansu = TansuBroker(port=free_port(), log_path=tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        await tansu.start()
    except Exception as exc:  # every test here needs it
        pytest.skip(f"the Tansu broker could not start: {exc}")
    yield tansu
    await tansu.stop()


def _rating(request_id: str, rater: str) -> bytes:
    context = [0.0] * CONTEXT_DIM
    context[0] = 1.0
    record = ModelUpdateRecord(request_id=request_id, tier="small", context=context, reward=1.0, rater=rater)
    return record.dumps()


async def _publish(settings: Settings, topic: str, *values: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"t")
    finally:
        await producer.stop()


async def _sync_until(settings: Settings, topic: str, state: DecisionState, offset: int) -> None:
    """Run one worker's ModelSync until it has read ``topic`` up to ``offset``, then stop it."""
    sync = ModelSync(topic, Resources(settings), state)
    await sync.start()
    try:
        for _ in range(600):
            if state.applied_offset >= offset:
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"ModelSync read up to offset {state.applied_offset}, not {offset}")
    finally:
        await sync.stop()


async def test_a_redelivered_rating_is_applied_once_also_after_a_restart(
    broker: TansuBroker, tmp_path: Path
) -> None:
    settings = load_settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": f"t{uuid.uuid4().hex[:8]}"},
        routing={"state_path": str(tmp_path / "bandit.json")},
    )
    topic = settings.topic("model-updates")
    await create_topics(broker.bootstrap_servers, {topic: 1})

    await _publish(settings, topic, _rating("r1", "alice"), _rating("r1", "alice"), _rating("r1", "bob"))
    state = DecisionState.create(settings)
    await _sync_until(settings, topic, state, 2)
    assert state.bandit.observations("small") == 2  # alice once, bob once
    assert state.duplicate_ratings == 1
    state.save()

    # The worker restarts from its checkpoint; alice's feedback is delivered once more meanwhile.
    await _publish(settings, topic, _rating("r1", "alice"), _rating("r2", "alice"))
    restarted = DecisionState.create(settings)
    assert restarted.applied_offset == 2
    await _sync_until(settings, topic, restarted, 4)
    assert restarted.bandit.observations("small") == 3  # + r2 by alice; r1 by alice not again
    assert restarted.duplicate_ratings == 1

    # A worker without a checkpoint replays the whole topic and reaches the same state.
    fresh = DecisionState.create(settings.model_copy(update={"routing": settings.routing.model_copy(
        update={"state_path": None})}))  # fmt: skip
    await _sync_until(settings, topic, fresh, 4)
    assert fresh.bandit.to_dict() == restarted.bandit.to_dict()
