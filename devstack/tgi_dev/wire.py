"""TGI's request validation and response bodies, as pure functions (no I/O, no engine calls).

Bodies are parsed into a ``Job`` (prompt + ``SamplingParams`` + output options) or rejected with
``RequestRejected`` carrying TGI's status and ``{"error", "error_type"}`` shape. Validation follows
TGI's router: ``temperature`` must be strictly positive on ``/generate`` (on the chat route 0 means
greedy, and no temperature means sampling at 1.0, as in TGI), ``inputs`` tokens must be at most
``max_input_tokens``, and prompt + ``max_new_tokens`` must fit in ``max_total_tokens``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from devstack.tgi_dev.engine import FinishReason, SamplingParams, Token

__all__ = [
    "Job",
    "Limits",
    "RequestRejected",
    "chat_chunk",
    "chat_response",
    "generate_response",
    "parse_chat",
    "parse_generate",
    "stream_event",
    "token_json",
    "visible_text",
]


class RequestRejected(Exception):
    """A request TGI would refuse; ``status`` and ``error_type`` follow TGI's router."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


@dataclass(frozen=True, slots=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int = 4
    default_max_new_tokens: int = 100


@dataclass(frozen=True, slots=True)
class Job:
    """One validated request."""

    prompt: str
    prompt_tokens: int
    params: SamplingParams
    details: bool = False
    return_full_text: bool = False
    inputs: str = ""
    sampled: bool = False  # whether a seed is meaningful (reported as details.seed)


def _invalid(message: str) -> RequestRejected:
    return RequestRejected(422, f"Input validation error: {message}", "validation")


def _number(params: Mapping[str, Any], key: str, kind: type[int] | type[float]) -> Any:
    value = params.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind is int and not isinstance(value, int))
    ):
        raise _invalid(f"`{key}` must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return value


def _stop(value: Any, limits: Limits) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("`stop` must be a list of non-empty strings")
    if len(stops) > limits.max_stop_sequences:
        raise _invalid(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(stops)}"
        )
    return tuple(stops)


def _check_lengths(prompt_tokens: int, max_new_tokens: int, limits: Limits) -> None:
    if prompt_tokens > limits.max_input_tokens:
        raise _invalid(
            f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {prompt_tokens}"
        )
    if prompt_tokens + max_new_tokens > limits.max_total_tokens:
        raise _invalid(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {prompt_tokens} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )


def _sampling(
    params: Mapping[str, Any],
    *,
    do_sample: bool,
    temperature: float | None,
    max_new_tokens: int,
    stop: tuple[str, ...],
) -> tuple[SamplingParams, bool]:
    top_k = _number(params, "top_k", int)
    top_p = _number(params, "top_p", float)
    penalty = _number(params, "repetition_penalty", float)
    seed = _number(params, "seed", int)
    if top_k is not None and top_k <= 0:
        raise _invalid("`top_k` must be strictly positive")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise _invalid("`top_p` must be > 0.0 and <= 1.0")
    if penalty is not None and penalty <= 0:
        raise _invalid("`repetition_penalty` must be strictly positive")
    if seed is not None and not 0 <= seed < 2**32:
        raise _invalid("`seed` must be in [0, 2**32)")
    # TGI samples when asked to, or when any warper differs from its neutral value.
    sampled = (
        do_sample
        or (temperature is not None and temperature != 1.0)
        or top_k is not None
        or (top_p is not None and top_p < 1.0)
    )
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        seed=seed if seed is not None else random.randrange(2**32),
        temperature=(temperature or 1.0) if sampled else None,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=penalty,
        stop=stop,
    )
    return sampling, sampled


