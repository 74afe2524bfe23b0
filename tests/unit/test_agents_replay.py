"""``agents.replay.Replayer.tick``: off-peak best-of-n on the large tier, emitted as a replay log
record that ``apply_log_records`` folds into the bank. Fake backends, probe, store and topics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from agents.admit import apply_log_records
from agents.policy.admission import example_id
from agents.replay import Replayer
from infra.errors import BackendUnavailable
from infra.protocols import Example
from infra.settings import load_settings
from streams.records import LogRecord
from tests.fakes.backends import AgentHarness, FakeGenerator, FakeProbe, agent_harness, fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore

DIM = 384
PROMPT = "how do I reset my password"


class FixedScorer:
    """Scores by a table (the incumbent and each candidate text), so the outcome is chosen by the test."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    async def score(self, question: str, answers: Sequence[str], incumbent: str | None = None) -> list[float]:
        return [self.scores.get(a, 0.0) for a in answers]


@dataclass
class Rig:
    h: AgentHarness
    store: FakeVectorStore
    large: FakeGenerator
    probe: FakeProbe

    def replayer(self, scores: dict[str, float]) -> Replayer:
        return Replayer(self.h.topics, self.h.resources, self.h.state, scorer=FixedScorer(scores))

    def logged(self) -> list[LogRecord]:
        return self.h.topic("log").values


@asynccontextmanager
async def rig() -> AsyncIterator[Rig]:
    store, probe = FakeVectorStore(DIM), FakeProbe()
    large = FakeGenerator("large-0", reply="Settings, Security, Reset password, then confirm by email.")
    probe.idle("small-0", "large-0")
    settings = load_settings(kafka={"topic_prefix": "unit"}, replay={"best_of": 3})
    factories = fake_factories(
        embedder=FakeEmbedder(DIM), store=store, generators=[FakeGenerator("small-0"), large], probe=probe
    )
    async with agent_harness(settings, factories) as harness:
        yield Rig(harness, store, large, probe)


async def seed(r: Rig, *, gain: float = 0.4, rounds: int = 0) -> Example:
    (vector,) = await FakeEmbedder(DIM).embed([PROMPT])
    example = Example(
        example_id=example_id("acme", PROMPT),
        tenant="acme",
        request=PROMPT,
        response="go to settings",
        embedding=vector,
        quality=0.3,
        gain=gain,
        replay_rounds=rounds,
        created_at=time.time() - 60,
        updated_at=time.time() - 60,
    )
    await r.store.upsert([example])
    r.h.state.replay_queue.push("acme", example.example_id, gain)
    return example


async def test_an_off_peak_tick_replays_and_admit_keeps_the_better_answer() -> None:
    async with rig() as r:
        old = await seed(r)
        better = r.large.reply
        assert isinstance(better, str)
        assert await r.replayer({better: 0.9, old.response: 0.3}).tick() == 1

        assert len(r.large.calls) == 3  # best_of, sampled with distinct seeds
        assert {c.params.seed for c in r.large.calls} == {1000, 1001, 1002}
        assert all(c.params.temperature == pytest.approx(0.7) for c in r.large.calls)
        (record,) = r.logged()
        assert (record.origin, record.replay_rounds, record.reply.text) == ("replay", 1, better)
        assert record.quality == pytest.approx(0.9) and record.reply.tier == "large"
        assert len(r.h.state.replay_queue) == 0

        counts = await apply_log_records([record], r.store, r.h.settings, now=time.time())
        assert counts["replaced"] == 1
        (new,) = await r.store.get("acme", [old.example_id])
        assert (new.response, new.replay_rounds, new.gain) == (better, 1, old.gain)


async def test_a_replay_that_does_not_beat_the_incumbent_keeps_its_answer_but_counts_the_round() -> None:
    async with rig() as r:
        old = await seed(r)
        assert await r.replayer({old.response: 0.8}).tick() == 1
        (record,) = r.logged()
        assert (record.reply.text, record.replay_rounds) == (old.response, 1)
        assert record.quality == pytest.approx(0.8)


async def test_no_replay_while_the_large_tier_is_busy_or_unseen() -> None:
    async with rig() as r:
        await seed(r)
        replayer = r.replayer({})
        r.probe.set_depth("large-0", waiting=3)
        assert await replayer.tick() == 0
        r.probe.set_depth("large-0", age_s=60)  # stale: we cannot see it, so it counts as busy
        assert await replayer.tick() == 0
        assert not r.large.calls and not r.logged() and len(r.h.state.replay_queue) == 1


async def test_an_unavailable_store_ends_the_tick_and_requeues_the_examples() -> None:
    """Milvus down mid-run: a replay timer that raised would crash the whole worker (faust timers)."""
    async with rig() as r:
        old = await seed(r)
        r.store.unavailable = True
        assert await r.replayer({}).tick() == 0
        assert not r.large.calls and not r.logged()
        ((tenant, queued_id, gain),) = r.h.state.replay_queue.pop(1)
        assert (tenant, queued_id) == ("acme", old.example_id) and gain == pytest.approx(old.gain)
        assert (
            r.h.resources.metrics.registry.get_sample_value(
                "echolm_replays_total", {"result": "store_unavailable"}
            )
            == 1
        )


async def test_a_backend_error_ends_the_tick_and_requeues_the_example() -> None:
    async with rig() as r:
        old = await seed(r)
        r.large.fail_next(BackendUnavailable("503", backend="large-0", status=503))
        assert await r.replayer({}).tick() == 0
        assert not r.logged()
        ((tenant, queued_id, gain),) = r.h.state.replay_queue.pop(1)
        assert (tenant, queued_id) == ("acme", old.example_id) and gain == pytest.approx(old.gain)
        assert (
            r.h.resources.metrics.registry.get_sample_value(
                "echolm_replays_total", {"result": "backend_error"}
            )
            == 1
        )


class BrokenScorer:
    async def score(self, question: str, answers: Sequence[str], incumbent: str | None = None) -> list[float]:
        raise ZeroDivisionError("scorer bug")


async def test_an_example_whose_replay_raises_is_dead_lettered_and_the_tick_goes_on() -> None:
    async with rig() as r:
        old = await seed(r)
        replayer = Replayer(r.h.topics, r.h.resources, r.h.state, scorer=BrokenScorer())
        assert await replayer.tick() == 0  # no exception escapes into the faust timer
        assert not r.logged()
        (letter,) = r.h.topic("deadletter").values
        assert (letter.stage, letter.request_id, letter.tenant) == (
            "replay",
            f"replay:{old.example_id}",
            "acme",
        )
        assert "ZeroDivisionError" in letter.reason and (letter.partition, letter.offset) == (-1, -1)
        metrics = r.h.resources.metrics.registry
        assert metrics.get_sample_value("echolm_handler_failures_total", {"stage": "replay"}) == 1
        await seed(r)  # the next tick, with a scorer that works, replays it
        assert await r.replayer({"go to settings": 0.3}).tick() == 1


@pytest.mark.parametrize(("gain", "rounds"), [(0.01, 0), (0.4, 5)], ids=["low gain", "max rounds"])
async def test_examples_not_worth_replaying_are_skipped(gain: float, rounds: int) -> None:
    async with rig() as r:
        await seed(r, gain=gain, rounds=rounds)
        assert await r.replayer({}).tick() == 0
        assert not r.large.calls
