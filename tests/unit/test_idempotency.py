"""No second generation: the bounded ``AnsweredMap``, the ``on_arrival`` decision (pure), and serve's
idempotency guard end to end on fakes: a takeover re-sends a stored answer instead of generating, a
twin of a request in flight waits for it, error replies are not recorded, and the switch turns it off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from agents.policy.idempotency import ENTRY_OVERHEAD_BYTES, Answered, AnsweredMap, Arrival, on_arrival
from agents.serve import Server
from infra.settings import Settings, load_settings
from streams.records import AnsweredRecord, PreparedRecord, ReplyRecord, RequestRecord
from tests.fakes.answered import FakeAnsweredFeed
from tests.fakes.backends import AgentHarness, FakeGenerator, FakeProbe, agent_harness, fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore

SMALL, LARGE = "small-0", "large-0"


# ---------------------------------------------------------------------------------------- pure
@pytest.mark.parametrize(
    ("stored", "in_progress", "action"),
    [
        (Answered(b"x", 1.0), False, Arrival.RESEND),
        (Answered(b"x", 1.0), True, Arrival.RESEND),  # answered meanwhile: never wait for a twin then
        (None, True, Arrival.WAIT),
        (None, False, Arrival.GENERATE),
    ],
)
def test_on_arrival(stored: Answered | None, in_progress: bool, action: Arrival) -> None:
    assert on_arrival(stored, in_progress=in_progress) is action


def test_map_remembers_until_the_horizon() -> None:
    answers = AnsweredMap(max_entries=10, max_bytes=1 << 20, horizon_s=60.0)
    assert answers.put("a", b"reply-a", answered_at=1000.0, now=1000.0)
    assert answers.get("a", now=1059.0) == Answered(b"reply-a", 1000.0)
    assert answers.get("a", now=1061.0) is None  # past the horizon: gone, and counted
    assert len(answers) == 0 and answers.nbytes == 0 and answers.expired == 1
    assert not answers.put("old", b"v", answered_at=900.0, now=1000.0)  # read late from the topic
    assert "old" not in answers and answers.expired == 2


def test_map_drops_the_oldest_past_the_entry_bound() -> None:
    answers = AnsweredMap(max_entries=3, max_bytes=1 << 20, horizon_s=600.0)
    for i in range(5):
        answers.put(f"r{i}", b"v", answered_at=100.0 + i, now=105.0)
    assert len(answers) == 3 and answers.evicted == 2
    assert [answers.get(f"r{i}", now=105.0) is not None for i in range(5)] == [False, False, True, True, True]


def test_map_drops_the_oldest_past_the_byte_bound() -> None:
    value = b"v" * 100
    cost = AnsweredMap.cost("r0", value)
    assert cost == 100 + 2 + ENTRY_OVERHEAD_BYTES
    answers = AnsweredMap(max_entries=1000, max_bytes=3 * cost, horizon_s=600.0)
    for i in range(10):
        answers.put(f"r{i}", value, answered_at=100.0, now=100.0)
        assert answers.nbytes <= 3 * cost
    assert len(answers) == 3 and answers.evicted == 7
    assert not answers.put("huge", b"v" * (3 * cost), answered_at=100.0, now=100.0)  # larger than it all
    assert len(answers) == 3


def test_map_replaces_a_second_answer_and_keeps_its_byte_count() -> None:
    answers = AnsweredMap(max_entries=10, max_bytes=1 << 20, horizon_s=600.0)
    answers.put("a", b"first", answered_at=1.0, now=1.0)
    answers.put("a", b"second answer", answered_at=2.0, now=2.0)
    assert len(answers) == 1 and answers.nbytes == AnsweredMap.cost("a", b"second answer")
    stored = answers.get("a", now=2.0)
    assert stored is not None and stored.value == b"second answer"
    answers.discard("a")
    assert answers.nbytes == 0


def test_expire_drops_from_the_old_end() -> None:
    answers = AnsweredMap(max_entries=100, max_bytes=1 << 20, horizon_s=10.0)
    for i in range(20):
        answers.put(f"r{i}", b"v", answered_at=float(i), now=float(i))
    assert len(answers) == 11  # put() expires as it goes: r9..r19 are within 10 s of t=19
    assert answers.expire(now=25.0) == 6 and len(answers) == 5


def test_100k_answers_stay_within_both_bounds() -> None:
    answers = AnsweredMap(max_entries=20_000, max_bytes=4 * 1024 * 1024, horizon_s=3600.0)
    largest = 0
    for i in range(100_000):
        answers.put(f"{i:036d}", b"x" * 300, answered_at=float(i) / 100, now=float(i) / 100)
        largest = max(largest, answers.nbytes)
    assert len(answers) <= 20_000 and largest <= 4 * 1024 * 1024
    assert answers.evicted == 100_000 - len(answers)


def test_the_map_refuses_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="horizon_s > 0"):
        AnsweredMap(max_entries=1, max_bytes=1, horizon_s=0)


# ----------------------------------------------------------------------------- serve, on fakes
def _settings(**idempotency: Any) -> Settings:
    return load_settings(
        kafka={"topic_prefix": "unit"},
        worker={"metrics_port": 0, "concurrency": 4},
        idempotency=idempotency,
    )


class Worker:
    """A Server on fake backends (every request is routed to one of them) and a fake answered feed."""

    def __init__(self, harness: AgentHarness, small: FakeGenerator, large: FakeGenerator) -> None:
        self.h, self.small, self.large = harness, small, large
        self.server = Server(harness.app, harness.topics, harness.resources, harness.state)

    @property
    def generations(self) -> int:
        return len(self.small.calls) + len(self.large.calls)

    def sent(self, topic: str) -> list[Any]:
        return list(self.h.topic(topic).values)

    def metric(self, result: str) -> float:
        registry = self.h.resources.metrics.registry
        return registry.get_sample_value("echolm_idempotency_total", {"result": result}) or 0.0


@asynccontextmanager
async def worker(feed: FakeAnsweredFeed, **idempotency: Any) -> AsyncIterator[Worker]:
    small, large = FakeGenerator(SMALL, reply="small answer"), FakeGenerator(LARGE, reply="large answer")
    probe = FakeProbe()
    probe.idle(SMALL, LARGE)
    factories = fake_factories(
        embedder=FakeEmbedder(384), store=FakeVectorStore(384), generators=[small, large], probe=probe,
        answered=feed,
    )  # fmt: skip
    async with agent_harness(_settings(**idempotency), factories) as harness:
        yield Worker(harness, small, large)


def _prepared(request_id: str, **request: Any) -> PreparedRecord:
    """A prepared record with no examples and no embedding (the router sees an empty context)."""
    return PreparedRecord(
        request=RequestRecord(
            request_id=request_id,
            tenant="acme",
            prompt=f"Question {request_id}?",
            max_new_tokens=4,
            reply_topic="unit.replies",
            deadline_at=time.time() + 60.0,
            **request,
        ),
        embedding="",
        examples=[],
    )


async def test_a_takeover_resends_the_stored_reply_instead_of_generating() -> None:
    feed = FakeAnsweredFeed()
    async with worker(feed) as first:
        await first.server.handle(_prepared("r1"))
        (answered,) = first.sent("answered")
        (reply,) = first.sent("replies")
        assert isinstance(answered, AnsweredRecord) and answered.reply == reply
        assert first.generations == 1
        # the same request again on the same worker (a re-processed prepare): re-sent, not generated
        await first.server.handle(_prepared("r1"))
        assert first.generations == 1 and first.sent("replies") == [reply, reply]
        assert len(first.sent("answered")) == 1 and len(first.sent("log")) == 1
        assert first.metric("resent") == 1
    # The first worker dies; what it wrote on the answered topic is all a new worker knows.
    feed = FakeAnsweredFeed()
    feed.publish("r1", answered.dumps(), answered.answered_at)
    async with worker(feed) as second:
        await second.server.handle(_prepared("r1"))
        assert second.generations == 0, "the takeover generated an answered request again"
        assert second.sent("replies") == [reply] and second.sent("log") == []
        assert reply.worker == first.h.resources.worker_id  # the stored reply, as it was
        assert second.metric("resent") == 1 and feed.catch_ups == 1
        await second.server.handle(_prepared("r2"))  # a new request is generated as usual
        assert second.generations == 1 and len(second.sent("answered")) == 1


async def test_a_twin_in_flight_waits_for_the_first_and_is_not_generated() -> None:
    async with worker(FakeAnsweredFeed()) as w:
        gate = asyncio.Event()
        for g in (w.small, w.large):
            g.gate = gate
        first = asyncio.create_task(w.server.handle(_prepared("twin")))
        for _ in range(100):  # until the first is generating (held at the gate)
            if w.generations:
                break
            await asyncio.sleep(0)
        assert w.generations == 1
        second = asyncio.create_task(w.server.handle(_prepared("twin")))
        for _ in range(20):
            await asyncio.sleep(0)
        assert w.metric("waited") == 1 and not second.done()
        gate.set()
        await asyncio.gather(first, second)
        assert w.generations == 1
        assert [r.request_id for r in w.sent("replies")] == ["twin", "twin"]
        assert w.metric("resent") == 1


async def test_an_error_reply_is_not_recorded_so_a_redelivery_is_served() -> None:
    async with worker(FakeAnsweredFeed()) as w:
        for g in (w.small, w.large):
            g.unreachable = True
        await w.server.handle(_prepared("r1"))
        (error,) = w.sent("replies")
        assert isinstance(error, ReplyRecord) and not error.ok
        assert w.sent("answered") == []
        for g in (w.small, w.large):
            g.unreachable = False
        await w.server.handle(_prepared("r1"))
        assert [r.ok for r in w.sent("replies")] == [False, True] and len(w.sent("answered")) == 1


async def test_disabled_generates_every_delivery() -> None:
    feed = FakeAnsweredFeed()
    async with worker(feed, enabled=False) as w:
        await w.server.handle(_prepared("r1"))
        await w.server.handle(_prepared("r1"))
        assert w.generations == 2 and w.sent("answered") == [] and feed.catch_ups == 0


async def test_a_rebalance_makes_the_next_request_catch_up_again() -> None:
    feed = FakeAnsweredFeed()
    async with worker(feed) as w:
        await w.server.handle(_prepared("r1"))
        await w.server.handle(_prepared("r2"))
        assert feed.catch_ups == 1  # once at start
        other = AnsweredRecord(
            request_id="r3",
            reply_topic="unit.replies",
            reply=ReplyRecord(request_id="r3", tenant="acme", ok=True, text="t", worker="other:1"),
            answered_at=0.0,
        )
        feed.publish("r3", other.dumps())  # another worker answered r3, then died
        await w.server.idempotency.on_partitions_assigned(w.h.app, assigned=set())
        await w.server.handle(_prepared("r3"))
        assert feed.catch_ups == 2
        assert w.generations == 2 and w.sent("replies")[-1].worker == "other:1"


# ------------------------------------------------------------------- the transactional option
@pytest.mark.parametrize(
    ("guarantee", "isolation"), [("at_least_once", None), ("exactly_once", "read_committed")]
)
def test_processing_guarantee_reaches_faust_and_every_reader(guarantee: str, isolation: str | None) -> None:
    """Off by default; on, faust runs transactional producers and every aiokafka reader (client, answered
    feed, model sync, topic reads) skips aborted records. Tansu cannot run it: docs/reliability.md."""
    from faust.types.enums import ProcessingGuarantee

    from infra.answered import KafkaAnsweredFeed
    from infra.kafka import kafka_consumer_kwargs
    from streams.app import build_faust_app

    s = load_settings(kafka={"topic_prefix": "unit", "processing_guarantee": guarantee})
    app, _ = build_faust_app(s)
    assert app.conf.processing_guarantee is ProcessingGuarantee(guarantee)
    assert kafka_consumer_kwargs(s).get("isolation_level") == isolation
    assert KafkaAnsweredFeed(s)._consumer_kwargs().get("isolation_level") == isolation
    assert load_settings().kafka.processing_guarantee == "at_least_once"
