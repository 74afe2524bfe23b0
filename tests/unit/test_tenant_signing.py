"""Tenant authenticity on the Kafka path (infra/signing.py): with ``limits.tenant_secrets`` set, a
forged tenant, a forged reply topic and forged feedback are refused; with none, nothing is checked."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from agents.learn import feedback_refusal
from echolm.gateway import build_gateway
from infra.auth import hash_key
from infra.errors import ForbiddenReplyTopic, Unauthorized
from infra.settings import LimitsSettings, load_settings
from infra.signing import sign
from streams.records import FeedbackRecord, feedback_fields, validate_request
from tests.unit.test_gateway_http import ScriptedRelay

ACME_SECRET, EVIL_SECRET = "acme-secret-0123456789", "evil-secret-0123456789"
REPLIES = "echolm.replies"
LIMITS = load_settings(
    limits={
        "tenant_secrets": [
            {"tenant": "acme", "secret": ACME_SECRET},
            {"tenant": "evil", "secret": EVIL_SECRET},
        ]
    }
).limits


def _request(tenant: str = "acme", **extra: Any) -> dict[str, Any]:
    return {
        "version": 2,
        "request_id": "r1",
        "tenant": tenant,
        "messages": [{"role": "user", "content": "hi"}],
    } | extra


def _signed(data: dict[str, Any], secret: str) -> dict[str, Any]:
    return {**data, "signature": sign(data, secret)}


def _validate(data: dict[str, Any], limits: LimitsSettings = LIMITS) -> str:
    return validate_request(data, default_reply_topic=REPLIES, limits=limits).tenant


def test_a_request_signed_by_its_tenant_is_accepted() -> None:
    assert _validate(_signed(_request(), ACME_SECRET)) == "acme"
    assert _validate(_signed(_request(reply_topic=f"{REPLIES}.acme"), ACME_SECRET)) == "acme"


def test_a_forged_tenant_is_refused() -> None:
    with pytest.raises(Unauthorized):  # evil signs with its own secret but claims acme
        _validate(_signed(_request("acme"), EVIL_SECRET))
    with pytest.raises(Unauthorized):  # no signature at all
        _validate(_request("acme"))
    signed = _signed(_request("evil"), EVIL_SECRET)
    with pytest.raises(Unauthorized):  # a signed record given another tenant afterwards
        _validate({**signed, "tenant": "acme"})
    with pytest.raises(Unauthorized):  # a tenant without a secret
        _validate(_signed(_request("nobody"), EVIL_SECRET))


def test_a_forged_reply_topic_is_refused() -> None:
    with pytest.raises(ForbiddenReplyTopic):  # evil, correctly signed, names acme's private topic
        _validate(_signed(_request("evil", reply_topic=f"{REPLIES}.acme"), EVIL_SECRET))
    signed = _signed(_request("acme"), ACME_SECRET)
    with pytest.raises(Unauthorized):  # acme's own request redirected to another topic
        _validate({**signed, "reply_topic": f"{REPLIES}.evil"})


def test_without_secrets_the_trusted_single_tenant_mode_checks_nothing() -> None:
    assert _validate(_request("acme", reply_topic=f"{REPLIES}.anything"), load_settings().limits) == "acme"


def _feedback(tenant: str, secret: str | None) -> FeedbackRecord:
    fields = feedback_fields(request_id="r1", tenant=tenant, score=1.0, rater="u", at=1.5)
    return FeedbackRecord(**fields, signature=sign(fields, secret) if secret else "")


def test_forged_feedback_is_refused() -> None:
    assert feedback_refusal(_feedback("acme", ACME_SECRET), "acme", LIMITS) is None
    assert feedback_refusal(_feedback("acme", EVIL_SECRET), "acme", LIMITS) is not None  # forged tenant
    assert feedback_refusal(_feedback("acme", None), "acme", LIMITS) is not None  # unsigned
    refused = feedback_refusal(_feedback("evil", EVIL_SECRET), "acme", LIMITS)  # rates acme's request
    assert refused is not None and "another tenant" in str(refused)
    assert feedback_refusal(_feedback("evil", None), "acme", load_settings().limits) is not None


async def test_the_gateway_signs_what_it_produces() -> None:
    settings = load_settings(
        gateway={"api_keys": [{"tenant": "acme", "key_hash": hash_key("elm-k")}]},
        limits={"tenant_secrets": [{"tenant": "acme", "secret": ACME_SECRET}]},
    )
    relay = ScriptedRelay()
    app = build_gateway(settings, relay)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        r = await http.post(
            "/v1/chat/completions",
            json={"model": "echolm-auto", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": "Bearer elm-k"},
        )
    assert r.status_code == 200
    body = orjson.loads(relay.sent[0]["raw"])
    assert (
        validate_request(body, default_reply_topic=settings.topic("replies"), limits=settings.limits).tenant
        == "acme"
    )
