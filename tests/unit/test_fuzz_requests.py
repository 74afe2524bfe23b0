"""Hostile input, fuzzed: ``streams.records.parse_request`` over thousands of malformed values.

Properties, for any bytes or text a client can put on the requests topic:

1. it returns a ``RequestRecord`` or raises a ``BadInput`` subclass, nothing else;
2. what it accepts is safe downstream: ids and tenants match their patterns in full (no trailing
   newline), the tenant can be used in a Milvus filter, the record serialises, the reply topic is
   the default or ``<default>.<suffix>`` with a strict suffix (never a forged destination);
3. ``reply_address`` (where an error reply goes for a record that failed) never names a forged topic.

Examples are random per run (``database=None``: no ``.hypothesis`` folder in the tree); a failure
prints the falsifying value, which belongs in a parametrised regression test.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from infra.errors import BadInput
from infra.milvus import tenant_filter
from infra.settings import LimitsSettings
from streams.codecs import register_codecs
from streams.records import RequestRecord, decode_object, parse_request, reply_address

register_codecs()
LIMITS = LimitsSettings(max_prompt_chars=2000, max_new_tokens=64, max_record_bytes=16 * 1024)
DEFAULT = "echolm.replies"
NOW = 1_700_000_000.0
SAFE_REPLY_TOPIC = re.compile(re.escape(DEFAULT) + r"(?:\.[A-Za-z0-9_-]{1,64})?")
ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TENANT = re.compile(r"[A-Za-z0-9_-]{1,64}")
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------------------------ strategies
# Strings chosen to break validators: line ends after a valid id ($ matches before "\n"), control
# and invisible characters, look-alike Unicode, NUL, lone surrogates, path and topic tricks.
NASTY = st.sampled_from(
    [
        "",
        " ",
        "\n",
        "acme\n",
        "acme\r\n",
        "acme\x00",
        "ac\u200bme",
        "\uff41\uff43\uff4d\uff45",  # full-width "acme"
        "acme\u2028",
        "\ud800",
        "r1\n",
        "../../etc",
        "a" * 65,
        "a" * 129,
        "x" * 5000,
        '" or tenant != "',
        "acme\\",
        "<|im_start|>system",
        "NaN",
        "1e309",
    ]
)
# Reply topics an attacker would try: other internal topics, the prefix without the dot, suffixes
# that smuggle a second dot, a newline or a control character, or are too long.
FORGED_TOPICS = st.sampled_from(
    [
        "echolm.deadletter",
        "echolm.log",
        "echolm.requests",
        "__consumer_offsets",
        "echolm.repliesX",
        "echolm.replies.",
        "echolm.replies..x",
        "echolm.replies.a.b",
        "echolm.replies.x\n",
        "echolm.replies.x\x00",
        "echolm.replies./etc",
        "echolm.replies." + "a" * 65,
        "ECHOLM.REPLIES",
        " echolm.replies",
        "echolm.replies ",
        "other.replies.x",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    NASTY,
)
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = (
    "version",
    "request_id",
    "tenant",
    "prompt",
    "max_new_tokens",
    "reply_topic",
    "no_store",
    "deadline_s",
    "created_at",
    "metadata",
)


def _value_for(field: str) -> st.SearchStrategy[Any]:
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "version": st.sampled_from([1, 1.0, 2, 0, -1, "1", True]),
        "request_id": st.from_regex(ID, fullmatch=True) | NASTY,
        "tenant": st.from_regex(TENANT, fullmatch=True) | NASTY,
        "prompt": st.text(min_size=0, max_size=2100) | NASTY,
        "max_new_tokens": st.integers(min_value=-5, max_value=100) | st.sampled_from([True, 1.5, "8"]),
        "reply_topic": FORGED_TOPICS
        | st.just(DEFAULT)
        | st.text(max_size=80).map(lambda s: f"{DEFAULT}.{s}"),
        "no_store": st.booleans() | st.sampled_from([0, 1, "true", None]),
        "deadline_s": st.floats(min_value=-10, max_value=5000, allow_nan=False)
        | st.sampled_from([True, 0, "5"]),
        "created_at": st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([True, "now"]),
        "metadata": st.dictionaries(st.text(max_size=5), SCALARS, max_size=3) | SCALARS,
    }
    return plausible[field] | JSON


@st.composite
def request_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A request object with a few fields missing, mangled or added (unknown fields)."""
    obj: dict[str, Any] = {"request_id": "r1", "tenant": "acme", "prompt": "How do I reset my password?"}
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=5, unique=True)):
        obj[field] = draw(_value_for(field))
    for field in draw(st.lists(st.sampled_from(["request_id", "tenant", "prompt"]), max_size=2, unique=True)):
        obj.pop(field, None)
    if draw(st.booleans()) and draw(st.booleans()):
        obj[draw(st.text(min_size=1, max_size=12))] = draw(JSON)
    return obj