def parse_generate(body: Any, limits: Limits, count_tokens: Callable[[str], int]) -> Job:
    """Validate a ``/generate``, ``/generate_stream`` or ``/`` body."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
        raise RequestRejected(
            422, "Failed to deserialize the JSON body: `inputs` (string) is required", "validation"
        )
    inputs: str = body["inputs"]
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise _invalid("`parameters` must be an object")
    if not inputs:
        raise _invalid("`inputs` cannot be empty")
    if (_number(params, "best_of", int) or 1) > 1:
        raise _invalid("`best_of` > 1 is not supported by the dev server")
    max_new_tokens = _number(params, "max_new_tokens", int)
    max_new_tokens = limits.default_max_new_tokens if max_new_tokens is None else max_new_tokens
    if max_new_tokens <= 0:
        raise _invalid("`max_new_tokens` must be strictly positive")
    temperature = _number(params, "temperature", float)
    if temperature is not None and temperature <= 0:
        raise _invalid("`temperature` must be strictly positive")
    prompt_tokens = count_tokens(inputs)
    _check_lengths(prompt_tokens, max_new_tokens, limits)
    sampling, sampled = _sampling(
        params,
        do_sample=bool(params.get("do_sample")),
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        stop=_stop(params.get("stop"), limits),
    )
    return Job(
        prompt=inputs,
        prompt_tokens=prompt_tokens,
        params=sampling,
        details=bool(params.get("details")),
        return_full_text=bool(params.get("return_full_text")),
        inputs=inputs,
        sampled=sampled,
    )


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise _invalid("message `content` must be a string or a list of text parts")


def parse_chat(
    body: Any,
    limits: Limits,
    count_tokens: Callable[[str], int],
    render_chat: Callable[[Sequence[Mapping[str, str]]], str],
) -> Job:
    """Validate a ``/v1/chat/completions`` body and render its prompt with the chat template."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        raise RequestRejected(
            422, "Failed to deserialize the JSON body: `messages` (non-empty list) is required", "validation"
        )
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in {"system", "user", "assistant"}:
            raise _invalid("each message needs a `role` of system, user or assistant")
        turns.append({"role": str(m["role"]), "content": _message_text(m.get("content"))})
    if (body.get("n") or 1) != 1:
        raise _invalid("`n` must be 1")
    prompt = render_chat(turns)
    prompt_tokens = count_tokens(prompt)
    max_tokens = _number(body, "max_tokens", int)
    if max_tokens is None:  # TGI: whatever the context has left
        max_tokens = max(limits.max_total_tokens - prompt_tokens, 1)
    if max_tokens <= 0:
        raise _invalid("`max_tokens` must be strictly positive")
    temperature = _number(body, "temperature", float)
    if temperature is not None and temperature < 0:
        raise _invalid("`temperature` must be non-negative")
    _check_lengths(prompt_tokens, max_tokens, limits)
    # TGI's chat route: temperature 0 is greedy; absent means sampling at 1.0.
    sampling, sampled = _sampling(
        body,
        do_sample=temperature != 0,
        temperature=None if temperature == 0 else temperature,
        max_new_tokens=max_tokens,
        stop=_stop(body.get("stop"), limits),
    )
    return Job(prompt=prompt, prompt_tokens=prompt_tokens, params=sampling, sampled=sampled)


# ------------------------------------------------------------------------------------ responses
def token_json(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def visible_text(tokens: Sequence[Token]) -> str:
    return "".join(t.text for t in tokens if not t.special)


def generate_response(job: Job, tokens: Sequence[Token], finish: FinishReason) -> dict[str, Any]:
    text = visible_text(tokens)
    body: dict[str, Any] = {"generated_text": job.inputs + text if job.return_full_text else text}
    if job.details:
        body["details"] = {
            "finish_reason": finish,
            "generated_tokens": len(tokens),
            "seed": job.params.seed if job.sampled else None,
            "prefill": [],
            "tokens": [token_json(t) for t in tokens],
            "top_tokens": [],
            "best_of_sequences": None,
        }
    return body


def stream_event(job: Job, index: int, token: Token, generated: str | None) -> dict[str, Any]:
    """One ``/generate_stream`` event; the last one (``generated`` set) carries the details."""
    details = None
    if generated is not None and job.details:
        details = {
            "finish_reason": token.finish_reason,
            "generated_tokens": index,
            "seed": job.params.seed if job.sampled else None,
            "input_length": job.prompt_tokens,
        }
    return {
        "index": index,
        "token": token_json(token),
        "top_tokens": None,
        "generated_text": generated,
        "details": details,
    }


def _chat_finish(finish: FinishReason | None) -> str | None:
    return None if finish is None else ("length" if finish == "length" else "stop")


def chat_response(
    *,
    request_id: str,
    created: int,
    model: str,
    fingerprint: str,
    job: Job,
    tokens: Sequence[Token],
    finish: FinishReason,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": visible_text(tokens)},
                "logprobs": None,
                "finish_reason": _chat_finish(finish),
            }
        ],
        "usage": {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": job.prompt_tokens + len(tokens),
        },
    }


def chat_chunk(
    *,
    request_id: str,
    created: int,
    model: str,
    fingerprint: str,
    token: Token | None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One streamed chat chunk; ``token`` None with ``usage`` set is the final usage-only chunk."""
    choices = []
    if token is not None:
        content = "" if token.special else token.text
        choices.append(
            {
                "index": 0,
                "delta": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": _chat_finish(token.finish_reason),
            }
        )
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage,
    }
