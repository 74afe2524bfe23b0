"""Versioned wire schemas. Every record names its namespace explicitly and carries ``version``.

Clients write requests as plain JSON (any language can produce them), so the requests topic is
read as raw bytes and ``parse_request`` validates it by hand: bad input becomes a typed ``BadInput``
that the agent turns into an error reply and a dead letter, never a crashed decoder.

Request JSON (v1)::

    {"request_id": "…", "tenant": "acme", "prompt": "…",
     "max_new_tokens": 128, "reply_topic": "echolm.replies", "no_store": false,
     "deadline_s": 60, "version": 1}
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import faust
import orjson

from infra.errors import DecodeError, ForbiddenReplyTopic, LimitExceeded, SchemaError, UnknownTenant
from infra.protocols import Example, Vector
from infra.settings import LimitsSettings

from .codecs import ORJSON_CODEC

__all__ = [
    "LOG_VERSION",
    "PREPARED_VERSION",
    "DeadLetterRecord",
    "ErrorInfo",
    "ExampleRef",
    "FeedbackRecord",
    "LogRecord",
    "ModelUpdateRecord",
    "PreparedRecord",
    "ReplyRecord",
    "RequestRecord",
    "RouteInfo",
    "parse_request",
    "reply_address",
    "reply_topic_allowed",
]

SCHEMA_VERSION = 1
# Patterns are applied with ``fullmatch``: with ``match``, ``$`` also matches before a final "\n", so
# "acme\n" passed as a tenant and reached Milvus's filter builder, which refuses control characters.
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_REQUEST_FIELDS = frozenset(
    {
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
    }
)


class RequestRecord(faust.Record, namespace="echolm.Request.v1", serializer=ORJSON_CODEC, validation=True):
    request_id: str
    tenant: str
    prompt: str
    max_new_tokens: int
    reply_topic: str
    no_store: bool = False
    deadline_at: float = 0.0  # unix seconds; 0 = none
    created_at: float = 0.0
    version: int = SCHEMA_VERSION


class ExampleRef(faust.Record, namespace="echolm.ExampleRef.v1", serializer=ORJSON_CODEC):
    """An example chosen for a request: enough to prepend it, to credit it later, and to rebuild the
    stage-2 features it was scored on (``quality``, ``replay_rounds``, ``created_at``).

    The last three came with Prepared/Log v2; a v1 record decodes with the values the v1 readers
    assumed (quality 0.5, no replays, age unknown).
    """

    example_id: str
    request: str
    response: str
    similarity: float
    utility: float
    model_tier: str = "large"
    quality: float = 0.5
    replay_rounds: int = 0
    created_at: float = 0.0

    def example(self, tenant: str, embedding: Vector) -> Example:
        """The policy-level example this ref stands for (the bank's embedding does not travel)."""
        return Example(
            example_id=self.example_id,
            tenant=tenant,
            request=self.request,
            response=self.response,
            embedding=embedding,
            model_tier=self.model_tier,
            quality=self.quality,
            replay_rounds=self.replay_rounds,
            created_at=self.created_at,
        )


PREPARED_VERSION = 2  # v2: ``context`` and the examples' quality fields; v1 records still decode


class PreparedRecord(faust.Record, namespace="echolm.Prepared.v1", serializer=ORJSON_CODEC):
    """A request after embed -> retrieve -> select, on its way to route -> generate.

    ``context`` is the router's bandit context (``agents.policy.bandit.CONTEXT_NAMES``), computed by
    ``prepare`` from the examples it selected, so ``serve`` routes on their real similarity, utility
    and quality. ``embedding`` only travels on to the log record (``admit`` turns it into the bank's
    row); ``serve`` does not decode it. Empty ``context``: a v1 record (``serve`` recomputes it).
    """

    request: RequestRecord
    embedding: str  # streams.codecs.encode_vector
    examples: list[ExampleRef]
    selection_bypassed: str = ""  # non-empty: why examples were skipped (e.g. "milvus_unavailable")
    timings_ms: dict[str, float] = {}  # noqa: RUF012 - faust copies defaults per instance
    source_offset: int = -1
    source_partition: int = -1
    version: int = PREPARED_VERSION
    context: list[float] = []  # noqa: RUF012


class ErrorInfo(faust.Record, namespace="echolm.ErrorInfo.v1", serializer=ORJSON_CODEC):
    code: str
    message: str


class ReplyRecord(faust.Record, namespace="echolm.Reply.v1", serializer=ORJSON_CODEC):
    request_id: str
    tenant: str
    ok: bool
    text: str = ""
    error: ErrorInfo | None = None
    backend: str = ""
    tier: str = ""
    n_examples: int = 0
    timings_ms: dict[str, float] = {}  # noqa: RUF012
    worker: str = ""
    version: int = SCHEMA_VERSION


class RouteInfo(faust.Record, namespace="echolm.RouteInfo.v1", serializer=ORJSON_CODEC):
    backend: str
    tier: str
    scores: dict[str, float] = {}  # noqa: RUF012
    expected_quality: dict[str, float] = {}  # noqa: RUF012
    load_penalty: dict[str, float] = {}  # noqa: RUF012
    queue_depths: dict[str, float] = {}  # noqa: RUF012
    reason: str = ""
    ask_feedback: bool = False
    attempts: int = 1
    bias: float = 0.0  # load-driven bias away from costly tiers
    context: list[float] = []  # noqa: RUF012 - the bandit context the decision used (for feedback joins)
    generate_ms: list[float] = []  # noqa: RUF012 - each generation's duration, failed ones included


LOG_VERSION = 2  # v2: the examples' quality fields and ``route.generate_ms``; v1 records still decode


class LogRecord(faust.Record, namespace="echolm.Log.v1", serializer=ORJSON_CODEC):
    """Everything about one served request: the source of truth the example bank is a view of.

    ``embedding`` (``streams.codecs.encode_vector``) is decoded by ``admit`` alone, for the bank row.
    """

    request: RequestRecord
    embedding: str
    examples: list[ExampleRef]
    route: RouteInfo | None
    reply: ReplyRecord
    generated_tokens: int = 0
    logged_at: float = 0.0
    origin: str = "serve"  # serve | replay | import
    quality: float = -1.0  # scorer's estimate of reply quality in [0, 1]; -1 = not scored
    replay_rounds: int = 0
    version: int = LOG_VERSION


class FeedbackRecord(faust.Record, namespace="echolm.Feedback.v1", serializer=ORJSON_CODEC):
    """A client's rating of a reply: ``score`` in [0, 1] (thumbs up = 1, down = 0), or a preference."""

    request_id: str
    tenant: str
    score: float
    preferred_over: str = ""  # request_id of the reply this one was preferred to, if pairwise
    at: float = 0.0
    version: int = SCHEMA_VERSION


class ModelUpdateRecord(faust.Record, namespace="echolm.ModelUpdate.v1", serializer=ORJSON_CODEC):
    """One learned outcome (a feedback joined to its decision), applied by every worker in order."""

    request_id: str
    tier: str
    context: list[float]
    reward: float
    example_features: list[list[float]] = []  # noqa: RUF012
    utilities: list[float] = []  # noqa: RUF012
    worker: str = ""
    at: float = 0.0
    version: int = SCHEMA_VERSION


class DeadLetterRecord(faust.Record, namespace="echolm.DeadLetter.v1", serializer=ORJSON_CODEC):
    source_topic: str
    partition: int
    offset: int
    reason: str
    error_code: str
    key: str = ""
    value_preview: str = ""  # the first bytes of the bad value, repr-escaped
    value_bytes: int = 0
    request_id: str = ""
    tenant: str = ""
    worker: str = ""
    at: float = 0.0
    version: int = SCHEMA_VERSION


# --------------------------------------------------------------------------------- request parsing
@dataclass(frozen=True, slots=True)
class ReplyAddress:
    """Where an error reply can go, recovered from a record even when the record is invalid."""

    request_id: str
    tenant: str
    reply_topic: str


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    if name not in data:
        if required:
            raise SchemaError(f"missing field {name!r}; a request needs request_id, tenant and prompt")
        return None
    value = data[name]
    if isinstance(value, bool) and kind is not bool and kind != (int, float):
        raise SchemaError(f"field {name!r} must be {getattr(kind, '__name__', kind)}, got bool")
    if not isinstance(value, kind):
        raise SchemaError(
            f"field {name!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}"
        )
    return value


def decode_object(raw: bytes | str | None, limits: LimitsSettings) -> dict[str, Any]:
    if raw is None:
        raise DecodeError("empty record value; send a JSON object")
    size = len(raw)
    if size > limits.max_record_bytes:
        raise LimitExceeded(f"record is {size} bytes, over limits.max_record_bytes={limits.max_record_bytes}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"value is not valid UTF-8 JSON ({exc}); send a JSON object") from exc
    if not isinstance(data, dict):
        raise DecodeError(f"value must be a JSON object, got {type(data).__name__}")
    return data


def reply_topic_allowed(topic: str, default_topic: str, limits: LimitsSettings) -> bool:
    if topic == default_topic:
        return True
    prefix = default_topic + "."
    return (
        topic.startswith(prefix)
        and re.fullmatch(limits.reply_topic_suffix_pattern, topic[len(prefix) :]) is not None
    )


def reply_address(data: dict[str, Any], default_topic: str, limits: LimitsSettings) -> ReplyAddress | None:
    """Best effort: the address an error reply can be sent to, or None when there is no safe one."""
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not _ID.fullmatch(request_id):
        return None
    tenant = data.get("tenant")
    tenant = tenant if isinstance(tenant, str) and re.fullmatch(limits.tenant_pattern, tenant) else ""
    topic = data.get("reply_topic") or default_topic
    if not isinstance(topic, str) or not reply_topic_allowed(topic, default_topic, limits):
        topic = default_topic  # never send anything to a forged destination
    return ReplyAddress(request_id=request_id, tenant=tenant, reply_topic=topic)


def parse_request(
    raw: bytes | str | None, *, default_reply_topic: str, limits: LimitsSettings, now: float | None = None
) -> RequestRecord:
    """Validate one raw request record. Raises a ``BadInput`` subclass saying what to fix."""
    data = decode_object(raw, limits)
    return validate_request(data, default_reply_topic=default_reply_topic, limits=limits, now=now)


def validate_request(
    data: dict[str, Any], *, default_reply_topic: str, limits: LimitsSettings, now: float | None = None
) -> RequestRecord:
    unknown = set(data) - _REQUEST_FIELDS
    if unknown:
        raise SchemaError(f"unknown fields {sorted(unknown)[:5]}; allowed: {sorted(_REQUEST_FIELDS)}")
    version = data.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise SchemaError(f"unsupported version {version!r}; this worker reads version {SCHEMA_VERSION}")
    request_id = _field(data, "request_id", str)
    if not _ID.fullmatch(request_id):
        raise SchemaError("request_id must be 1-128 characters of letters, digits and ._:-")
    tenant = _field(data, "tenant", str)
    if not re.fullmatch(limits.tenant_pattern, tenant):
        raise SchemaError(f"tenant must match {limits.tenant_pattern}")
    if limits.tenants is not None and tenant not in limits.tenants:
        raise UnknownTenant(f"unknown tenant {tenant!r}; configured tenants: {sorted(limits.tenants)[:10]}")
    prompt = _field(data, "prompt", str)
    if not prompt.strip():
        raise LimitExceeded("prompt is empty; send a non-empty prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise LimitExceeded(
            f"prompt is {len(prompt)} characters, over limits.max_prompt_chars={limits.max_prompt_chars}"
        )
    if "\x00" in prompt:
        raise SchemaError("prompt contains NUL characters")
    max_new = _field(data, "max_new_tokens", int, required=False)
    max_new = min(limits.default_new_tokens, limits.max_new_tokens) if max_new is None else max_new
    if not 1 <= max_new <= limits.max_new_tokens:
        raise LimitExceeded(f"max_new_tokens={max_new} outside 1..{limits.max_new_tokens}")
    reply_topic = _field(data, "reply_topic", str, required=False) or default_reply_topic
    if not reply_topic_allowed(reply_topic, default_reply_topic, limits):
        raise ForbiddenReplyTopic(
            f"reply_topic {reply_topic[:80]!r} is not allowed; use {default_reply_topic!r} or "
            f"'{default_reply_topic}.<suffix>' with a suffix matching {limits.reply_topic_suffix_pattern}"
        )
    no_store = _field(data, "no_store", bool, required=False) or False
    created_at = _field(data, "created_at", (int, float), required=False)
    now = time.time() if now is None else now
    created_at = float(created_at) if created_at is not None else now
    deadline_s = _field(data, "deadline_s", (int, float), required=False)
    if deadline_s is not None and not 0.001 <= deadline_s <= 3600:  # NaN fails too
        raise LimitExceeded(f"deadline_s={deadline_s} outside [0.001, 3600]")
    deadline_at = now + float(deadline_s if deadline_s is not None else limits.default_deadline_s)
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise SchemaError("metadata must be an object when given")
    return RequestRecord(
        request_id=request_id,
        tenant=tenant,
        prompt=prompt,
        max_new_tokens=max_new,
        reply_topic=reply_topic,
        no_store=no_store,
        deadline_at=deadline_at,
        created_at=created_at,
    )