def dumps(value: Any) -> bytes:
    """JSON bytes for any generated value; lone surrogates become ``\\ud800`` escapes (invalid JSON
    text for a strict parser, which is the point), since orjson refuses to encode them."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value).encode()


def _nested(depth: int, kind: str) -> bytes:
    inner = "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth
    return f'{{"request_id":"r1","tenant":"acme","prompt":"hi","metadata":{{"x":{inner}}}}}'.encode()


RAW = st.one_of(
    st.binary(max_size=512),
    st.text(alphabet=st.characters(blacklist_categories=()), max_size=256),  # includes lone surrogates
    JSON.map(dumps),
    request_objects().map(dumps),
    # valid JSON, then bytes flipped or cut: invalid UTF-8, truncated escapes
    st.tuples(request_objects().map(dumps), st.integers(0, 200), st.binary(min_size=1, max_size=3)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    ),
    st.tuples(st.integers(1, 3000), st.sampled_from(["list", "dict"])).map(lambda t: _nested(*t)),
    st.integers(0, 40_000).map(lambda n: orjson.dumps({"request_id": "r", "tenant": "t", "prompt": "x" * n})),
)


# ------------------------------------------------------------------------------------ properties
def _check_accepted(record: RequestRecord) -> None:
    assert ID.fullmatch(record.request_id), record.request_id
    assert TENANT.fullmatch(record.tenant), record.tenant
    tenant_filter(record.tenant)  # the store's filter builder accepts it (no control characters)
    assert SAFE_REPLY_TOPIC.fullmatch(record.reply_topic), (
        f"forged reply topic accepted: {record.reply_topic!r}"
    )
    assert (
        record.prompt.strip()
        and len(record.prompt) <= LIMITS.max_prompt_chars
        and "\x00" not in record.prompt
    )
    assert 1 <= record.max_new_tokens <= LIMITS.max_new_tokens
    assert record.deadline_at > NOW
    orjson.loads(record.dumps())  # it can be put on a topic


def _parse(raw: bytes | str | None) -> RequestRecord | None:
    try:
        return parse_request(raw, default_reply_topic=DEFAULT, limits=LIMITS, now=NOW)
    except BadInput as exc:
        assert exc.code and str(exc), "a rejection names its code and says what to fix"
        return None


@FUZZ
@given(RAW)
@example(b'{"request_id":"r1","tenant":"acme\\n","prompt":"hi"}')
@example(b'{"request_id":"r1\\n","tenant":"acme","prompt":"hi"}')
@example(b'{"request_id":"r1","tenant":"acme","prompt":"hi","reply_topic":"echolm.replies.x\\n"}')
@example(b'{"request_id":"r1","tenant":"acme","prompt":"\\ud800"}')
@example(None)
@example("")
def test_parse_request_accepts_only_safe_records_and_rejects_with_bad_input(raw: bytes | str | None) -> None:
    record = _parse(raw)
    if record is not None:
        _check_accepted(record)


@FUZZ
@given(request_objects())
def test_mangled_request_objects(obj: dict[str, Any]) -> None:
    record = _parse(dumps(obj))
    if record is not None:
        _check_accepted(record)


@FUZZ
@given(RAW)
@example(b'{"request_id":"r1","tenant":"acme","prompt":"hi","reply_topic":"echolm.replies.x\\n"}')
@example(b'{"request_id":"r1","reply_topic":"echolm.deadletter"}')
def test_error_replies_never_go_to_a_forged_topic(raw: bytes | str | None) -> None:
    try:
        data = decode_object(raw, LIMITS)
    except BadInput:
        return
    address = reply_address(data, DEFAULT, LIMITS)
    if address is not None:
        assert SAFE_REPLY_TOPIC.fullmatch(address.reply_topic), address
        assert ID.fullmatch(address.request_id), address
        assert address.tenant == "" or TENANT.fullmatch(address.tenant), address


def test_fuzz_covers_the_space() -> None:
    """A sanity check on the generators: they must produce both accepted and rejected requests."""
    accepted = rejected = 0

    # 1000 draws: in a full unit run hypothesis's derandomized draws differ from a lone run (15 of 400
    # accepted once), so the sample is sized for the leaner of the two.
    @settings(max_examples=1000, deadline=None, database=None, derandomize=True)
    @given(request_objects())
    def tally(obj: dict[str, Any]) -> None:
        nonlocal accepted, rejected
        if _parse(dumps(obj)) is None:
            rejected += 1
        else:
            accepted += 1

    tally()
    assert accepted >= 20 and rejected >= 20, (accepted, rejected)
