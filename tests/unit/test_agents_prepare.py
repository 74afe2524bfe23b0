"""``agents.prepare``: parse -> embed -> retrieve -> select -> send, one batch of real faust events
at a time, with ``FakeEmbedder``, ``FakeVectorStore`` and fake topics (no broker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import faust
import orjson
import pytest
from faust.types import Message

from agents.policy.admission import example_id
from agents.policy.bandit import CONTEXT_NAMES, context_features
from agents.policy.retrieval import Selected
from agents.prepare import Preparer
from infra.protocols import Example
from infra.settings import Settings, load_settings
from streams.codecs import decode_vector
from streams.records import PREPARED_VERSION, DeadLetterRecord, PreparedRecord, ReplyRecord
from tests.fakes.backends import AgentHarness, FakeTopic, agent_harness, fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore

DIM = 384
SOURCE = "unit.requests"
PRIVATE_REPLIES = "unit.replies.alice"


def settings(**limits: Any) -> Settings:
    # the prepared topic's hop: the records these tests read are what prepare sends serve
    return load_settings(
        kafka={"topic_prefix": "unit"}, worker={"metrics_port": 0, "prepared_hop": "kafka"}, limits=limits
    )


class Prep:
    def __init__(self, harness: AgentHarness, embedder: FakeEmbedder, store: FakeVectorStore) -> None:
        self.h, self.embedder, self.store = harness, embedder, store
        self.preparer = Preparer(harness.app, harness.topics, harness.resources, harness.state)
        self.prepared: FakeTopic = harness.topic("prepared")
        self.replies: FakeTopic = harness.topic("replies")
        self.deadletter: FakeTopic = harness.topic("deadletter")
        self._offset = 100

    def event(self, value: bytes, *, key: bytes | None = None, partition: int = 2) -> faust.EventT[bytes]:
        self._offset += 1
        message = Message(SOURCE, partition, self._offset, time.time(), 0, [], key, value, None, tp=None)
        return faust.Event(self.h.app, key, value, [], message)

    def request(
        self, request_id: str, prompt: str, tenant: str = "acme", **fields: Any
    ) -> faust.EventT[bytes]:
        body = {"request_id": request_id, "tenant": tenant, "prompt": prompt, **fields}
        return self.event(orjson.dumps(body), key=request_id.encode())

    def out(self) -> list[PreparedRecord]:
        values = self.prepared.values
        assert all(isinstance(v, PreparedRecord) for v in values)
        return values

    def metric(self, name: str, **labels: str) -> float:
        value = self.h.resources.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@asynccontextmanager
async def make_prep(*, embedder: bool = True, store: bool = True, **limits: Any) -> AsyncIterator[Prep]:
    fake_embedder, fake_store = FakeEmbedder(DIM), FakeVectorStore(DIM)
    factories = fake_factories(
        embedder=fake_embedder if embedder else None, store=fake_store if store else None
    )
    async with agent_harness(
        settings(**limits), factories, agents=("prepare",), known_topics=[PRIVATE_REPLIES]
    ) as harness:
        yield Prep(harness, fake_embedder, fake_store)


@pytest.fixture
async def prep() -> AsyncIterator[Prep]:
    async with make_prep() as made:
        yield made


async def bank(prep: Prep, tenant: str, request: str, response: str, *, quality: float = 0.8) -> Example:
    vector = (await prep.embedder.embed([request]))[0]
    example = Example(
        example_id=example_id(tenant, request),
        tenant=tenant,
        request=request,
        response=response,
        embedding=vector,
        quality=quality,
    )
    await prep.store.upsert([example])
    return example


# ------------------------------------------------------------------------------------- the happy path
async def test_a_batch_is_embedded_once_and_each_request_gets_its_examples(prep: Prep) -> None:
    await bank(prep, "acme", "how do I reset my password?", "Settings > Security > Reset.")
    events = [
        prep.request("r1", "how do I reset my password?"),
        prep.request("r2", "what is the capital of peru"),
    ]
    prep.embedder.calls.clear()
    await prep.preparer.handle_batch(events)

    assert prep.embedder.calls == [["how do I reset my password?", "what is the capital of peru"]]
    first, second = prep.out()
    assert [r.request.request_id for r in (first, second)] == ["r1", "r2"]
    assert [e.response for e in first.examples] == ["Settings > Security > Reset."]
    assert first.examples[0].similarity > 0.99 and first.examples[0].utility >= 0.5
    assert second.examples == []  # nothing similar in the bank
    for record, event in zip((first, second), events, strict=True):
        assert record.selection_bypassed == ""
        assert decode_vector(record.embedding).shape == (DIM,)
        assert (record.source_partition, record.source_offset) == (2, event.message.offset)
        assert {"parse", "embed", "retrieve", "select", "sent_at"} <= set(record.timings_ms)
    assert [r.key for r in prep.prepared.sent] == ["r1", "r2"]  # keyed by request id
    assert prep.metric("echolm_cache_lookups_total") == 2 and prep.metric("echolm_cache_hits_total") == 1


@pytest.mark.parametrize("quality", [0.15, 0.85])
async def test_the_routing_context_and_the_refs_carry_the_examples_real_quality(
    prep: Prep, quality: float
) -> None:
    stored = await bank(prep, "acme", "how do I reset my password?", "Settings > Reset.", quality=quality)
    await prep.preparer.handle_batch([prep.request("r1", "how do I reset my password?")])
    (record,) = prep.out()
    (ref,) = record.examples
    assert (ref.quality, ref.replay_rounds, ref.created_at) == (quality, 0, stored.created_at)
    assert len(record.context) == len(CONTEXT_NAMES) and record.version == PREPARED_VERSION
    assert record.context[CONTEXT_NAMES.index("mean_quality")] == pytest.approx(quality)
    assert record.context[CONTEXT_NAMES.index("examples")] == pytest.approx(1 / 5)
    expected = context_features(
        decode_vector(record.embedding),
        [Selected(ref.example("acme", decode_vector(record.embedding)), ref.similarity, ref.utility)],
        prompt_text="how do I reset my password?",
    )
    assert record.context == pytest.approx(list(expected))


async def test_a_bypassed_request_still_gets_a_routing_context(prep: Prep) -> None:
    prep.embedder.unavailable = True
    await prep.preparer.handle_batch([prep.request("r1", "hello there")])
    (record,) = prep.out()
    assert record.embedding == "" and record.examples == []
    assert record.context[CONTEXT_NAMES.index("bias")] == 1.0
    assert record.context[CONTEXT_NAMES.index("examples")] == 0.0


async def test_retrieval_never_crosses_tenants(prep: Prep) -> None:
    prompt = "how do I reset my password?"
    await bank(prep, "acme", prompt, "acme's answer")
    await bank(prep, "globex", prompt, "globex's answer")
    await prep.preparer.handle_batch(
        [
            prep.request("a", prompt, tenant="acme"),
            prep.request("g", prompt, tenant="globex"),
            prep.request("i", prompt, tenant="initech"),
        ]
    )
    by_id = {r.request.request_id: r for r in prep.out()}
    assert [e.response for e in by_id["a"].examples] == ["acme's answer"]
    assert [e.response for e in by_id["g"].examples] == ["globex's answer"]
    assert by_id["i"].examples == []
    assert prep.store.calls["search_batch"] == 1  # one batched call for the batch ...
    assert prep.store.calls["search"] == 3  # ... that searches once per tenant, each filtered to it


# ------------------------------------------------------------------------------------------ bad input
def body(**fields: Any) -> bytes:
    return orjson.dumps({"request_id": "bad-1", "tenant": "acme", **fields})


@pytest.mark.parametrize(
    ("raw", "code", "replies"),
    [
        pytest.param(b"\xff not json", "decode_error", False, id="not-json"),
        pytest.param(b"[1, 2]", "decode_error", False, id="not-object"),
        pytest.param(body(), "schema_error", True, id="no-prompt"),
        pytest.param(body(prompt="hi", max_new_tokens=100_000), "limit_exceeded", True, id="too-many-tokens"),
        pytest.param(
            body(prompt="hi", reply_topic="other.topic"), "forbidden_reply_topic", True, id="forged"
        ),
        pytest.param(
            body(prompt="hi", reply_topic="unit.replies.bob"), "unknown_reply_topic", True, id="missing-topic"
        ),
    ],
)
async def test_bad_records_are_dead_lettered_with_coordinates_and_the_batch_goes_on(
    prep: Prep, raw: bytes, code: str, replies: bool
) -> None:
    bad = prep.event(raw, key=b"k-bad", partition=3)
    good = prep.request("ok-1", "a valid question")
    await prep.preparer.handle_batch([bad, good])

    (letter,) = prep.deadletter.values
    assert isinstance(letter, DeadLetterRecord)
    assert (letter.source_topic, letter.partition, letter.offset) == (SOURCE, 3, bad.message.offset)
    assert (letter.error_code, letter.key, letter.value_bytes) == (code, "k-bad", len(raw))
    assert letter.value_preview and letter.reason
    if replies:
        (reply,) = prep.replies.values
        assert isinstance(reply, ReplyRecord) and not reply.ok and reply.error is not None
        assert (reply.request_id, reply.error.code) == ("bad-1", code)
        assert letter.request_id == "bad-1"
    else:
        assert prep.replies.values == []  # no safe address to answer to
    assert [r.request.request_id for r in prep.out()] == ["ok-1"]
    assert prep.metric("echolm_dead_letters_total", code=code) == 1


async def test_a_request_for_an_existing_private_reply_topic_is_accepted(prep: Prep) -> None:
    await prep.preparer.handle_batch([prep.request("r1", "hi there", reply_topic=PRIVATE_REPLIES)])
    assert [r.request.reply_topic for r in prep.out()] == [PRIVATE_REPLIES]
    assert prep.deadletter.values == []


async def test_an_unknown_tenant_is_dead_lettered_when_tenants_are_configured() -> None:
    async with make_prep(tenants=["acme"]) as prep:
        await prep.preparer.handle_batch(
            [prep.request("r1", "hello", tenant="acme"), prep.request("r2", "hello", tenant="mallory")]
        )
        assert [r.request.tenant for r in prep.out()] == ["acme"]
        (letter,) = prep.deadletter.values
        assert letter.error_code == "unknown_tenant" and letter.request_id == "r2"


async def test_a_batch_of_only_bad_records_sends_nothing_to_prepared(prep: Prep) -> None:
    await prep.preparer.handle_batch([prep.event(b"nope"), prep.event(b"{}")])
    assert prep.out() == [] and len(prep.deadletter.values) == 2
    assert prep.embedder.calls == []


# -------------------------------------------------------------------------- degraded dependencies
async def _bypassed(prep: Prep, reason: str, *, has_embedding: bool) -> None:
    await prep.preparer.handle_batch([prep.request("r1", "how do I reset my password?")])
    (record,) = prep.out()
    assert record.request.request_id == "r1" and record.examples == []
    assert record.selection_bypassed == reason
    assert bool(record.embedding) is has_embedding
    assert prep.metric("echolm_selection_bypass_total", reason=reason) == 1
    assert prep.deadletter.values == []


async def test_an_embedder_failure_bypasses_selection_but_still_prepares(prep: Prep) -> None:
    await bank(prep, "acme", "how do I reset my password?", "Settings > Security > Reset.")
    prep.embedder.unavailable = True
    await _bypassed(prep, "embedder_failed", has_embedding=False)


async def test_a_vector_store_failure_bypasses_selection_but_still_prepares(prep: Prep) -> None:
    await bank(prep, "acme", "how do I reset my password?", "Settings > Security > Reset.")
    prep.store.unavailable = True
    await prep.preparer.handle_batch([prep.request("r1", "how do I reset my password?")])
    (record,) = prep.out()
    assert record.examples == [] and record.selection_bypassed == "store_failed"
    assert decode_vector(record.embedding).shape == (DIM,)  # the embedding still travels (for the log)


@pytest.mark.parametrize(
    ("embedder", "store", "reason", "has_embedding"),
    [(False, True, "embedder_unavailable", False), (True, False, "store_unavailable", True)],
)
async def test_a_dependency_that_never_opened_bypasses_selection(
    embedder: bool, store: bool, reason: str, has_embedding: bool
) -> None:
    async with make_prep(embedder=embedder, store=store) as prep:
        if not store:
            prep.store = FakeVectorStore(DIM)  # a bank the worker cannot see
        await bank(prep, "acme", "how do I reset my password?", "Settings > Security > Reset.")
        await _bypassed(prep, reason, has_embedding=has_embedding)


# ------------------------------------------------------------------------------------------ the agent
async def test_the_prepare_agent_batches_its_stream(prep: Prep, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registered agent, fed by ``test_context``; its real topics' ``send`` goes to the fakes."""
    monkeypatch.setattr(prep.h.app_topics.prepared, "send", prep.prepared.send)
    agent = prep.h.app.agents["echolm.prepare"]
    async with agent.test_context() as tested:
        await tested.put(orjson.dumps({"request_id": "r1", "tenant": "acme", "prompt": "hello there"}))
    (record,) = prep.out()
    assert record.request.request_id == "r1" and record.selection_bypassed == ""
    assert prep.h.resources.inflight == 0


