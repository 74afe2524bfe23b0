"""The OpenAI chat-completions wire format, as the gateway reads and writes it (no HTTP here).

* ``chat_request_body``: an OpenAI request body -> our v2 request record (``streams.records``),
  validated by the same ``validate_request`` the workers use, so a bad request is a 400 here rather
  than an error reply after a round trip through Kafka.
* ``completion``: a reply -> OpenAI's ``chat.completion`` object (with ``usage`` and the backend's
  ``finish_reason``); ``ChunkMaker``: the ``chat.completion.chunk`` objects of a streamed reply, built
  as its pieces arrive (the role, each text delta, the finish, and ``usage`` when the request asked
  with ``stream_options.include_usage``).
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
from infra.signing import sign
from streams.records import validate_request

from .client import Reply

__all__ = [
    "AUTO_MODEL",
    "ChunkMaker",
    "GatewayError",
    "chat_request_body",
    "completion",
    "model_list",
    "reply_error",
    "sse_event",
    "usage",
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
_IGNORED = frozenset({"user", "metadata", "stream_options"})  # stream_options is read by the gateway
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
    if settings.limits.tenant_secrets:  # signed tenants: the gateway signs for the key's tenant
        secret = settings.limits.tenant_secret(tenant)
        if secret is None:
            raise GatewayError(
                403,
                f"tenant {tenant!r} has no signing secret (limits.tenant_secrets)",
                type="permission_error",
            )
        body["signature"] = sign(body, secret)
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


def _finish_reason(reply: Reply) -> str:
    """OpenAI's finish reasons are stop and length (TGI's ``eos_token`` and ``stop_sequence`` are stop)."""
    return "length" if reply.finish_reason == "length" else "stop"


def usage(reply: Reply) -> dict[str, int]:
    """OpenAI's ``usage`` from the backend's token counts (0 when the backend did not report them)."""
    prompt, completion_tokens = reply.prompt_tokens, reply.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def completion(reply: Reply, *, model: str, created: int | None = None) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` object for a successful reply (``echolm`` holds the routing facts)."""
    return {
        "id": f"chatcmpl-{reply.request_id}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": _finish_reason(reply),
                "logprobs": None,
            }
        ],
        "usage": usage(reply),
        "echolm": _extras(reply),
    }


@dataclass(frozen=True)
class ChunkMaker:
    """The ``chat.completion.chunk`` objects of one streamed reply, made as its pieces arrive."""

    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{self.request_id}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def role(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def content(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, None)

    def finish(self, reply: Reply, *, include_usage: bool) -> Iterator[dict[str, Any]]:
        """The finish chunk (with the routing facts), then OpenAI's usage-only chunk if asked for."""
        yield {**self._chunk({}, _finish_reason(reply)), "echolm": _extras(reply)}
        if include_usage:
            yield {**self._chunk({}, None), "choices": [], "usage": usage(reply)}


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
