"""agents/guard.py: the in-order ack ledger, stage marks and the fault hook (pure), and the guard's
answer to a failing handler (an error reply and a dead letter with the stage; cancellation untouched)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import faust
import orjson
import pytest
from faust.types import Message

from agents.guard import AckGate, AckLedger, Guard, InjectedFault, current_stage, fault_id, mark
from agents.reject import Coordinates, Rejecter
from infra.settings import load_settings
from streams.records import ReplyAddress
from tests.fakes.backends import AgentHarness, agent_harness, fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore

DIM = 16


# ----------------------------------------------------------------------------------- the ack ledger
def test_records_are_released_in_offset_order_once_every_earlier_one_is_done() -> None:
    ledger: AckLedger[str] = AckLedger()
    for offset in (5, 6, 7):
        ledger.take("tp", offset, f"r{offset}")
    assert ledger.finish("tp", 6) == []  # 5 is still in flight: 6 must wait
    assert ledger.finish("tp", 7) == []
    assert ledger.finish("tp", 5) == ["r5", "r6", "r7"]
    assert ledger.pending() == 0


def test_an_unfinished_record_holds_back_its_partition_only() -> None:
    ledger: AckLedger[str] = AckLedger()
    ledger.take("a", 1, "a1")
    ledger.take("a", 2, "a2")
    ledger.take("b", 1, "b1")
    assert ledger.finish("a", 2) == []  # a1 was cut (never finished): a2 is never released
    assert ledger.finish("b", 1) == ["b1"]
    assert ledger.pending() == 2


def test_takes_out_of_order_and_redeliveries_keep_the_order() -> None:
    ledger: AckLedger[str] = AckLedger()
    ledger.take("tp", 11, "r11")  # a concurrent actor got there first
    ledger.take("tp", 10, "r10")
    ledger.take("tp", 11, "r11-again")  # the same offset again replaces the first
    assert ledger.finish("tp", 11) == []
    assert ledger.finish("tp", 10) == ["r10", "r11-again"]
    assert ledger.finish("tp", 12) == [] and ledger.finish("other", 1) == []


# ----------------------------------------------------------------------------- marks and faults
def test_mark_is_a_no_op_outside_a_guard() -> None:
    mark("embed", fault_id("embed", "x"))
    assert current_stage() is None


# ------------------------------------------------------------------------------------ the guard
@pytest.fixture
async def harness() -> AsyncIterator[AgentHarness]:
    settings = load_settings(
        kafka={"topic_prefix": "unit"}, worker={"metrics_port": 0, "fault_stages": ["embed", "emit"]}
    )
    factories = fake_factories(embedder=FakeEmbedder(DIM), store=FakeVectorStore(DIM))
    async with agent_harness(settings, factories, agents=("prepare",)) as h:
        yield h


def _guard(h: AgentHarness) -> Guard:
    return Guard(h.resources, Rejecter(h.app, h.topics, h.resources))


def _event(h: AgentHarness, offset: int, value: Any = b"{}") -> faust.EventT[Any]:
    message = Message("unit.prepared", 3, offset, time.time(), 0, [], b"k", value, None, tp=None)
    return faust.Event(h.app, b"k", value, [], message)


COORDS = Coordinates(topic="unit.prepared", partition=3, offset=42, key=b"r1")
ADDRESS = ReplyAddress(request_id="r1", tenant="acme", reply_topic="unit.replies")


async def test_a_raising_handler_gets_an_error_reply_and_a_dead_letter_with_the_stage(
    harness: AgentHarness,
) -> None:
    async def handler(_: str) -> None:
        mark("parse")
        mark("retrieve")
        raise KeyError("boom")

    assert await _guard(harness).run(handler, "x", coords=COORDS, address=ADDRESS, raw=b'{"a":1}') is False
    (letter,) = harness.topic("deadletter").values
    assert (letter.source_topic, letter.partition, letter.offset) == ("unit.prepared", 3, 42)
    assert letter.stage == "retrieve" and letter.request_id == "r1" and "KeyError" in letter.reason
    assert letter.value_preview == '{"a":1}'
    (reply,) = harness.topic("replies").values
    assert reply.request_id == "r1" and not reply.ok and reply.error is not None
    assert reply.error.code == "internal" and "retrieve" in reply.error.message
    metrics = harness.resources.metrics.registry
    assert metrics.get_sample_value("echolm_handler_failures_total", {"stage": "retrieve"}) == 1.0


async def test_a_failure_without_a_reply_address_is_only_dead_lettered(harness: AgentHarness) -> None:
    async def handler(_: str) -> None:
        mark("learn")
        raise ValueError("bad feedback")

    assert await _guard(harness).run(handler, "x", coords=COORDS, address=None) is False
    (letter,) = harness.topic("deadletter").values
    assert letter.stage == "learn" and letter.request_id == ""
    assert harness.topic("replies").values == []


async def test_a_record_answered_already_is_dead_lettered_by_id_without_a_reply(
    harness: AgentHarness,
) -> None:
    async def handler(_: str) -> None:
        mark("admit")
        raise RuntimeError("store bug")

    assert not await _guard(harness).run(handler, "x", coords=COORDS, address=ADDRESS, reply=False)
    (letter,) = harness.topic("deadletter").values
    assert (letter.stage, letter.request_id, letter.tenant) == ("admit", "r1", "acme")
    assert harness.topic("replies").values == []


async def test_cancellation_is_not_a_failure(harness: AgentHarness) -> None:
    async def handler(_: str) -> None:
        mark("generate")
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await _guard(harness).run(handler, "x", coords=COORDS, address=ADDRESS)
    assert harness.topic("deadletter").values == [] and harness.topic("replies").values == []


async def test_a_handler_that_returns_sends_nothing(harness: AgentHarness) -> None:
    seen: list[str | None] = []

    async def handler(_: str) -> None:
        mark("select")
        seen.append(current_stage())

    assert await _guard(harness).run(handler, "x", coords=COORDS, address=ADDRESS) is True
    assert seen == ["select"] and current_stage() is None
    assert harness.topic("deadletter").values == []


async def test_the_fault_hook_raises_only_at_its_stage_for_its_ids(harness: AgentHarness) -> None:
    stages: list[str] = []

    async def handler(request_id: str) -> None:
        for stage in ("parse", "embed", "emit"):
            mark(stage, request_id)
            stages.append(stage)

    guard = _guard(harness)
    assert await guard.run(handler, "plain", coords=COORDS, address=ADDRESS)
    assert await guard.run(handler, fault_id("parse", "1"), coords=COORDS, address=ADDRESS)  # not enabled
    assert not await guard.run(handler, fault_id("embed", "2"), coords=COORDS, address=ADDRESS)
    (letter,) = harness.topic("deadletter").values
    assert letter.stage == "embed" and InjectedFault.__name__ in letter.reason
    assert stages == ["parse", "embed", "emit"] * 2 + ["parse"]


async def test_a_batch_that_fails_is_retried_record_by_record(harness: AgentHarness) -> None:
    handled: list[list[int]] = []

    async def handler(events: Sequence[faust.EventT[Any]]) -> None:
        offsets = [e.message.offset for e in events]
        mark("embed", *(f"id{o}" if o != 2 else fault_id("embed", "x") for o in offsets))
        handled.append(offsets)

    events = [_event(harness, o, orjson.dumps({"request_id": f"id{o}", "tenant": "acme"})) for o in (1, 2, 3)]
    rejecter = Rejecter(harness.app, harness.topics, harness.resources)
    await _guard(harness).run_batch(handler, events, lambda e: rejecter.address_of(e.message.value))
    assert handled == [[1], [3]]  # the whole batch failed, then each alone: only offset 2 fails
    (letter,) = harness.topic("deadletter").values
    assert (letter.offset, letter.stage, letter.request_id) == (2, "embed", "id2")
    (reply,) = harness.topic("replies").values
    assert reply.request_id == "id2" and not reply.ok


# -------------------------------------------------------------------------------------- the gate
async def test_the_gate_keeps_faust_s_own_ack_from_committing_and_acks_in_order(
    harness: AgentHarness,
) -> None:
    gate = AckGate(lambda: harness.app.consumer)
    first, second = _event(harness, 7), _event(harness, 8)
    for event in (first, second):
        event.message.incref()  # the stream's own reference, as faust takes it on delivery
        gate.hold(event)
        event.ack()  # faust's finally when the loop body returns (or is cancelled)
    assert [e.message.acked for e in (first, second)] == [False, False]
    gate.release(second)
    assert [e.message.acked for e in (first, second)] == [False, False]  # 7 still in flight
    gate.release(first)
    assert [e.message.acked for e in (first, second)] == [True, True]
