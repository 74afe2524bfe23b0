"""Versioned wire schemas. Every record names its namespace explicitly and carries ``version``.

Clients write requests as plain JSON (any language can produce them), so the requests topic is
read as raw bytes and ``parse_request`` validates it by hand: bad input becomes a typed ``BadInput``
that the agent turns into an error reply and a dead letter, never a crashed decoder.

Request JSON (v1)::

    {"request_id": "…", "tenant": "acme", "prompt": "…",
     "max_new_tokens": 128, "reply_topic": "echolm.replies", "no_store": false,
     "deadline_s": 60, "version": 1}

Request JSON (v2, chat): ``messages`` instead of ``prompt``, OpenAI's sampling names::

    {"request_id": "…", "tenant": "acme", "version": 2,
     "messages": [{"role": "system", "content": "…"}, {"role": "user", "content": "…"},
                  {"role": "assistant", "content": "…"}, {"role": "user", "content": "…"}],
     "max_tokens": 128, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"], "seed": 7,
     "stream": false, "reply_topic": "…", "no_store": false, "deadline_s": 60}

A v2 record's ``prompt`` is derived: the conversation's retrieval key
(``streams.conversation.retrieval_key``), which is what prepare embeds and admission stores;
``messages`` keeps the turns for generation. A v1 record (``prompt``, ``max_new_tokens``) is read as
a one-turn conversation; a record with no ``version`` is v2 when it has ``messages``, else v1.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import faust
import orjson

from infra.errors import (
    DecodeError,
    ForbiddenReplyTopic,
    LimitExceeded,
    SchemaError,
    Unauthorized,
    UnknownTenant,
)
from infra.protocols import ChatMessage, Example, GenerationParams, Vector
from infra.settings import LimitsSettings
from infra.signing import SIGNATURE_FIELD, verify
from streams.conversation import retrieval_key

from .codecs import ORJSON_CODEC

__all__ = [
    "LOG_VERSION",
    "PREPARED_VERSION",
    "REQUEST_VERSIONS",
    "AnsweredRecord",
    "ChatTurnRecord",
    "DeadLetterRecord",
    "ErrorInfo",
    "ExampleRef",
    "FeedbackRecord",
    "LogRecord",
    "ModelUpdateRecord",
    "PreparedRecord",
    "ReplyChunkRecord",
    "ReplyRecord",
    "RequestRecord",
    "RouteInfo",
    "authenticate",
    "feedback_fields",
    "parse_request",
    "reply_address",
    "reply_topic_allowed",
]

SCHEMA_VERSION = 1
REQUEST_SCHEMA_VERSION = 2  # RequestRecord: v2 adds messages and sampling fields
REQUEST_VERSIONS = (1, 2)
MAX_MESSAGES = 256
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
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
        SIGNATURE_FIELD,
    }
)
# v2 replaces prompt/max_new_tokens by messages/max_tokens and adds OpenAI's sampling fields.
_REQUEST_FIELDS_V2 = (_REQUEST_FIELDS - {"prompt", "max_new_tokens"}) | frozenset(
    {"messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream"}
)
_ROLES = ("system", "user", "assistant")


class ChatTurnRecord(faust.Record, namespace="echolm.ChatTurn.v1", serializer=ORJSON_CODEC):
    """One turn of a v2 request's conversation."""

    role: str  # system | user | assistant
    content: str


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
    # v2 (chat). ``prompt`` above is then the retrieval key; the turns are here. Empty for v1.
    messages: list[ChatTurnRecord] = []  # noqa: RUF012 - faust copies defaults per instance
    temperature: float | None = None  # None = the backend's default (greedy)
    top_p: float | None = None
    stop: list[str] = []  # noqa: RUF012
    seed: int | None = None
    stream: bool = False

    def conversation(self) -> list[ChatMessage]:
        """The v2 turns for ``build_messages(conversation=...)``; empty for v1 (the prompt is the turn)."""
        return self.chat_messages() if self.messages else []

    def generation_params(self) -> GenerationParams:
        """Sampling for the backend. Temperature 0 means greedy (TGI wants a positive temperature);
        ``top_p`` 1 is no truncation, sent as None (TGI refuses top_p=1.0)."""
        temperature = self.temperature if self.temperature else None
        top_p = self.top_p if self.top_p is not None and self.top_p < 1.0 else None
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            seed=self.seed,
            stop=tuple(self.stop),
            top_p=top_p,
        )

    def chat_messages(self) -> list[ChatMessage]:
        """The conversation to generate from: the v2 turns, or the v1 prompt as one user turn."""
        if not self.messages:
            return [ChatMessage(role="user", content=self.prompt)]
        return [ChatMessage(role=_role(t.role), content=t.content) for t in self.messages]


