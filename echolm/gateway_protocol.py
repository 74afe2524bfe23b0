"""The OpenAI chat-completions wire format, as the gateway reads and writes it (no HTTP here).

* ``chat_request_body``: an OpenAI request body -> our v2 request record (``streams.records``),
  validated by the same ``validate_request`` the workers use, so a bad request is a 400 here rather
  than an error reply after a round trip through Kafka.
* ``completion`` / ``completion_chunks``: a reply -> OpenAI's response object, or its SSE chunks.
* ``GatewayError`` and ``reply_error``: every failure in OpenAI's error shape
  (``{"error": {"message", "type", "param", "code"}}``) with its HTTP status.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from infra.errors import BadInput
from infra.settings import Settings
from streams.records import validate_request

from .client import Reply

__all__ = [
    "AUTO_MODEL",
    "GatewayError",
    "chat_request_body",
    "completion",
    "completion_chunks",
    "model_list",
    "reply_error",
    "sse_event",
]

AUTO_MODEL = "echolm-auto"
# Parameters we accept at the values that need nothing from us (what SDKs and LangChain send).
_HARMLESS_DEFAULTS: Mapping[str, tuple[Any, ...]] = {
    "n": (1, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logprobs": (False, None),
    "top_logprobs": (None, 0),
    "parallel_tool_calls": (None, False, True),
    "tool_choice": (None, "none"),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
}
_IGNORED = frozenset({"user", "metadata", "stream_options"})
_OURS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
    }
)


@dataclass(frozen=True)
class GatewayError(Exception):
    """A failure with its HTTP status, in OpenAI's error shape."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def _content_text(content: Any, index: int) -> str:
    """OpenAI content: a string, or a list of parts of which we take the text ones."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad_request(
                    f"messages[{index}].content: only text parts are supported", param=f"messages[{index}]"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"messages[{index}].content must be a string or a list of text parts", param="messages")


def _turns(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", param="messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise bad_request(
                f"messages[{i}].role {str(role)[:20]!r} is not supported; use system, user or assistant",
                param="messages",
            )
        turns.append({"role": str(role), "content": _content_text(message.get("content"), i)})
    return turns


def _checked_model(payload: dict[str, Any], models: Sequence[str]) -> str:
    """The requested model name; only the automatic model is served."""
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request(f"model is required; use {AUTO_MODEL!r}", param="model")
    if model != AUTO_MODEL:
        if model in models:
            # TODO(wave 2): serve cannot pin a tier yet; until it does, a pinned request would be a lie.
            raise bad_request(
                f"model {model!r} is a tier of this deployment, but a request cannot pin a tier yet; "
                f"use {AUTO_MODEL!r} (the router picks the tier per request)",
                param="model",
                code="model_not_supported",
            )
        raise GatewayError(
            404,
            f"the model {model!r} does not exist; available: {[AUTO_MODEL, *models]}",
            param="model",
            code="model_not_found",
        )
    return model


def _check_arguments(payload: dict[str, Any]) -> None:
    """Reject an argument this gateway does not know, or a known one away from its default."""
    for name, value in payload.items():
        if name in _OURS or name in _IGNORED:
            continue
        allowed = _HARMLESS_DEFAULTS.get(name)
        if allowed is None:
            raise bad_request(f"unrecognized request argument {name!r}", param=name)
        if value not in allowed:
            raise bad_request(
                f"{name}={str(value)[:40]} is not supported; leave it at its default", param=name
            )


def _request_body(
    payload: dict[str, Any], *, request_id: str, tenant: str, deadline_s: float
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": 2,
        "request_id": request_id,
        "tenant": tenant,
        "messages": _turns(payload.get("messages")),
        "deadline_s": deadline_s,
    }
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "stop", "seed", "stream"):
        if payload.get(name) is not None:
            body[name] = payload[name]
    return body


def chat_request_body(
    payload: Any,
    *,
    request_id: str,
    tenant: str,
    settings: Settings,
    deadline_s: float,
    models: Sequence[str],
) -> tuple[dict[str, Any], str]:
    """The v2 request record for an OpenAI chat request, validated; and the model name to echo."""
    if not isinstance(payload, dict):
        raise bad_request("the body must be a JSON object")
    model = _checked_model(payload, models)
    _check_arguments(payload)
    if "max_tokens" in payload and "max_completion_tokens" in payload:
        raise bad_request("send max_tokens or max_completion_tokens, not both", param="max_tokens")
    body = _request_body(payload, request_id=request_id, tenant=tenant, deadline_s=deadline_s)
    try:
        validate_request(body, default_reply_topic=settings.topic("replies"), limits=settings.limits)
    except BadInput as exc:
        raise bad_request(str(exc), code=exc.code) from exc
    return body, model


# ------------------------------------------------------------------------------------- responses
# Error codes of worker replies -> HTTP status and OpenAI error type.
_REPLY_ERRORS: Mapping[str, tuple[int, str]] = {
    "deadline_exceeded": (504, "timeout"),
    "no_backend_available": (503, "service_unavailable"),
    "unknown_tenant": (403, "permission_error"),
    "forbidden_reply_topic": (400, "invalid_request_error"),
    "unknown_reply_topic": (503, "service_unavailable"),
}


def reply_error(reply: Reply) -> GatewayError:
    """The HTTP error for a worker's error reply."""
    status, kind = _REPLY_ERRORS.get(reply.error_code, (0, ""))
    if not status:
        bad = reply.error_code in {"bad_input", "decode_error", "schema_error", "limit_exceeded"}
        status, kind = (400, "invalid_request_error") if bad else (502, "upstream_error")
    message = reply.error_message or f"the pipeline answered {reply.error_code!r}"
    return GatewayError(status, message, type=kind, code=reply.error_code or None)


def _extras(reply: Reply) -> dict[str, Any]:
    return {
        "request_id": reply.request_id,
        "backend": reply.backend,
        "tier": reply.tier,
        "n_examples": reply.n_examples,
    }


def completion(reply: Reply, *, model: str, created: int | None = None) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` object for a successful reply (``echolm`` holds the routing facts)."""
    return {
        "id": f"chatcmpl-{reply.request_id}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "system_fingerprint": None,
        # TODO(wave 2): finish_reason "length" and usage need the final record to carry them.
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "echolm": _extras(reply),
    }


def completion_chunks(reply: Reply, *, model: str, created: int | None = None) -> Iterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects: the role, the text, then the finish. Wave 1 sends the whole
    reply as one text chunk; wave 2 feeds the token chunks relayed from Kafka through the same shape."""
    created = int(time.time()) if created is None else created
    base = {"id": f"chatcmpl-{reply.request_id}", "object": "chat.completion.chunk", "created": created}
    base |= {"model": model, "system_fingerprint": None}

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    yield chunk({"role": "assistant", "content": ""}, None)
    yield chunk({"content": reply.text}, None)
    yield {**chunk({}, "stop"), "echolm": _extras(reply)}


def sse_event(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (``data: ...`` and a blank line)."""
    text = data if isinstance(data, str) else orjson.dumps(data).decode()
    return f"data: {text}\n\n".encode()


def model_list(tiers: Sequence[str], *, created: int = 0) -> dict[str, Any]:
    """``/v1/models``: the automatic model first, then the tiers (listed; not pinnable yet)."""
    data = [{"id": AUTO_MODEL, "object": "model", "created": created, "owned_by": "echolm"}]
    data += [
        {
            "id": tier,
            "object": "model",
            "created": created,
            "owned_by": "echolm",
            "echolm": {"pinnable": False},
        }
        for tier in tiers
    ]
    return {"object": "list", "data": data}
