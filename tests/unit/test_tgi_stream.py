"""``TGIGenerator.generate_stream`` through ``httpx.MockTransport``: order, the final chunk, errors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from infra.errors import BackendOverloaded, BackendUnavailable
from infra.protocols import ChatMessage, GenerationParams
from infra.settings import BackendSettings
from infra.tgi import StreamChunk, TGIGenerator

MESSAGES = [ChatMessage("user", "hi")]


def _event(delta: str | None, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    body: dict[str, Any] = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "system_fingerprint": "s",
        "choices": []
        if delta is None
        else [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": delta},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
    }
    if usage is not None:
        body["usage"] = {**usage, "total_tokens": sum(usage.values())}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _generator(handler: Any) -> TGIGenerator:
    backend = BackendSettings(name="b", url="http://tgi", tier="small")
    return TGIGenerator(backend, transport=httpx.MockTransport(handler))


async def _collect(gen: TGIGenerator, params: GenerationParams | None = None) -> list[StreamChunk]:
    return [
        chunk async for chunk in gen.generate_stream(MESSAGES, params or GenerationParams(max_new_tokens=5))
    ]


async def test_tokens_arrive_in_order_then_a_final_chunk_with_usage() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        events = [
            _event("Hel"),
            _event("lo"),
            _event(""),
            _event("!", "length"),
            _event(None, usage={"prompt_tokens": 4, "completion_tokens": 3}),
        ]
        return httpx.Response(
            200, content=b"".join(events) + b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
        )

    async with _generator(handler) as gen:
        chunks = await _collect(gen, GenerationParams(max_new_tokens=5, seed=2, stop=("\n",)))
    assert [c.text for c in chunks[:-1]] == ["Hel", "lo", "!"]
    assert chunks[-1] == StreamChunk(text="", finish_reason="length", generated_tokens=3, prompt_tokens=4)
    body = seen[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["seed"], body["stop"], body["temperature"]) == (5, 2, ["\n"], 0.0)


async def test_a_stream_without_usage_still_ends_with_a_finish() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_event("a") + _event("b", "stop") + b"data: [DONE]\n\n")

    async with _generator(handler) as gen:
        chunks = await _collect(gen)
    assert [c.text for c in chunks] == ["a", "b", ""] and chunks[-1].finish_reason == "stop"


async def test_overload_before_the_stream_is_typed() -> None:
    async with _generator(lambda request: httpx.Response(429, json={"error": "Model is overloaded"})) as gen:
        with pytest.raises(BackendOverloaded):
            await _collect(gen)


async def test_a_stream_broken_midway_is_a_backend_error_after_the_tokens_sent() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_event("ok") + b"data: {not json\n\n")

    got: list[str] = []
    async with _generator(handler) as gen:
        with pytest.raises(BackendUnavailable):
            async for chunk in gen.generate_stream(MESSAGES, GenerationParams()):
                got.append(chunk.text)
    assert got == ["ok"]
