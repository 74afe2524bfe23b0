"""``agents.admit.apply_log_records``: the merge rules that make the example bank a view of the log,
applied to ``FakeVectorStore``."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest

from agents.admit import apply_log_records
from agents.policy.admission import example_id
from agents.policy.replay import update_gain
from agents.state import DecisionState
from infra.errors import DependencyUnavailable
from infra.protocols import Example
from infra.settings import Settings, load_settings
from streams.codecs import encode_vector
from streams.records import ExampleRef, LogRecord, ReplyRecord, RequestRecord, RouteInfo
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore

DIM = 384
NOW = 1_700_000_000.0
SETTINGS = load_settings(kafka={"topic_prefix": "unit"})
EMBEDDER = FakeEmbedder(DIM)
PROMPT = "how do I reset my password?"


async def log_record(
    prompt: str = PROMPT,
    text: str = "Open settings, then security, then reset.",
    *,
    tenant: str = "acme",
    tier: str = "large",
    ok: bool = True,
    origin: str = "serve",
    no_store: bool = False,
    quality: float = -1.0,
    replay_rounds: int = 0,
    examples: tuple[str, ...] = (),
    embed: bool = True,
) -> LogRecord:
    request = RequestRecord(
        request_id=f"{origin}-{prompt[:8]}",
        tenant=tenant,
        prompt=prompt,
        max_new_tokens=64,
        reply_topic="unit.replies",
        no_store=no_store,
    )
    vector = (await EMBEDDER.embed([prompt]))[0]
    return LogRecord(
        request=request,
        embedding=encode_vector(vector) if embed else "",
        examples=[
            ExampleRef(example_id=e, request="q", response="a", similarity=0.9, utility=0.8) for e in examples
        ],
        route=RouteInfo(backend=f"{tier}-0", tier=tier),
        reply=ReplyRecord(
            request_id=request.request_id, tenant=tenant, ok=ok, text=text if ok else "", tier=tier
        ),
        origin=origin,
        quality=quality,
        replay_rounds=replay_rounds,
    )


async def stored(store: FakeVectorStore, prompt: str = PROMPT, tenant: str = "acme") -> Example:
    (found,) = await store.get(tenant, [example_id(tenant, prompt)])
    return found


async def seed(store: FakeVectorStore, prompt: str = PROMPT, **fields: object) -> Example:
    vector = (await EMBEDDER.embed([prompt]))[0]
    example = Example(
        example_id=example_id("acme", prompt),
        tenant="acme",
        request=prompt,
        response="the original answer",
        embedding=vector,
        created_at=NOW - 3600,
        updated_at=NOW - 3600,
    )
    example = replace(example, **fields)  # type: ignore[arg-type]
    await store.upsert([example])
    return example


def scalars(example: Example) -> dict[str, Any]:
    """Every field but the embedding (arrays do not compare with ``==``)."""
    return {f.name: getattr(example, f.name) for f in fields(example) if f.name != "embedding"}


async def apply(
    store: FakeVectorStore,
    *records: LogRecord,
    settings: Settings = SETTINGS,
    state: DecisionState | None = None,
) -> dict[str, int]:
    return await apply_log_records(records, store, settings, now=NOW, state=state)


# --------------------------------------------------------------------------------------- admission
async def test_a_served_large_tier_answer_is_inserted_when_absent() -> None:
    store = FakeVectorStore(DIM)
    counts = await apply(store, await log_record(text="Write to me at jane@example.com."))
    assert counts["admitted"] == 1
    example = await stored(store)
    assert (example.request, example.response) == (PROMPT, "Write to me at [EMAIL].")  # PII scrubbed
    assert (example.model_tier, example.quality, example.created_at) == ("large", 0.5, NOW)


async def test_a_served_answer_never_overwrites_an_existing_example() -> None:
    store = FakeVectorStore(DIM)
    old = await seed(store, quality=0.9, gain=0.4, offloads=3.0, replay_rounds=2)
    counts = await apply(store, await log_record(text="a different answer"))
    assert counts["admitted"] == 0
    assert scalars(await stored(store)) == scalars(old)


async def test_a_replayed_answer_replaces_the_answer_and_bumps_rounds_but_keeps_statistics() -> None:
    store = FakeVectorStore(DIM)
    old = await seed(store, quality=0.4, gain=0.3, offloads=2.0, replay_rounds=1)
    counts = await apply(
        store, await log_record(text="a better answer", origin="replay", quality=0.85, replay_rounds=2)
    )
    assert counts["replaced"] == 1
    new = await stored(store)
    assert (new.response, new.quality, new.replay_rounds, new.updated_at) == ("a better answer", 0.85, 2, NOW)
    assert (new.gain, new.offloads, new.created_at) == (old.gain, old.offloads, old.created_at)


async def test_rounds_never_move_backwards_on_a_late_replay_record() -> None:
    store = FakeVectorStore(DIM)
    await seed(store, replay_rounds=4)
    await apply(store, await log_record(origin="replay", quality=0.7, replay_rounds=2))
    assert (await stored(store)).replay_rounds == 4


async def test_an_imported_pair_overwrites_an_existing_example() -> None:
    store = FakeVectorStore(DIM)
    await seed(store, quality=0.2, gain=0.5, offloads=4.0)
    counts = await apply(store, await log_record(text="the operator's answer", origin="import", quality=0.95))
    assert counts["imported"] == 1
    new = await stored(store)
    assert (new.response, new.quality, new.gain, new.offloads) == ("the operator's answer", 0.95, 0.0, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"no_store": True},
        {"ok": False},
        {"tier": "small"},
        {"text": "   "},
        {"embed": False},
    ],
    ids=["no_store", "error_reply", "small_tier", "empty_answer", "no_embedding"],
)
async def test_what_must_not_enter_the_bank_is_rejected(kwargs: dict[str, object]) -> None:
    store = FakeVectorStore(DIM)
    counts = await apply(store, await log_record(**kwargs))  # type: ignore[arg-type]
    assert counts == {"admitted": 0, "replaced": 0, "imported": 0, "credited": 0, "rejected": 1}
    assert await store.count() == 0


async def test_a_batch_is_applied_with_one_upsert() -> None:
    store = FakeVectorStore(DIM)
    records = [await log_record(f"question number {i}") for i in range(5)]
    counts = await apply(store, *records)
    assert counts["admitted"] == 5 and await store.count() == 5
    assert store.calls["upsert"] == 1


async def test_the_same_request_twice_in_one_batch_is_one_example() -> None:
    store = FakeVectorStore(DIM)
    await apply(store, await log_record(text="first"), await log_record(text="second"))
    assert await store.count() == 1
    assert (await stored(store)).response == "second"  # the later record of the batch wins


async def test_tenants_with_the_same_prompt_get_separate_examples() -> None:
    store = FakeVectorStore(DIM)
    await apply(store, await log_record(tenant="acme", text="A"), await log_record(tenant="globex", text="G"))
    assert (await stored(store, tenant="acme")).response == "A"
    assert (await stored(store, tenant="globex")).response == "G"


# ------------------------------------------------------------------------- demand: gain and offloads
async def test_uses_raise_the_replay_gain_and_queue_the_example_for_replay() -> None:
    store = FakeVectorStore(DIM)
    old = await seed(store, quality=0.5, gain=0.1)
    state = DecisionState.create(SETTINGS)
    uses = [
        await log_record(f"user question {i}", tier="large", examples=(old.example_id,)) for i in range(2)
    ]
    counts = await apply(store, *uses, state=state)

    r = SETTINGS.replay
    expected = old.gain
    for _ in range(2):  # each use is one EMA step at the large tier's cost (10 of 10)
        expected = update_gain(expected, quality=0.5, cost=10.0, max_cost=10.0, ema=r.gain_ema)
    assert counts["credited"] == 1
    new = await stored(store)
    assert new.gain == pytest.approx(expected) and new.gain > old.gain
    assert new.offloads == old.offloads  # a large-tier reply did not offload anything
    ((tenant, queued_id, queued_gain),) = state.replay_queue.pop(5)
    assert (tenant, queued_id) == ("acme", old.example_id) and queued_gain == pytest.approx(expected)


async def test_a_small_tier_reply_that_used_an_example_credits_it_an_offload() -> None:
    store = FakeVectorStore(DIM)
    old = await seed(store, offloads=0.0, updated_at=NOW)
    await apply(store, await log_record("a user question", tier="small", examples=(old.example_id,)))
    new = await stored(store)
    assert new.offloads == pytest.approx(1.0) and new.updated_at == NOW
    assert new.response == old.response  # the small tier's own answer is not admitted


async def test_offload_credit_decays_what_was_there_before() -> None:
    store = FakeVectorStore(DIM)
    old = await seed(store, offloads=2.0, updated_at=NOW - 3600)
    await apply(store, await log_record("a user question", tier="small", examples=(old.example_id,)))
    decay = SETTINGS.replay.value_decay_per_hour
    assert (await stored(store)).offloads == pytest.approx(2.0 * decay + 1.0)


async def test_an_error_reply_credits_nothing() -> None:
    store = FakeVectorStore(DIM)
    old = await seed(store, gain=0.1)
    counts = await apply(store, await log_record("q", tier="small", ok=False, examples=(old.example_id,)))
    assert counts["credited"] == 0 and scalars(await stored(store)) == scalars(old)


async def test_an_example_evicted_since_it_was_selected_is_skipped() -> None:
    store = FakeVectorStore(DIM)
    counts = await apply(store, await log_record("q", tier="small", examples=("gone",)))
    assert counts["credited"] == 0 and await store.count() == 0


async def test_a_down_store_raises_so_the_batch_is_retried() -> None:
    store = FakeVectorStore(DIM)
    store.unavailable = True
    with pytest.raises(DependencyUnavailable):
        await apply(store, await log_record())