# ------------------------------------------------------------------------- in process (no prepared hop)
async def test_inline_handoff_serves_in_process_and_commits_only_after_serving(prep: Prep) -> None:
    """``worker.prepared_hop = "inline"``: nothing crosses the prepared topic, the batch returns before
        its requests are served (the next batch is not held up), and each event stays uncommitted until
        its serve finished; a serve that raises is answered with an error and dead-lettered by the guard
    (agents/guard.py), its event acked, and the next batch is served."""
    release, served = asyncio.Event(), []

    async def serve(record: PreparedRecord) -> None:
        await release.wait()
        if record.request.request_id == "boom":
            raise RuntimeError("serve broke")
        served.append(record)

    inline = Preparer(prep.h.app, prep.h.topics, prep.h.resources, prep.h.state, handoff=serve)
    events = [prep.request("r1", "hello there"), prep.request("boom", "and again")]
    for event in events:
        event.message.incref()  # the stream's own reference, as faust takes it on delivery
    await inline.handle_batch(events)
    for event in events:
        event.ack()  # what take_events does when the loop body returns
    assert prep.prepared.values == [] and served == []
    assert [e.message.acked for e in events] == [False, False]  # not committable: not served yet
    assert prep.h.resources.inflight == 2
    release.set()
    while inline._serving:  # noqa: ASYNC110 - waits for the two serve tasks this test started
        await asyncio.sleep(0.01)
    assert [r.request.request_id for r in served] == ["r1"]
    assert {"parse", "embed", "retrieve", "select", "handoff"} <= set(served[0].timings_ms)
    assert "sent_at" not in served[0].timings_ms
    assert [e.message.acked for e in events] == [True, True]  # the failure was answered: both done
    (letter,) = prep.deadletter.values
    assert (letter.request_id, letter.partition, letter.offset) == ("boom", 2, events[1].message.offset)
    assert "serve broke" in letter.reason and letter.error_code == "internal"
    (reply,) = prep.replies.values
    assert reply.request_id == "boom" and not reply.ok and reply.error is not None
    assert prep.h.resources.inflight == 0
    await inline.handle_batch([prep.request("r2", "next batch")])  # the next batch goes on
