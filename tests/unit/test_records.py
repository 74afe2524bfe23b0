"""Request parsing: every kind of bad input maps to a typed BadInput with a helpful message."""

from __future__ import annotations

import orjson
import pytest

from infra.errors import DecodeError, ForbiddenReplyTopic, LimitExceeded, SchemaError, UnknownTenant
from infra.settings import LimitsSettings
from streams.codecs import decode_vector, encode_vector, register_codecs
from streams.records import (
    ErrorInfo,
    ExampleRef,
    LogRecord,
    PreparedRecord,
    ReplyRecord,
    RouteInfo,
    parse_request,
    reply_address,
)

register_codecs()
LIMITS = LimitsSettings(max_prompt_chars=100, max_new_tokens=64, tenants=None)
DEFAULT = "echolm.replies"


def _raw(**fields: object) -> bytes:
    base: dict[str, object] = {"request_id": "r1", "tenant": "acme", "prompt": "hello"}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def test_valid_request_gets_defaults() -> None:
    r = parse_request(_raw(), default_reply_topic=DEFAULT, limits=LIMITS, now=1000.0)
    assert (r.request_id, r.tenant, r.prompt, r.reply_topic) == ("r1", "acme", "hello", DEFAULT)
    assert r.max_new_tokens == min(LIMITS.default_new_tokens, LIMITS.max_new_tokens)
    assert r.deadline_at == 1000.0 + LIMITS.default_deadline_s
    assert r.no_store is False


@pytest.mark.parametrize(
    ("raw", "error", "words"),
    [
        (b"\xff\xfe not json", DecodeError, "JSON"),
        (b"[1, 2]", DecodeError, "object"),
        (b"", DecodeError, "JSON"),
        (_raw(prompt=...), SchemaError, "prompt"),
        (_raw(request_id=...), SchemaError, "request_id"),
        (_raw(tenant=5), SchemaError, "tenant"),
        (_raw(prompt=["x"]), SchemaError, "prompt"),
        (_raw(prompt="   "), LimitExceeded, "empty"),
        (_raw(prompt="x" * 101), LimitExceeded, "max_prompt_chars"),
        (_raw(max_new_tokens=65), LimitExceeded, "max_new_tokens"),
        (_raw(max_new_tokens=0), LimitExceeded, "max_new_tokens"),
        (_raw(max_new_tokens=True), SchemaError, "max_new_tokens"),
        (_raw(reply_topic="echolm.deadletter"), ForbiddenReplyTopic, "not allowed"),
        (_raw(reply_topic="__consumer_offsets"), ForbiddenReplyTopic, "not allowed"),
        (_raw(surprise=1), SchemaError, "unknown fields"),
        (_raw(version=2), SchemaError, "version"),
        (_raw(request_id="has space"), SchemaError, "request_id"),
        (_raw(tenant="../etc"), SchemaError, "tenant"),
        (_raw(prompt="a\x00b"), SchemaError, "NUL"),
        (_raw(deadline_s=-1), LimitExceeded, "deadline_s"),
        (b"{" * 10, DecodeError, "JSON"),
    ],
)
def test_bad_input_is_typed(raw: bytes, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        parse_request(raw, default_reply_topic=DEFAULT, limits=LIMITS)


def test_oversized_record_rejected_before_decoding() -> None:
    limits = LimitsSettings(max_record_bytes=1024)
    with pytest.raises(LimitExceeded, match="max_record_bytes"):
        parse_request(b" " * 2000, default_reply_topic=DEFAULT, limits=limits)


def test_unknown_tenant() -> None:
    limits = LimitsSettings(tenants=["acme"])
    with pytest.raises(UnknownTenant, match="acme"):
        parse_request(_raw(tenant="other"), default_reply_topic=DEFAULT, limits=limits)


def test_private_reply_topic_allowed() -> None:
    r = parse_request(_raw(reply_topic="echolm.replies.client-7"), default_reply_topic=DEFAULT, limits=LIMITS)
    assert r.reply_topic == "echolm.replies.client-7"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"request_id": "r1", "tenant": "acme"}, ("r1", "acme", DEFAULT)),
        ({"request_id": "r1", "reply_topic": "evil.topic"}, ("r1", "", DEFAULT)),
        ({"request_id": "r1", "reply_topic": "echolm.replies.me"}, ("r1", "", "echolm.replies.me")),
        ({"request_id": 5}, None),
        ({"tenant": "acme"}, None),
    ],
)
def test_reply_address_never_forged(data: dict[str, object], expected: tuple[str, str, str] | None) -> None:
    address = reply_address(data, DEFAULT, LIMITS)
    got = None if address is None else (address.request_id, address.tenant, address.reply_topic)
    assert got == expected


def test_records_round_trip_through_orjson_codec() -> None:
    import numpy as np

    request = parse_request(_raw(), default_reply_topic=DEFAULT, limits=LIMITS)
    vec = np.linspace(-1, 1, 384, dtype=np.float32)
    ref = ExampleRef(example_id="e", request="q", response="a", similarity=0.9, utility=0.7)
    prepared = PreparedRecord(
        request=request, embedding=encode_vector(vec), examples=[ref], timings_ms={"embed": 1.5}
    )
    back = PreparedRecord.loads(prepared.dumps())
    assert back.request.prompt == "hello" and back.examples[0].utility == 0.7
    assert np.array_equal(decode_vector(back.embedding), vec)
    reply = ReplyRecord(request_id="r1", tenant="acme", ok=False, error=ErrorInfo(code="x", message="y"))
    log = LogRecord(
        request=request, embedding="", examples=[ref], route=RouteInfo(backend="b", tier="small"), reply=reply
    )
    back_log = LogRecord.loads(log.dumps())
    assert back_log.reply.error is not None and back_log.reply.error.code == "x"
    assert back_log.route is not None and back_log.route.tier == "small"
