"""Request parsing: every kind of bad input maps to a typed BadInput with a helpful message."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from infra.errors import DecodeError, ForbiddenReplyTopic, LimitExceeded, SchemaError, UnknownTenant
from infra.settings import LimitsSettings
from streams.codecs import decode_vector, encode_vector, register_codecs
from streams.records import (
    LOG_VERSION,
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


# ---------------------------------------------------------------------------------------- migration
# Written by the v1 code (commit aa5b715) exactly as it lay on the prepared and log topics.
_V1_REQUEST = (
    b'{"request_id":"r1","tenant":"acme","prompt":"hello","max_new_tokens":8,"reply_topic":"echolm.replies",'
    b'"no_store":false,"deadline_at":1000.0,"created_at":900.0,"version":1,"__faust":{"ns":"echolm.Request.v1"}}'
)
_V1_REF = (
    b'{"example_id":"e1","request":"hi","response":"hello!","similarity":0.9,"utility":0.7,"model_tier":"large",'
    b'"__faust":{"ns":"echolm.ExampleRef.v1"}}'
)
V1_PREPARED = (
    b'{"request":' + _V1_REQUEST + b',"embedding":"AACAPwAAAEA=","examples":[' + _V1_REF + b"],"
    b'"selection_bypassed":"","timings_ms":{"parse":0.1},"source_offset":-1,"source_partition":-1,'
    b'"version":1,"__faust":{"ns":"echolm.Prepared.v1"}}'
)
V1_LOG = (
    b'{"request":' + _V1_REQUEST + b',"embedding":"AACAPwAAAEA=","examples":[' + _V1_REF + b"],"
    b'"route":{"backend":"small-0","tier":"small","scores":{},"expected_quality":{},"load_penalty":{},'
    b'"queue_depths":{},"reason":"","ask_feedback":false,"attempts":1,"bias":0.0,"context":[1.0,0.2],'
    b'"__faust":{"ns":"echolm.RouteInfo.v1"}},"reply":{"request_id":"r1","tenant":"acme","ok":true,'
    b'"text":"hey","error":null,"backend":"small-0","tier":"small","n_examples":1,"timings_ms":{},'
    b'"worker":"","version":1,"__faust":{"ns":"echolm.Reply.v1"}},"generated_tokens":0,"logged_at":950.0,'
    b'"origin":"serve","quality":-1.0,"replay_rounds":0,"version":1,"__faust":{"ns":"echolm.Log.v1"}}'
)


def test_v1_prepared_records_decode_with_the_v1_defaults() -> None:
    old = PreparedRecord.loads(V1_PREPARED)
    assert (old.version, old.context, old.request.prompt) == (1, [], "hello")
    (ref,) = old.examples
    assert (ref.example_id, ref.similarity, ref.utility) == ("e1", 0.9, 0.7)
    assert (ref.quality, ref.replay_rounds, ref.created_at) == (0.5, 0, 0.0)  # what v1 readers assumed
    assert decode_vector(old.embedding).tolist() == [1.0, 2.0]


def test_v1_log_records_decode_and_new_ones_say_v2() -> None:
    old = LogRecord.loads(V1_LOG)
    assert old.version == 1 and old.route is not None
    assert (old.route.context, old.route.generate_ms, old.examples[0].quality) == ([1.0, 0.2], [], 0.5)
    new = LogRecord.loads(
        LogRecord(
            request=old.request,
            embedding=old.embedding,
            examples=[
                ExampleRef(example_id="e", request="q", response="a", similarity=1, utility=1, quality=0.9)
            ],
            route=RouteInfo(backend="b", tier="small", generate_ms=[12.5, 30.0]),
            reply=old.reply,
        ).dumps()
    )
    assert (new.version, LOG_VERSION) == (2, 2)
    assert new.examples[0].quality == 0.9 and new.route is not None and new.route.generate_ms == [12.5, 30.0]


def test_an_example_ref_carries_what_the_features_read() -> None:
    ref = ExampleRef(
        example_id="e", request="q", response="a", similarity=0.8, utility=0.6, quality=0.9, replay_rounds=2,
        created_at=123.0,
    )  # fmt: skip
    back = ExampleRef.loads(ref.dumps())
    example = back.example("acme", np.zeros(4, dtype=np.float32))
    assert (example.tenant, example.quality, example.replay_rounds, example.created_at) == (
        "acme",
        0.9,
        2,
        123.0,
    )
    assert (example.request, example.response, example.model_tier) == ("q", "a", "large")
