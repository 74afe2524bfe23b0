"""Authenticated tenants on the Kafka path (issue 13), through a real worker on Tansu, Milvus and the
dev TGI servers, with ``limits.tenant_secrets`` on.

An attacker holds its own tenant's secret (``evil``) and not the victim's (``acme``). It forges the
tenant of a request, names the victim's private reply topic, and rates the victim's request twice
(as itself, and claiming the victim's tenant). Each is refused with a dead letter; the error replies
go to the shared reply topic, never to a private one; the victim's private topic holds only the
victim's own replies; the attacker's private topic holds nothing of the victim's; the router learns
from the victim's rating alone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest

from devstack.localstack import create_topics
from echolm.client import EchoClient
from infra.settings import Settings
from infra.signing import sign

from .conftest import PipelineFactory
from .fleet import read_topic

pytestmark = pytest.mark.integration

SECRETS = [{"tenant": "acme", "secret": "acme-" + "a" * 24}, {"tenant": "evil", "secret": "evil-" + "e" * 24}]
VAULT = "The vault code of the Harrow branch is 4417."
QUESTION = "What is the vault code of the Harrow branch?"


def _holding(settings: Settings, tenant: str) -> Settings:
    """The settings a client of ``tenant`` has: its own secret only."""
    own = [s for s in settings.limits.tenant_secrets if s.tenant == tenant]
    return settings.model_copy(update={"limits": settings.limits.model_copy(update={"tenant_secrets": own})})


async def _until(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a topic
        await asyncio.sleep(0.5)


async def test_forged_tenant_reply_topic_and_feedback_are_refused_over_kafka(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = await pipeline_factory(workers=1, limits={"tenant_secrets": SECRETS})
    settings = pipeline.settings
    shared = settings.topic("replies")
    private = {t: f"{shared}.{t}" for t in ("acme", "evil")}
    await create_topics(settings.kafka.bootstrap_servers, {topic: 1 for topic in private.values()})
    evil_secret = SECRETS[1]["secret"]

    async with EchoClient(_holding(settings, "acme"), reply_topic=private["acme"]) as victim:
        told = await victim.ask(f"{VAULT} Repeat it.", tenant="acme", timeout=180, max_new_tokens=16)
        asked = await victim.ask(QUESTION, tenant="acme", timeout=180, max_new_tokens=16)
        assert told.ok and asked.ok, (told, asked)

        async with EchoClient(_holding(settings, "evil"), reply_topic=private["evil"]) as attacker:
            forged_tenant = uuid.uuid4().hex  # claims acme, signed with evil's secret
            body = {
                "request_id": forged_tenant,
                "tenant": "acme",
                "prompt": QUESTION,
                "reply_topic": private["evil"],
            }
            await attacker.send(QUESTION, raw=orjson.dumps({**body, "signature": sign(body, evil_secret)}))
            unsigned = uuid.uuid4().hex  # claims acme, no signature at all
            await attacker.send(
                QUESTION, raw=orjson.dumps({"request_id": unsigned, "tenant": "acme", "prompt": QUESTION})
            )
            forged_topic = uuid.uuid4().hex  # evil, properly signed, but names acme's private topic
            body = {
                "request_id": forged_topic,
                "tenant": "evil",
                "prompt": QUESTION,
                "reply_topic": private["acme"],
            }
            await attacker.send(QUESTION, raw=orjson.dumps({**body, "signature": sign(body, evil_secret)}))
            own = await attacker.ask(QUESTION, tenant="evil", timeout=180, max_new_tokens=16)  # legitimate
            assert own.ok, own

            await attacker.feedback(
                asked.request_id, 0.0, tenant="evil", rater="mallory"
            )  # rates acme's request
            await attacker.feedback(
                asked.request_id, 0.0, tenant="acme", rater="mallory"
            )  # claims acme, unsigned
        await victim.feedback(asked.request_id, 1.0, tenant="acme", rater="alice")

    forged = {forged_tenant, unsigned, forged_topic}

    async def letters() -> list[dict[str, Any]]:
        return await read_topic(settings, settings.topic("deadletter"))

    async def settled() -> bool:
        got = await letters()
        return (
            forged <= {d["request_id"] for d in got}
            and sum(d["source_topic"] == settings.topic("feedback") for d in got) >= 2
        )

    await _until(settled, 60)
    dead = await letters()
    codes = {d["request_id"]: d["error_code"] for d in dead if d["request_id"] in forged}
    assert codes == {
        forged_tenant: "unauthorized",
        unsigned: "unauthorized",
        forged_topic: "forbidden_reply_topic",
    }
    refused_feedback = [d for d in dead if d["source_topic"] == settings.topic("feedback")]
    assert len(refused_feedback) == 2 and {d["error_code"] for d in refused_feedback} == {"unauthorized"}

    # error replies only on the shared topic; private topics hold only their own tenant's answers
    on_shared = {r["request_id"]: r for r in await read_topic(settings, shared)}
    assert forged <= on_shared.keys() and not any(on_shared[i]["ok"] for i in forged)
    on_acme = await read_topic(settings, private["acme"])
    assert {r["request_id"] for r in on_acme} == {told.request_id, asked.request_id}
    on_evil = await read_topic(settings, private["evil"])
    assert {r["request_id"] for r in on_evil} == {own.request_id}
    assert all("4417" not in (r.get("text") or "") for r in on_evil), on_evil

    # the router learned from acme's own rating only
    async def learned() -> bool:
        ups = await read_topic(settings, settings.topic("model-updates"))
        return any(u["request_id"] == asked.request_id for u in ups)

    await _until(learned, 30)
    await asyncio.sleep(2.0)  # a refused rating that slipped through would land by now
    updates = [
        u
        for u in await read_topic(settings, settings.topic("model-updates"))
        if u["request_id"] == asked.request_id
    ]
    assert [(u["rater"], u["reward"]) for u in updates] == [("alice", 1.0)], updates