def _role(role: str) -> Any:
    if role not in _ROLES:
        raise SchemaError(f"message role {role!r} is not one of {list(_ROLES)}")
    return role


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
    tenant: str = ""  # the bank tenant the example came from ("" in records written before it)

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
    # the generation's facts (0 / "" on error replies and on records written before these fields)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""  # stop | length (the backend's)
    kind: str = "reply"  # what a reader of a reply topic tells apart from ReplyChunkRecord's "chunk"


class ReplyChunkRecord(faust.Record, namespace="echolm.ReplyChunk.v1", serializer=ORJSON_CODEC):
    """A piece of a streaming request's reply, sent to its reply topic (keyed by request id, so in
    order) while the backend generates; the ``ReplyRecord`` that follows still holds the whole text.

    ``attempt`` names one generation attempt (worker id and a counter), unique across retries and
    re-processing; ``seq`` numbers the chunks of that attempt from 0. Readers assemble per attempt in
    ``seq`` order and show only text that the newest attempt agrees with (``echolm.streaming``).
    """

    request_id: str
    tenant: str
    attempt: str
    seq: int
    text: str
    sent_at: float = 0.0  # unix seconds at the worker
    kind: str = "chunk"
    version: int = SCHEMA_VERSION


class AnsweredRecord(faust.Record, namespace="echolm.Answered.v1", serializer=ORJSON_CODEC):
    """The idempotency record of one answered request (``<prefix>.answered``, keyed by request id):
    the reply as sent and where it went, so a worker that sees the request again re-sends it."""

    request_id: str
    reply_topic: str
    reply: ReplyRecord
    answered_at: float = 0.0
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
    with_examples: bool = False  # whether the served tier was shown the examples (the log's examples)


LOG_VERSION = 2  # v2: the examples' quality fields and ``route.generate_ms``; v1 records still decode


class LogRecord(faust.Record, namespace="echolm.Log.v1", serializer=ORJSON_CODEC):
    """Everything about one served request: the source of truth the example bank is a view of.

    ``embedding`` (``streams.codecs.encode_vector``) is decoded by ``admit`` alone, for the bank row.
    ``examples`` are the examples the served tier was shown (admission credits and learning read
    these); ``selected`` all that prepare selected.
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
    # What prepare selected for the request; ``examples`` is what the served tier was shown (the
    # router may serve a tier without them). None on records written before this field.
    selected: list[ExampleRef] | None = None


class FeedbackRecord(faust.Record, namespace="echolm.Feedback.v1", serializer=ORJSON_CODEC):
    """A client's rating of a reply: ``score`` in [0, 1] (thumbs up = 1, down = 0), or a preference."""

    request_id: str
    tenant: str
    score: float
    preferred_over: str = ""  # request_id of the reply this one was preferred to, if pairwise
    at: float = 0.0
    version: int = SCHEMA_VERSION
    rater: str = ""  # who rated; one rating per (request_id, rater) is applied (agents/state.py)
    signature: str = ""  # infra/signing.py over ``signed_fields`` (required when tenants are signed)

    def signed_fields(self) -> dict[str, Any]:
        """What the feedback signature covers (``feedback_fields`` of the same values)."""
        return feedback_fields(
            request_id=self.request_id,
            tenant=self.tenant,
            score=self.score,
            rater=self.rater,
            at=self.at,
            preferred_over=self.preferred_over,
        )


