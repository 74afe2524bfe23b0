"""``serve`` shows a tier the examples when the router decides so, and logs that choice.

The router's per-tier examples decision comes from the priors: with a measured gain for the large
tier (``routing.priors_file``), a tenant's bank reaches the large tier too; without one, the large
tier is served bare and the log lists no examples (they were not used)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from agents.serve import Server, routing_context
from infra.settings import load_settings
from streams.codecs import encode_vector
from streams.records import ExampleRef, LogRecord, PreparedRecord, ReplyRecord, RequestRecord
from tests.fakes.backends import FakeGenerator, FakeProbe, FakeTopic, agent_harness, fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore

DIM = 384


def priors_file(folder: Path, large_with_examples: float) -> Path:
    path = folder / "priors.json"
    tiers = {
        "small": {"alone": 0.3, "with_examples": 0.4},
        "large": {"alone": 0.6, "with_examples": large_with_examples},
    }
    path.write_text(json.dumps({"schema": "echolm.router-priors.v1", "measured": True, "tiers": tiers}))
    return path


@asynccontextmanager
async def serving(priors: Path) -> AsyncIterator[tuple[Server, FakeGenerator, FakeTopic, FakeTopic]]:
    small, large = FakeGenerator("small-0", reply="small"), FakeGenerator("large-0", reply="large")
    probe = FakeProbe()
    probe.idle("small-0", "large-0")
    settings = load_settings(
        kafka={"topic_prefix": "unit"},
        worker={"metrics_port": 0},
        routing={"priors_file": str(priors), "exploration": 0.0},
    )
    factories = fake_factories(
        embedder=FakeEmbedder(DIM), store=FakeVectorStore(DIM), generators=[small, large], probe=probe
    )
    async with agent_harness(settings, factories, agents=("serve",)) as h:
        server = Server(h.app, h.topics, h.resources, h.state)
        yield server, large, h.topic("replies"), h.topic("log")


async def fact_request() -> PreparedRecord:
    prompt = "Which code resets the Ashgrove imaging suite?"
    now = time.time()
    request = RequestRecord(
        request_id="r-1",
        tenant="meridian",
        prompt=prompt,
        max_new_tokens=16,
        reply_topic="unit.replies",
        deadline_at=now + 60,
        created_at=now,
    )
    example = ExampleRef(
        example_id="meridian-01",
        request="What is the reset code for the Ashgrove imaging suite?",
        response="The reset code for the Ashgrove imaging suite is WB-8790.",
        similarity=0.95,
        utility=0.95,
        tenant="meridian",
    )
    vector = (await FakeEmbedder(DIM).embed([prompt]))[0]
    record = PreparedRecord(request=request, embedding=encode_vector(vector), examples=[example])
    record.context = [float(x) for x in routing_context(record, DIM)]
    return record


async def test_a_measured_large_tier_gain_shows_the_large_tier_the_tenants_examples(tmp_path: Path) -> None:
    async with serving(priors_file(tmp_path, large_with_examples=0.9)) as (server, large, replies, logs):
        await server.handle(await fact_request())
    (reply,) = replies.values
    assert isinstance(reply, ReplyRecord) and (reply.tier, reply.n_examples) == ("large", 1)
    (call,) = large.calls
    assert "The reset code for the Ashgrove imaging suite is WB-8790." in [m.content for m in call.messages]
    (logged,) = logs.values
    assert isinstance(logged, LogRecord) and logged.route is not None and logged.route.with_examples
    assert [(e.example_id, e.tenant) for e in logged.examples] == [("meridian-01", "meridian")]
    assert logged.route.context[1] > 0  # the context of the arm served: with its examples


async def test_without_a_measured_gain_the_large_tier_is_served_bare_and_logs_no_examples(
    tmp_path: Path,
) -> None:
    async with serving(priors_file(tmp_path, large_with_examples=0.6)) as (server, large, replies, logs):
        await server.handle(await fact_request())
    (reply,) = replies.values
    assert isinstance(reply, ReplyRecord) and (reply.tier, reply.n_examples) == ("large", 0)
    (call,) = large.calls
    assert [m.role for m in call.messages] == ["system", "user"]
    (logged,) = logs.values
    assert isinstance(logged, LogRecord) and logged.route is not None
    assert (logged.route.with_examples, logged.examples, logged.route.context[1]) == (False, [], 0.0)
