"""Issue 3 on the real local stack: feedback changes later routing, replay improves a stored answer
by the scorer's measure, and the Milvus view rebuilt from the log matches the live one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from agents.policy.admission import example_id
from agents.scorers import ReferenceFreeScorer
from echolm.bank import apply_log, import_bank, read_log
from echolm.client import EchoClient
from infra.embedding import SentenceTransformerEmbedder
from infra.milvus import MilvusExampleStore
from infra.protocols import Example
from infra.settings import Settings

from .conftest import PipelineFactory

pytestmark = pytest.mark.integration

ORIGINALS = [
    "How do I reset my password?",
    "How do I cancel my subscription?",
    "How do I change my email address?",
]
PARAPHRASES = [
    ["How can I reset my password?", "How would I reset my password?", "How do I reset my password please?"],
    ["How can I cancel my subscription?", "How would I cancel my subscription?"],
    ["How can I change my email address?", "How would I change my email address?"],
]


async def _examples(settings: Settings, tenant: str) -> dict[str, Example]:
    async with MilvusExampleStore(settings.milvus) as store:
        await store.ensure_collection()
        return {e.example_id: e for e in await store.scan(tenant)}


async def _wait_for(predicate, timeout_s: float = 60.0, every_s: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(every_s)
    return await predicate()


async def test_negative_feedback_moves_routing_back_to_the_large_tier(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = await pipeline_factory(workers=1)
    settings = pipeline.settings
    async with EchoClient(settings) as client:
        for question in ORIGINALS:  # one at a time: idle backends, no examples -> the large tier answers
            reply = await client.ask(question, tenant="acme", timeout=120, max_new_tokens=8)
            assert reply.ok and reply.tier == "large"
        assert await _wait_for(lambda: _has_all(settings, "acme", len(ORIGINALS)))

        # With a near-duplicate example, the cheap tier is expected to be as good: it is chosen.
        before = await client.ask(PARAPHRASES[0][0], tenant="acme", timeout=120, max_new_tokens=8)
        assert before.ok and before.n_examples >= 1 and before.tier == "small", before

        # Clients say the small tier's answers were bad, for several such requests.
        await client.feedback(before.request_id, 0.0, tenant="acme")
        for group in PARAPHRASES[1:]:
            reply = await client.ask(group[0], tenant="acme", timeout=120, max_new_tokens=8)
            if reply.tier == "small":
                await client.feedback(reply.request_id, 0.0, tenant="acme")

        # Later requests of the same kind go back to the large tier.
        async def routed_large() -> bool:
            reply = await client.ask(PARAPHRASES[0][1], tenant="acme", timeout=120, max_new_tokens=4)
            return reply.ok and reply.tier == "large"

        assert await _wait_for(routed_large, timeout_s=60, every_s=1.0)


async def _has_all(settings: Settings, tenant: str, n: int) -> bool:
    return len(await _examples(settings, tenant)) >= n


async def test_replay_improves_a_stored_answer_and_the_log_rebuilds_the_bank(
    pipeline_factory: PipelineFactory, tmp_path: Path
) -> None:
    pipeline = await pipeline_factory(
        workers=1,
        replay={"interval_s": 1.0, "best_of": 2, "min_gain": 0.01},
        limits={"default_new_tokens": 48},
    )
    settings = pipeline.settings
    question = ORIGINALS[0]
    bad_answer = "no no no no no no"
    rows = tmp_path / "bank.jsonl"
    rows.write_bytes(orjson.dumps({"request": question, "response": bad_answer, "quality": 0.3}) + b"\n")
    assert await import_bank(settings, rows, tenant="acme", quiet=True) == 0
    eid = example_id("acme", question)
    assert (await _examples(settings, "acme"))[eid].response == bad_answer

    # Requests that select the example raise its replay gain and queue it for replay; replay runs while
    # the large tier is idle and replaces the answer when a candidate scores better.
    async with EchoClient(settings) as client:
        for paraphrase in PARAPHRASES[0]:
            reply = await client.ask(paraphrase, tenant="acme", timeout=120, max_new_tokens=4)
            assert reply.ok

    async def replayed() -> Example | None:
        ex = (await _examples(settings, "acme")).get(eid)
        return ex if ex is not None and ex.replay_rounds >= 1 else None

    improved = await _wait_for(replayed, timeout_s=120, every_s=1.0)
    assert improved is not None, "the example was never replayed"
    assert improved.response != bad_answer
    async with SentenceTransformerEmbedder(settings.embedding) as embedder:
        scorer = ReferenceFreeScorer(embedder)
        new_score, old_score = await scorer.score(question, [improved.response, bad_answer])
    assert new_score > old_score
    assert improved.quality == pytest.approx(new_score, abs=0.05)

    # The bank is a view of the log: replaying the log into a fresh collection gives the same examples.
    await pipeline.stop()
    live = await _examples(settings, "acme")
    records = await read_log(settings)
    rebuilt_settings = settings.model_copy(
        update={
            "milvus": settings.milvus.model_copy(
                update={"collection": settings.milvus.collection + "_rebuilt"}
            )
        }
    )
    async with MilvusExampleStore(rebuilt_settings.milvus) as store:
        await store.ensure_collection()
        await apply_log(records, store, settings)
    rebuilt = await _examples(rebuilt_settings, "acme")
    assert set(rebuilt) == set(live)
    for key, example in live.items():
        assert (rebuilt[key].request, rebuilt[key].response, rebuilt[key].replay_rounds) == (
            example.request,
            example.response,
            example.replay_rounds,
        )