def feedback_fields(
    *, request_id: str, tenant: str, score: float, rater: str, at: float, preferred_over: str = ""
) -> dict[str, Any]:
    """The fields of a feedback record a tenant signs (the client signs these, the worker checks them)."""
    return {
        "request_id": request_id,
        "tenant": tenant,
        "score": float(score),
        "rater": rater,
        "at": float(at),
        "preferred_over": preferred_over,
    }


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
    rater: str = ""  # with request_id, the rating's identity: applied once (agents/state.py)


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
    stage: str = ""  # the handler stage that failed (agents/guard.py); "" = rejected as bad input


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


def _request_version(data: dict[str, Any]) -> int:
    version = data.get("version", 2 if "messages" in data else 1)
    if isinstance(version, bool) or version not in REQUEST_VERSIONS:
        raise SchemaError(
            f"unsupported version {version!r}; this worker reads versions {list(REQUEST_VERSIONS)}"
        )
    return int(version)


def _check_text(name: str, text: str, limits: LimitsSettings) -> None:
    if len(text) > limits.max_prompt_chars:
        raise LimitExceeded(
            f"{name} is {len(text)} characters, over limits.max_prompt_chars={limits.max_prompt_chars}"
        )
    if "\x00" in text:
        raise SchemaError(f"{name} contains NUL characters")


def _validate_messages(data: dict[str, Any], limits: LimitsSettings) -> list[ChatTurnRecord]:
    messages = _field(data, "messages", list)
    if not 1 <= len(messages) <= MAX_MESSAGES:
        raise LimitExceeded(f"messages has {len(messages)} turns; send 1..{MAX_MESSAGES}")
    turns: list[ChatTurnRecord] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise SchemaError(f"messages[{i}] must be an object with only 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise SchemaError(f"messages[{i}].role must be one of {list(_ROLES)}, got {str(role)[:20]!r}")
        if not isinstance(content, str):
            raise SchemaError(f"messages[{i}].content must be a string")
        if role == "system" and turns and turns[-1].role != "system":
            raise SchemaError(f"messages[{i}]: system turns must come before the conversation")
        turns.append(ChatTurnRecord(role=role, content=content))
    if turns[-1].role != "user" or not turns[-1].content.strip():
        raise SchemaError("the last message must be a non-empty user turn (the question to answer)")
    _check_text("messages (all turns together)", "".join(t.content for t in turns), limits)
    return turns


def _validate_sampling(data: dict[str, Any]) -> dict[str, Any]:
    temperature = _field(data, "temperature", (int, float), required=False)
    if temperature is not None and not 0 <= temperature <= 2:
        raise SchemaError(f"temperature={temperature} outside [0, 2]")
    top_p = _field(data, "top_p", (int, float), required=False)
    if top_p is not None and not 0 < top_p <= 1:
        raise SchemaError(f"top_p={top_p} outside (0, 1]")
    stop = data.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stops)
    ):
        raise SchemaError(
            f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} non-empty strings "
            f"of at most {MAX_STOP_CHARS} characters"
        )
    seed = _field(data, "seed", int, required=False)
    stream = _field(data, "stream", bool, required=False) or False
    return {
        "temperature": None if temperature is None else float(temperature),
        "top_p": None if top_p is None else float(top_p),
        "stop": list(stops or []),
        "seed": seed,
        "stream": stream,
    }


def _check_fields(data: dict[str, Any], version: int) -> None:
    allowed = _REQUEST_FIELDS if version == 1 else _REQUEST_FIELDS_V2
    unknown = set(data) - allowed
    if unknown:
        raise SchemaError(
            f"unknown fields {sorted(unknown)[:5]} for a version {version} request; "
            f"allowed: {sorted(allowed)}"
        )


