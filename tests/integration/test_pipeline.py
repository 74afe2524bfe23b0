"""The pipeline end to end on real components: Tansu broker, embedded Milvus server, MiniLM, and dev
TGI servers running SmolLM2. Never asserts on reply wording (a 135M model's words vary)."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from agents.policy.admission import example_id
from echolm.bank import read_log, read_topic
from echolm.client import EchoClient, Reply
from infra.milvus import MilvusExampleStore
from infra.settings import Settings
from streams.records import LogRecord

from .conftest import PipelineFactory

pytestmark = pytest.mark.integration

QUESTIONS = [
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the capital of France?", "What's the capital city of France?"),
    ("How do I reverse a list in Python?", "How can I reverse a Python list?"),
    ("What time does the store open on Sunday?", "When does the store open on Sundays?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription?"),
    ("Can I return an item without a receipt?", "Is it possible to return an item without a receipt?"),
    ("How long does shipping take to Canada?", "How long does delivery to Canada take?"),
    ("What is the boiling point of water?", "At what temperature does water boil?"),
    ("How do I change my email address?", "How can I change my e-mail address?"),
    ("Do you offer student discounts?", "Is there a discount for students?"),
]
TENANTS = ("acme", "globex")


async def _wait_for_count(settings: Settings, tenant: str, expected: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    async with MilvusExampleStore(settings.milvus) as store:
        await store.ensure_collection()
        count = 0
        while time.monotonic() < deadline:
            count = await store.count(tenant)
            if count >= expected:
                return count
            await asyncio.sleep(0.5)
        return count


def _assert_paraphrases_used_own_pairs(
    tenant: str, log: list[LogRecord], sent: dict[str, tuple[str, str]]
) -> None:
    """Each paraphrase was served with its own tenant's earlier pair among its examples, and no
    example ever crossed tenants."""
    by_id = {r.request.request_id: r for r in log}
    own_ids = {example_id(tenant, q) for q, _ in QUESTIONS}
    other = next(t for t in TENANTS if t != tenant)
    other_ids = {example_id(other, q) for q, _ in QUESTIONS}
    for original, paraphrase in QUESTIONS:
        rid = next(i for i, (t, p) in sent.items() if t == tenant and p == paraphrase)
        record = by_id[rid]
        # selected by prepare; also shown unless the router served a tier without examples
        used = {e.example_id for e in (record.selected or record.examples)}
        shown = {e.example_id for e in record.examples}
        assert shown == used or (not shown and record.route is not None and not record.route.with_examples)
        assert example_id(tenant, original) in used, (tenant, paraphrase, used)
    for record in log:
        if record.request.tenant == tenant:
            ids = {e.example_id for e in record.examples}
            assert not ids & other_ids
            assert not {e.example_id for e in record.selected or []} & other_ids
            # examples are this tenant's own answers: the originals, and any phase-2 prompt answered and
            # admitted before a similar one was prepared (the five rhyme prompts are alike)
            own_prompts = {example_id(tenant, p) for t, p in sent.values() if t == tenant}
            assert ids <= own_ids | own_prompts


@pytest.mark.parametrize("hop", ["kafka", "inline"])
async def test_fifty_requests_two_tenants_end_to_end(pipeline_factory: PipelineFactory, hop: str) -> None:
    """The same 50 requests whether prepared records cross the prepared topic or are handed to serve
    in process (``worker.prepared_hop``)."""
    pipeline = await pipeline_factory(workers=1, worker={"prepared_hop": hop})
    settings = pipeline.settings
    originals: dict[tuple[str, str], str] = {}
    async with EchoClient(settings) as client:
        # Phase 1: 20 originals, one at a time so backends stay idle and the large tier answers them.
        for tenant in TENANTS:
            for original, _ in QUESTIONS:
                reply = await client.ask(original, tenant=tenant, timeout=120, max_new_tokens=8)
                assert reply.ok, reply
                originals[(tenant, original)] = reply.request_id
        for tenant in TENANTS:
            assert await _wait_for_count(settings, tenant, len(QUESTIONS)) == len(QUESTIONS)

        # Phase 2: 30 requests fired at once: every paraphrase, plus 5 fresh questions per tenant.
        sent: dict[str, tuple[str, str]] = {}
        for tenant in TENANTS:
            for _, paraphrase in QUESTIONS:
                sent[await client.send(paraphrase, tenant=tenant, max_new_tokens=8)] = (tenant, paraphrase)
            for i in range(5):
                prompt = f"Write one word that rhymes with number {i} for {tenant}."
                sent[await client.send(prompt, tenant=tenant, max_new_tokens=8)] = (tenant, prompt)
        replies: list[Reply] = []
        async for reply in client.replies(timeout=120):
            replies.append(reply)
            if len(replies) == len(sent):
                break
        assert client.duplicates == 0 or len({r.request_id for r in replies}) == len(replies)

    # 50 in, 50 out: matched by id, none lost, none twice.
    assert len(replies) == len(sent) == 30
    assert {r.request_id for r in replies} == set(sent)
    assert all(r.ok for r in replies), [r for r in replies if not r.ok]
    assert all(r.tenant == sent[r.request_id][0] for r in replies)

    # A log record per request (replay and import records are not requests).
    log = [r for r in await read_log(settings) if r.origin == "serve"]
    by_id = {r.request.request_id: r for r in log}
    assert len(log) == 50 and set(by_id) == set(sent) | set(originals.values())

    for tenant in TENANTS:
        _assert_paraphrases_used_own_pairs(tenant, log, sent)
    prepared = await read_topic(settings, settings.topic("prepared"))
    # kafka: every request crossed the prepared topic (at least once); inline: none did
    assert len(prepared) >= 50 if hop == "kafka" else prepared == []


async def _hold_queue(url: str, n: int, tokens: int) -> list[asyncio.Task[httpx.Response]]:
    """Fill a backend's queue with real work: n long generations sent straight to it."""
    client = httpx.AsyncClient(timeout=300)
    body = {
        "messages": [{"role": "user", "content": "Write a very long story about a ship lost at sea."}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    tasks = [asyncio.create_task(client.post(f"{url}/v1/chat/completions", json=body)) for _ in range(n)]
    tasks[-1].add_done_callback(lambda _: asyncio.ensure_future(client.aclose()))
    return tasks


async def _queue_depth(url: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{url}/metrics")).text
    for line in text.splitlines():
        if line.startswith("tgi_queue_size"):
            return float(line.split()[-1])
    return 0.0


async def test_routing_follows_live_queue_depth(pipeline_factory: PipelineFactory) -> None:
    pipeline = await pipeline_factory(workers=1)
    settings = pipeline.settings
    large = next(b for b in settings.tgi.backends if b.tier == settings.tgi.large_tier)
    async with EchoClient(settings) as client:
        idle = await client.ask("Name a colour.", tenant="acme", timeout=120, max_new_tokens=4)
        assert idle.ok and idle.tier == "large", "with idle backends and no examples the large tier answers"

        held = await _hold_queue(large.url, n=12, tokens=160)
        deadline = time.monotonic() + 20
        while await _queue_depth(large.url) < 8 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls an HTTP gauge
            await asyncio.sleep(0.1)
        assert await _queue_depth(large.url) >= 8
        await asyncio.sleep(2 * settings.tgi.probe_interval_s)
        busy = [
            await client.ask(f"Name a fruit, take {i}.", tenant="acme", timeout=120, max_new_tokens=4)
            for i in range(4)
        ]
        depth_after = await _queue_depth(large.url)
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    assert depth_after >= 4, "the large queue must still have been held when the last request was routed"
    assert [r.tier for r in busy] == ["small"] * 4, [(r.backend, r.tier) for r in busy]


async def test_two_workers_share_the_request_partitions(pipeline_factory: PipelineFactory) -> None:
    pipeline = await pipeline_factory(workers=2)
    async with EchoClient(pipeline.settings) as client:
        ids = [await client.send(f"Say the number {i}.", tenant="acme", max_new_tokens=4) for i in range(24)]
        replies = [r async for r in _take(client, len(ids))]
    assert {r.request_id for r in replies} == set(ids)
    workers = {r.worker for r in replies}
    assert len(workers) == 2, workers


async def _take(client: EchoClient, n: int):  # type: ignore[no-untyped-def]
    got = 0
    async for reply in client.replies(timeout=120):
        yield reply
        got += 1
        if got == n:
            return


async def test_bad_input_gets_error_replies_and_dead_letters(pipeline_factory: PipelineFactory) -> None:
    pipeline = await pipeline_factory(workers=1)
    settings = pipeline.settings
    bad: list[tuple[bytes, str, str | None]] = [  # raw value, expected error code, request id for a reply
        (b"\x00\xffnot json at all", "decode_error", None),
        (
            orjson.dumps({"request_id": "bad-schema", "tenant": "acme", "prompt": 42}),
            "schema_error",
            "bad-schema",
        ),
        (orjson.dumps({"request_id": "bad-missing", "tenant": "acme"}), "schema_error", "bad-missing"),
        (
            orjson.dumps({"request_id": "bad-empty", "tenant": "acme", "prompt": "  "}),
            "limit_exceeded",
            "bad-empty",
        ),
        (
            orjson.dumps(
                {
                    "request_id": "bad-huge",
                    "tenant": "acme",
                    "prompt": "x" * (settings.limits.max_prompt_chars + 1),
                }
            ),
            "limit_exceeded",
            "bad-huge",
        ),
        (
            orjson.dumps(
                {
                    "request_id": "bad-topic",
                    "tenant": "acme",
                    "prompt": "hi",
                    "reply_topic": settings.topic("replies") + ".nobody-created-this",
                }
            ),
            "unknown_reply_topic",
            "bad-topic",
        ),
        (
            orjson.dumps(
                {"request_id": "bad-forged", "tenant": "acme", "prompt": "hi", "reply_topic": "other.topic"}
            ),
            "forbidden_reply_topic",
            "bad-forged",
        ),
    ]
    async with EchoClient(settings) as client:
        for raw, _, rid in bad:
            await client.send("", request_id=rid or None, raw=raw)
        errors: dict[str, Reply] = {}
        async for reply in client.replies(timeout=60):
            errors[reply.request_id] = reply
            if len(errors) == sum(1 for _, _, rid in bad if rid):
                break
        good = await client.ask("Still there?", tenant="acme", timeout=120, max_new_tokens=4)
    assert good.ok, "the worker keeps serving after bad input"
    for _, code, rid in bad:
        if rid:
            assert not errors[rid].ok and errors[rid].error_code == code, (rid, errors[rid])
            assert errors[rid].error_message

    letters = [orjson.loads(v) for v in await read_topic(settings, settings.topic("deadletter"))]
    assert sorted(letter["error_code"] for letter in letters) == sorted(code for _, code, _ in bad)
    for letter in letters:
        assert letter["source_topic"] == settings.topic("requests")
        assert letter["partition"] >= 0 and letter["offset"] >= 0 and letter["reason"]
    offsets = {(letter["partition"], letter["offset"]) for letter in letters}
    assert len(offsets) == len(bad), "each dead letter points at its own record"
