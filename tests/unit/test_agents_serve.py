"""``agents.serve``: route -> generate -> reply -> log, with fake backends, a fake probe and fake
topics (no broker). ``Server.handle`` is called directly; one test drives the registered agent
through ``agent.test_context()``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from agents.policy.bandit import CONTEXT_NAMES
from agents.policy.routing import ArmEstimate, LinUCBBandit
from agents.serve import Server, routing_context
from infra.errors import (
    BackendError,
    BackendOverloaded,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    NoBackendAvailable,
)
from infra.settings import Settings, load_settings
from streams.codecs import encode_vector
from streams.records import ExampleRef, LogRecord, PreparedRecord, ReplyRecord, RequestRecord
from tests.fakes import ASSUMED_PRIORS
from tests.fakes.backends import AgentHarness, FakeGenerator, FakeProbe, agent_harness, fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore

SMALL, LARGE = "small-0", "large-0"
DIM = 384


def settings(**tgi: Any) -> Settings:
    # the routing expectations below are the settings' own tier priors, not the shipped measured file
    # (agents/policy/priors.json changes with every quality run)
    return load_settings(
        routing={"priors_file": ASSUMED_PRIORS},
        kafka={"topic_prefix": "unit"},
        worker={"metrics_port": 0, "concurrency": 4},
        tgi={"retries": 2, **tgi},
    )


class Fleet:
    """Two fake backends (one per tier), a probe that sees both idle, and the harness around them."""

    def __init__(self, harness: AgentHarness, small: FakeGenerator, large: FakeGenerator, probe: FakeProbe):
        self.h, self.small, self.large, self.probe = harness, small, large, probe
        self.server = Server(harness.app, harness.topics, harness.resources, harness.state)
        self.replies = harness.topic("replies")
        self.log = harness.topic("log")

    def reply(self) -> ReplyRecord:
        assert len(self.replies.values) == 1, self.replies.values
        value = self.replies.values[0]
        assert isinstance(value, ReplyRecord)
        return value

    def logged(self) -> LogRecord:
        assert len(self.log.values) == 1, self.log.values
        value = self.log.values[0]
        assert isinstance(value, LogRecord)
        return value

    def metric(self, name: str, **labels: str) -> float:
        value = self.h.resources.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@asynccontextmanager
async def make_fleet(**tgi: Any) -> AsyncIterator[Fleet]:
    small, large = FakeGenerator(SMALL, reply="small answer"), FakeGenerator(LARGE, reply="large answer")
    probe = FakeProbe()
    probe.idle(SMALL, LARGE)
    factories = fake_factories(
        embedder=FakeEmbedder(DIM), store=FakeVectorStore(DIM), generators=[small, large], probe=probe
    )
    async with agent_harness(settings(**tgi), factories, agents=("serve",)) as harness:
        yield Fleet(harness, small, large, probe)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with make_fleet() as made:
        yield made


def request(
    prompt: str = "how do I reset my password?", *, deadline_in_s: float | None = 60.0
) -> RequestRecord:
    now = time.time()
    return RequestRecord(
        request_id=f"r-{time.monotonic_ns()}",
        tenant="acme",
        prompt=prompt,
        max_new_tokens=32,
        reply_topic="unit.replies",
        deadline_at=now + deadline_in_s if deadline_in_s is not None else 0.0,
        created_at=now,
    )


def strong_examples(n: int = 3) -> list[ExampleRef]:
    return [
        ExampleRef(
            example_id=f"ex-{i}",
            request=f"how can I reset my password, variant {i}?",
            response=f"Open settings and choose reset ({i}).",
            similarity=0.96,
            utility=0.95,
        )
        for i in range(n)
    ]


async def prepared(
    prompt: str = "how do I reset my password?",
    examples: list[ExampleRef] | None = None,
    *,
    deadline_in_s: float | None = 60.0,
    v1: bool = False,
) -> PreparedRecord:
    """A prepared record as ``prepare`` writes it: with the routing context (none when ``v1``)."""
    vector = (await FakeEmbedder(DIM).embed([prompt]))[0]
    record = PreparedRecord(
        request=request(prompt, deadline_in_s=deadline_in_s),
        embedding=encode_vector(vector),
        examples=examples or [],
        timings_ms={"parse": 0.1, "sent_at": time.time() * 1000.0},
    )
    if v1:
        record.version = 1
    else:
        record.context = [float(x) for x in routing_context(record, DIM)]
    return record


# ------------------------------------------------------------------------------------------ routing
async def test_strong_examples_route_to_the_small_tier_with_the_examples(fleet: Fleet) -> None:
    record = await prepared(examples=strong_examples())
    await fleet.server.handle(record)

    reply = fleet.reply()
    assert (reply.ok, reply.tier, reply.backend, reply.text) == (True, "small", SMALL, "small answer")
    assert reply.n_examples == 3
    assert not fleet.large.calls
    (call,) = fleet.small.calls
    contents = [m.content for m in call.messages]
    assert [m.role for m in call.messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert "Open settings and choose reset (0)." in contents
    assert contents[-1] == record.request.prompt
    assert call.params.max_new_tokens == record.request.max_new_tokens
    # answer-reply-log: the idempotency record first, then the reply, then the log record
    assert [topic for topic, _ in fleet.replies.journal] == ["unit.answered", "unit.replies", "unit.log"]
    logged = fleet.logged()
    assert logged.route is not None and logged.route.tier == "small" and logged.route.attempts == 1
    assert [e.example_id for e in logged.examples] == ["ex-0", "ex-1", "ex-2"]
    assert fleet.h.app_topics is not fleet.h.topics  # the agent under test sent to the fakes only
    assert fleet.metric("echolm_requests_total", outcome="ok") == 1


async def test_no_examples_and_an_idle_large_queue_route_to_the_large_tier(fleet: Fleet) -> None:
    await fleet.server.handle(await prepared())

    reply = fleet.reply()
    assert (reply.ok, reply.tier, reply.backend, reply.text, reply.n_examples) == (
        True,
        "large",
        LARGE,
        "large answer",
        0,
    )
    (call,) = fleet.large.calls
    assert [m.role for m in call.messages] == ["system", "user"]
    assert not fleet.small.calls


async def test_large_tier_sees_no_examples_even_when_some_were_selected(fleet: Fleet) -> None:
    weak = [ExampleRef(example_id="w", request="unrelated", response="nope", similarity=0.5, utility=0.1)]
    await fleet.server.handle(await prepared(examples=weak))
    assert fleet.reply().tier == "large" and fleet.reply().n_examples == 0
    (call,) = fleet.large.calls
    assert all(m.content != "nope" for m in call.messages)


async def test_a_deep_large_queue_moves_a_request_without_examples_to_the_small_tier(fleet: Fleet) -> None:
    fleet.probe.set_depth(LARGE, waiting=60, running=16)
    await fleet.server.handle(await prepared())
    assert fleet.reply().backend == SMALL
    route = fleet.logged().route
    assert route is not None and "load moved it off large" in route.reason and route.bias > 0


async def test_route_excludes_backends_and_reports_when_none_is_left(fleet: Fleet) -> None:
    context = np.zeros(16)
    context[0] = 1.0
    assert fleet.server.route(context, {LARGE}, time.monotonic()).backend == SMALL
    with pytest.raises(NoBackendAvailable):
        fleet.server.route(context, {LARGE, SMALL}, time.monotonic())


# ---------------------------------------------------------------------------------- backend errors
@pytest.mark.parametrize(
    "error",
    [
        BackendOverloaded("429 Model is overloaded", backend=LARGE, status=429),
        BackendUnavailable("503 loading", backend=LARGE, status=503),
        BackendTimeout("504 upstream timed out", backend=LARGE, status=504),
    ],
    ids=["429", "5xx", "timeout"],
)
async def test_a_retriable_error_retries_on_another_backend_and_records_the_circuit(
    error: BackendError,
) -> None:
    async with make_fleet(circuit_failures=1) as fleet:
        fleet.large.fail_next(error)
        await fleet.server.handle(await prepared())

        reply = fleet.reply()
        assert (reply.ok, reply.backend, reply.text) == (True, SMALL, "small answer")
        assert len(fleet.large.calls) == 1 and len(fleet.small.calls) == 1
        route = fleet.logged().route
        assert route is not None and route.attempts == 2
        breaker = fleet.h.state.breaker
        assert breaker.state(LARGE, time.monotonic()) == "open"  # one failure opens it (circuit_failures=1)
        assert breaker.state(SMALL, time.monotonic()) == "closed"
        assert fleet.metric("echolm_backend_errors_total", backend=LARGE, code=error.code) == 1


async def test_a_backend_that_does_not_answer_in_time_is_retried_elsewhere() -> None:
    async with make_fleet(request_timeout_s=0.05) as fleet:
        fleet.large.hold()  # never released: only the timeout ends it
        started = time.perf_counter()
        await fleet.server.handle(await prepared())
        assert time.perf_counter() - started < 2.0
        assert fleet.reply().backend == SMALL
        assert fleet.large.in_flight == 0  # the hung generation was cancelled
        assert fleet.metric("echolm_backend_errors_total", backend=LARGE, code="backend_timeout") == 1


async def test_failures_count_toward_the_circuit_until_it_opens(fleet: Fleet) -> None:
    breaker, failures = fleet.h.state.breaker, fleet.h.settings.tgi.circuit_failures
    for i in range(failures):
        assert LARGE not in breaker.open_backends(time.monotonic()), i
        fleet.large.fail_next(BackendUnavailable("503", backend=LARGE, status=503))
        await fleet.server.handle(await prepared())
    assert LARGE in breaker.open_backends(time.monotonic())
    # with its circuit open the large tier is no longer tried at all
    fleet.large.calls.clear()
    await fleet.server.handle(await prepared())
    assert not fleet.large.calls


async def test_a_success_closes_the_count_of_failures(fleet: Fleet) -> None:
    breaker = fleet.h.state.breaker
    fleet.large.fail_next(BackendUnavailable("503", backend=LARGE, status=503))
    await fleet.server.handle(await prepared())
    await fleet.server.handle(await prepared())  # large answers: its failure count resets
    assert fleet.replies.values[-1].backend == LARGE
    for _ in range(breaker.failures - 1):
        fleet.large.fail_next(BackendUnavailable("503", backend=LARGE, status=503))
        await fleet.server.handle(await prepared())
    assert breaker.state(LARGE, time.monotonic()) == "closed"


async def test_a_half_open_circuit_lets_exactly_one_probe_through() -> None:
    async with make_fleet(circuit_failures=1, circuit_reset_s=0.05) as fleet:
        breaker = fleet.h.state.breaker
        breaker.record_failure(LARGE, time.monotonic())
        await asyncio.sleep(0.06)  # past circuit_reset_s: half-open
        assert breaker.state(LARGE, time.monotonic()) == "half_open"
        gate = fleet.large.hold()
        probe = asyncio.create_task(fleet.server.handle(await prepared("first")))
        await asyncio.wait_for(fleet.large.started.wait(), timeout=2.0)
        # while the probe is in flight (a short deadline: were it sent to large too, it would time out)
        await fleet.server.handle(await prepared("second", deadline_in_s=1.0))
        assert [c.messages[-1].content for c in fleet.large.calls] == ["first"]
        assert fleet.replies.values[0].backend == SMALL  # the second request, kept off large
        gate.set()
        await probe
        assert fleet.replies.values[1].backend == LARGE
        assert breaker.state(LARGE, time.monotonic()) == "closed"


async def test_a_non_retriable_error_is_answered_without_retrying(fleet: Fleet) -> None:
    fleet.large.fail_next(BackendRejected("422 prompt too long", backend=LARGE, status=422))
    await fleet.server.handle(await prepared())
    reply = fleet.reply()
    assert not reply.ok and reply.error is not None
    assert reply.error.code == NoBackendAvailable.code and "BackendRejected" in reply.error.message
    assert not fleet.small.calls and not fleet.log.sent


async def test_every_backend_failing_sends_a_no_backend_available_error_reply(fleet: Fleet) -> None:
    fleet.large.fail_next(*[BackendUnavailable("503", backend=LARGE, status=503)] * 3)
    fleet.small.fail_next(*[BackendOverloaded("429", backend=SMALL, status=429)] * 3)
    record = await prepared()
    await fleet.server.handle(record)

    reply = fleet.reply()
    assert (reply.ok, reply.request_id, reply.tenant) == (False, record.request.request_id, "acme")
    assert reply.error is not None and reply.error.code == "no_backend_available"
    attempts = fleet.h.settings.tgi.retries + 1
    assert f"tried on {attempts} backend(s)" in reply.error.message
    assert len(fleet.large.calls) + len(fleet.small.calls) == attempts
    assert not fleet.log.sent  # nothing to log or admit
    assert fleet.metric("echolm_requests_total", outcome="no_backend") == 1


async def test_after_every_backend_failed_once_they_are_tried_again_after_a_backoff(fleet: Fleet) -> None:
    """A transient failure on each (a keep-alive connection closed under us, a 429 burst) must not
    cost the request while its deadline leaves time for another round."""
    fleet.large.fail_next(BackendUnavailable("Server disconnected", backend=LARGE))
    fleet.small.fail_next(BackendOverloaded("429", backend=SMALL, status=429))
    await fleet.server.handle(await prepared())

    reply = fleet.reply()
    assert reply.ok, reply.error
    assert len(fleet.large.calls) + len(fleet.small.calls) == 3


async def test_no_second_round_when_the_deadline_leaves_no_time_for_it() -> None:
    async with make_fleet(retries=5) as fleet:
        fleet.large.fail_next(*[BackendUnavailable("503", backend=LARGE, status=503)] * 5)
        fleet.small.fail_next(*[BackendOverloaded("429", backend=SMALL, status=429)] * 5)
        # 0.35 s of deadline: 10 % is the reply margin, and a round needs backoff + a minimal attempt
        await fleet.server.handle(await prepared(deadline_in_s=0.35))
        reply = fleet.reply()
        assert not reply.ok and reply.error is not None and reply.error.code == "no_backend_available"
        assert len(fleet.large.calls) + len(fleet.small.calls) == 2


async def test_requests_dispatched_after_the_last_sample_count_as_pending(fleet: Fleet) -> None:
    gate = fleet.large.hold()
    first = asyncio.create_task(fleet.server.handle(await prepared("first")))
    await asyncio.wait_for(fleet.large.started.wait(), timeout=2.0)
    assert fleet.server.pending(fleet.probe.snapshot()) == {LARGE: 1.0}
    fleet.probe.idle(SMALL, LARGE)  # a newer scrape sees it (as running), so it is no longer pending
    assert fleet.server.pending(fleet.probe.snapshot()) == {}
    gate.set()
    await first
    assert fleet.server.pending({}) == {}


async def test_a_reply_that_cannot_be_delivered_raises_and_nothing_is_logged(fleet: Fleet) -> None:
    fleet.replies.fail_next(ConnectionError("broker gone"))
    with pytest.raises(ConnectionError):
        await fleet.server.handle(await prepared())
    assert not fleet.log.sent  # step 4 never runs: the event is not acked and will be re-read


# ----------------------------------------------------------------------------------------- deadline
async def test_a_request_past_its_deadline_is_answered_deadline_exceeded(fleet: Fleet) -> None:
    await fleet.server.handle(await prepared(deadline_in_s=-1.0))
    reply = fleet.reply()
    assert not reply.ok and reply.error is not None and reply.error.code == "deadline_exceeded"
    assert not fleet.small.calls and not fleet.large.calls and not fleet.log.sent
    assert fleet.metric("echolm_requests_total", outcome="deadline_exceeded") == 1


async def test_generation_never_outlives_the_request_deadline(fleet: Fleet) -> None:
    fleet.large.hold()
    fleet.small.hold()
    started = time.perf_counter()
    await fleet.server.handle(await prepared(deadline_in_s=0.2))
    assert time.perf_counter() - started < 1.0
    reply = fleet.reply()
    assert not reply.ok and reply.error is not None
    assert reply.error.code == "deadline_exceeded" and "BackendTimeout" in reply.error.message
    assert fleet.large.in_flight == 0 and fleet.small.in_flight == 0
    assert fleet.metric("echolm_requests_total", outcome="deadline_exceeded") == 1


# ------------------------------------------------------------------------------ routing context, timing
async def test_serve_routes_on_the_context_prepare_shipped_and_passes_the_embedding_on(fleet: Fleet) -> None:
    record = await prepared(examples=strong_examples())
    context = list(record.context)
    context[CONTEXT_NAMES.index("mean_quality")] = 0.93  # what only prepare knows: the bank's quality
    record.context = context
    record.embedding = "not base64 at all"  # serve must not decode it, only pass it to the log
    await fleet.server.handle(record)
    logged = fleet.logged()
    assert logged.route is not None and logged.route.context == context
    assert logged.embedding == "not base64 at all"


async def test_a_v1_record_without_a_context_is_routed_on_a_recomputed_one(fleet: Fleet) -> None:
    record = await prepared(examples=strong_examples(), v1=True)
    assert record.context == []
    await fleet.server.handle(record)
    assert fleet.reply().tier == "small"  # as v1 serve routed it
    route = fleet.logged().route
    assert route is not None and len(route.context) == len(CONTEXT_NAMES)
    assert route.context[CONTEXT_NAMES.index("examples")] == pytest.approx(3 / 5)
    assert route.context[CONTEXT_NAMES.index("mean_quality")] == 0.5  # v1 refs carry no quality


async def test_every_generation_attempt_is_timed(fleet: Fleet) -> None:
    fleet.large.fail_next(BackendOverloaded("429", backend=LARGE, status=429))
    await fleet.server.handle(await prepared())
    reply, route = fleet.reply(), fleet.logged().route
    assert reply.ok and route is not None and route.attempts == 2
    assert len(route.generate_ms) == 2 and all(ms >= 0 for ms in route.generate_ms)
    assert reply.timings_ms["generate"] == pytest.approx(sum(route.generate_ms), abs=0.01)
    assert fleet.metric("echolm_stage_seconds_count", stage="generate") == 2


async def test_failed_attempts_are_timed_too(fleet: Fleet) -> None:
    fleet.large.fail_next(*[BackendUnavailable("503", backend=LARGE, status=503)] * 3)
    fleet.small.fail_next(*[BackendOverloaded("429", backend=SMALL, status=429)] * 3)
    await fleet.server.handle(await prepared())
    assert not fleet.reply().ok
    attempts = fleet.h.settings.tgi.retries + 1
    assert fleet.metric("echolm_stage_seconds_count", stage="generate") == attempts
    assert "generate" in fleet.reply().timings_ms


# ------------------------------------------------------------------------------------- router bypass
class BrokenBandit(LinUCBBandit):
    """A bandit whose estimate fails, as a corrupted checkpoint would."""

    def expected(self, x: Any) -> dict[str, ArmEstimate]:
        raise FloatingPointError("bandit state is corrupted")


async def test_a_failing_router_bypasses_to_the_least_loaded_backend(fleet: Fleet) -> None:
    fleet.h.state.bandit = BrokenBandit({"small": 0.45, "large": 0.8})
    fleet.probe.set_depth(SMALL, waiting=20)  # small busy: least-loaded is large
    await fleet.server.handle(await prepared(examples=strong_examples()))

    reply = fleet.reply()
    assert reply.ok and reply.backend == LARGE
    route = fleet.logged().route
    assert route is not None and route.reason.startswith("bypass (router failed)")
    assert not route.ask_feedback and not route.scores
    assert fleet.metric("echolm_selection_bypass_total", reason="router_failed") == 1


# ------------------------------------------------------------------------------------- the agent
async def test_the_serve_agent_answers_through_its_stream(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registered agent, fed by ``test_context``; its real topics' ``send`` goes to the fakes."""
    real = fleet.h.app_topics
    sends: dict[str, Callable[..., Awaitable[Any]]] = {
        real.replies.get_topic_name(): fleet.replies.send,
        real.log.get_topic_name(): fleet.log.send,
        real.answered.get_topic_name(): fleet.h.topic("answered").send,
    }
    for topic in (real.replies, real.log, real.answered):
        monkeypatch.setattr(topic, "send", sends[topic.get_topic_name()])
    agent = fleet.h.app.agents["echolm.serve"]
    record = await prepared(examples=strong_examples())
    async with agent.test_context() as tested:
        await tested.put(record)
    reply = fleet.reply()
    assert reply.ok and reply.request_id == record.request.request_id and reply.tier == "small"
    assert fleet.logged().request.request_id == record.request.request_id
    assert fleet.h.resources.inflight == 0