def _identity(data: dict[str, Any], limits: LimitsSettings) -> tuple[str, str]:
    """The request id and the tenant, validated."""
    request_id = _field(data, "request_id", str)
    if not _ID.fullmatch(request_id):
        raise SchemaError("request_id must be 1-128 characters of letters, digits and ._:-")
    tenant = _field(data, "tenant", str)
    if not re.fullmatch(limits.tenant_pattern, tenant):
        raise SchemaError(f"tenant must match {limits.tenant_pattern}")
    if limits.tenants is not None and tenant not in limits.tenants:
        raise UnknownTenant(f"unknown tenant {tenant!r}; configured tenants: {sorted(limits.tenants)[:10]}")
    return request_id, tenant


def authenticate(data: dict[str, Any], tenant: str, limits: LimitsSettings) -> None:
    """With ``limits.tenant_secrets`` set, the record must be signed by ``tenant``'s secret
    (``Unauthorized`` otherwise); with none set (trusted single-tenant mode) nothing is checked."""
    if not limits.tenant_secrets:
        return
    secret = limits.tenant_secret(tenant)
    if secret is None:
        raise Unauthorized(f"tenant {tenant!r} has no signing secret (limits.tenant_secrets); not accepted")
    if not verify(data, secret):
        state = "has no signature" if SIGNATURE_FIELD not in data else "has a signature that does not match"
        raise Unauthorized(
            f"the record {state} for tenant {tenant!r}; sign it with the tenant's secret (infra/signing.py)"
        )


def _tenant_reply_topic(reply_topic: str, default_topic: str, tenant: str, limits: LimitsSettings) -> None:
    """With signed tenants, a private reply topic belongs to one tenant: ``<replies>.<tenant>``; the
    shared topic is for trusted readers (the gateway)."""
    if not limits.tenant_secrets or reply_topic == default_topic:
        return
    own = f"{default_topic}.{tenant}"
    if reply_topic != own:
        raise ForbiddenReplyTopic(f"reply_topic {reply_topic[:80]!r} is not tenant {tenant!r}'s; use {own!r}")


def validate_request(
    data: dict[str, Any], *, default_reply_topic: str, limits: LimitsSettings, now: float | None = None
) -> RequestRecord:
    version = _request_version(data)
    _check_fields(data, version)
    request_id, tenant = _identity(data, limits)
    authenticate(data, tenant, limits)
    chat: dict[str, Any] = {}
    if version == 1:
        prompt = _field(data, "prompt", str)
        if not prompt.strip():
            raise LimitExceeded("prompt is empty; send a non-empty prompt")
        _check_text("prompt", prompt, limits)
        max_new = _field(data, "max_new_tokens", int, required=False)
    else:
        turns = _validate_messages(data, limits)
        prompt = retrieval_key([ChatMessage(role=_role(t.role), content=t.content) for t in turns])
        chat = {"messages": turns, "version": REQUEST_SCHEMA_VERSION, **_validate_sampling(data)}
        max_new = _field(data, "max_tokens", int, required=False)
    max_new = min(limits.default_new_tokens, limits.max_new_tokens) if max_new is None else max_new
    if not 1 <= max_new <= limits.max_new_tokens:
        name = "max_new_tokens" if version == 1 else "max_tokens"
        raise LimitExceeded(f"{name}={max_new} outside 1..{limits.max_new_tokens}")
    reply_topic = _field(data, "reply_topic", str, required=False) or default_reply_topic
    if not reply_topic_allowed(reply_topic, default_reply_topic, limits):
        raise ForbiddenReplyTopic(
            f"reply_topic {reply_topic[:80]!r} is not allowed; use {default_reply_topic!r} or "
            f"'{default_reply_topic}.<suffix>' with a suffix matching {limits.reply_topic_suffix_pattern}"
        )
    _tenant_reply_topic(reply_topic, default_reply_topic, tenant, limits)
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
        **chat,
    )
