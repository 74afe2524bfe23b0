"""The dev TGI server in-process, on the emulated engine: wire shapes, validation, the request queue
(gauges, 429, client disconnects) and the emulator's service-time model. No model, no sockets."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.types import Message

from devstack.tgi_dev.app import DevServer, DevServerConfig, build_app
from devstack.tgi_dev.engine import Engine, SamplingParams
from devstack.tgi_dev.scheduler import QueueFull, RequestQueue
from devstack.tgi_emulator import EmulatedEngine, ServiceTimeModel
from infra.tgi import parse_queue_gauges

FAST = ServiceTimeModel(prefill_ms_per_token=0.0, decode_ms_per_token=0.0, batch_slowdown=0.0)
SLOW = ServiceTimeModel(prefill_ms_per_token=0.0, decode_ms_per_token=20.0, batch_slowdown=0.0)


def emulated(service: ServiceTimeModel = FAST, *, max_batch_size: int = 1, ctx: int = 256) -> EmulatedEngine:
    return EmulatedEngine(
        model_id="emu", max_batch_size=max_batch_size, max_total_tokens=ctx, service=service
    )


@asynccontextmanager
async def running_app(
    factory: Callable[[], Engine], config: DevServerConfig | None = None, *, wait: bool = True
) -> AsyncIterator[tuple[Starlette, DevServer, httpx.AsyncClient]]:
    app = build_app(config or DevServerConfig(), factory)
    server: DevServer = app.state.server
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://dev") as client,
    ):
        for _ in range(200):
            if not wait or server.engine is not None:
                break
            await asyncio.sleep(0.01)
        yield app, server, client


def sse(text: str, prefix: str = "data:") -> list[Any]:
    events = [line.removeprefix(prefix).strip() for line in text.split("\n\n") if line.strip()]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in time")


# ------------------------------------------------------------------------------- plain routes
async def test_health_is_503_until_the_engine_loads() -> None:
    release = threading.Event()

    def slow_factory() -> Engine:
        release.wait(5)
        return emulated()

    async with running_app(slow_factory, wait=False) as (_, server, client):
        loading = await client.get("/health")
        assert loading.status_code == 503
        assert loading.json() == {"error": "Model is loading", "error_type": "unhealthy"}
        assert (await client.post("/generate", json={"inputs": "x"})).status_code == 503
        release.set()
        await until(lambda: server.engine is not None)
        assert (await client.get("/health")).status_code == 200


async def test_health_reports_a_failed_load() -> None:
    failures: list[Exception] = []

    def broken() -> Engine:
        raise FileNotFoundError("no such gguf")

    app = build_app(DevServerConfig(), broken, on_load_error=failures.append)
    async with app.router.lifespan_context(app):
        await until(lambda: bool(failures))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dev") as client:
            response = await client.get("/health")
    assert response.status_code == 503
    assert "no such gguf" in response.json()["error"]


async def test_info_reports_tgi_fields() -> None:
    config = DevServerConfig(max_concurrent_requests=7, max_batch_size=4, max_input_tokens=100)
    async with running_app(lambda: emulated(max_batch_size=2), config) as (_, _, client):
        info = (await client.get("/info")).json()
    assert info["model_id"] == "emu"
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (100, 256)
    assert info["max_concurrent_requests"] == 7
    assert info["max_batch_size"] == 2  # capped by the engine
    assert {"version", "router", "max_best_of", "max_stop_sequences", "validation_workers"} <= set(info)


# -------------------------------------------------------------------------- generation routes
async def test_generate_body_and_headers() -> None:
    async with running_app(emulated) as (_, _, client):
        response = await client.post(
            "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 5, "details": True}}
        )
        plain = await client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
        sampled = await client.post(
            "/generate",
            json={
                "inputs": "hi",
                "parameters": {"max_new_tokens": 2, "do_sample": True, "seed": 9, "details": True},
            },
        )
    assert response.status_code == 200
    body = response.json()
    details = body["details"]
    assert (details["finish_reason"], details["generated_tokens"], details["seed"]) == ("length", 5, None)
    assert len(details["tokens"]) == 5
    assert set(details["tokens"][0]) == {"id", "text", "logprob", "special"}
    assert body["generated_text"] == "".join(t["text"] for t in details["tokens"])
    assert response.headers["x-generated-tokens"] == "5"
    assert response.headers["x-prompt-tokens"] == "2"
    assert response.headers["x-compute-type"] == "emulated"
    for header in ("x-queue-time", "x-inference-time", "x-time-per-token", "x-total-time"):
        assert int(response.headers[header]) >= 0
    assert "details" not in plain.json()
    assert sampled.json()["details"]["seed"] == 9


async def test_generate_stream_events() -> None:
    async with running_app(emulated) as (_, _, client):
        response = await client.post(
            "/generate_stream", json={"inputs": "hello", "parameters": {"max_new_tokens": 3, "details": True}}
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert [e["index"] for e in events] == [1, 2, 3]
    assert [e["generated_text"] for e in events[:-1]] == [None, None]
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"] == {
        "finish_reason": "length",
        "generated_tokens": 3,
        "seed": None,
        "input_length": 2,
    }


async def test_compat_route_dispatches_on_stream() -> None:
    async with running_app(emulated) as (_, _, client):
        plain = await client.post("/", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        streamed = await client.post(
            "/", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}, "stream": True}
        )
    assert isinstance(plain.json(), list)
    assert set(plain.json()[0]) == {"generated_text"}
    assert len(sse(streamed.text)) == 2


async def test_chat_completions() -> None:
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    async with running_app(emulated) as (_, _, client):
        reply = (await client.post("/v1/chat/completions", json=request)).json()
        streamed = await client.post(
            "/v1/chat/completions",
            json={**request, "stream": True, "stream_options": {"include_usage": True}},
        )
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 4
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + 4
    chunks = sse(streamed.text, prefix="data: ")
    assert chunks[-1] == "[DONE]"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "length"]
    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("route", "body", "status", "needle"),
    [
        (
            "/generate",
            {"inputs": "x", "parameters": {"temperature": 0}},
            422,
            "`temperature` must be strictly",
        ),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, 422, "`max_new_tokens` must be"),
        ("/generate", {"inputs": "x" * 2000}, 422, "`inputs` must have less than 100 tokens. Given: 500"),
        ("/generate", {"inputs": "x" * 300, "parameters": {"max_new_tokens": 200}}, 422, "must be <= 256"),
        (
            "/generate",
            {"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}},
            422,
            "up to 4 stop",
        ),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": "ten"}}, 422, "must be an integer"),
        ("/generate", {"inputs": ""}, 422, "`inputs` cannot be empty"),
        ("/generate", {"prompt": "x"}, 422, "`inputs` (string) is required"),
        ("/generate_stream", {"inputs": "x" * 2000}, 422, "`inputs` must have less than"),
        ("/v1/chat/completions", {"messages": []}, 422, "`messages`"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 422, "role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "n": 2},
            422,
            "`n` must be 1",
        ),
    ],
)
async def test_validation_errors_use_tgi_shape(route: str, body: Any, status: int, needle: str) -> None:
    config = DevServerConfig(max_input_tokens=100)
    async with running_app(emulated, config) as (_, server, client):
        response = await client.post(route, json=body)
        metrics = (await client.get("/metrics")).text
    assert response.status_code == status
    assert response.json()["error_type"] == "validation"
    assert needle in response.json()["error"]
    assert 'tgi_request_failure{err="validation"} 1' in metrics
    assert server.queue.waiting == server.queue.running == 0


async def test_malformed_json_is_400() -> None:
    async with running_app(emulated) as (_, _, client):
        response = await client.post("/generate", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error_type"] == "validation"


# ------------------------------------------------------------------------------ queue semantics
async def test_gauges_follow_the_queue() -> None:
    async with running_app(lambda: emulated(SLOW)) as (_, server, client):
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 4}}
        requests = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(4)]
        await until(lambda: server.queue.waiting == 3)
        page = (await client.get("/metrics")).text
        assert parse_queue_gauges(page) == (3.0, 1.0)
        assert "tgi_batch_current_max_tokens 5" in page  # 1 prompt token + 4 new
        responses = await asyncio.gather(*requests)
        page = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200] * 4
    queue_ms = sorted(int(r.headers["x-queue-time"]) for r in responses)
    assert queue_ms[-1] >= 150  # the last one waited for three 60 ms generations
    assert parse_queue_gauges(page) == (0.0, 0.0)
    assert "tgi_request_success 4" in page
    assert "tgi_request_count 4" in page


async def test_past_max_concurrent_requests_is_429() -> None:
    config = DevServerConfig(max_concurrent_requests=2)
    async with running_app(lambda: emulated(SLOW), config) as (_, _, client):
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 3}}
        first = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(2)]
        await asyncio.sleep(0.02)
        refused = await client.post("/generate", json=body)
        refused_stream = await client.post("/generate_stream", json=body)
        accepted = await asyncio.gather(*first)
        page = (await client.get("/metrics")).text
    assert [r.status_code for r in accepted] == [200, 200]
    for response in (refused, refused_stream):
        assert response.status_code == 429
        assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert 'tgi_request_failure{err="overloaded"} 2' in page


async def test_emulator_batches_continuously() -> None:
    config = DevServerConfig(max_batch_size=4)
    async with running_app(lambda: emulated(SLOW, max_batch_size=4), config) as (_, server, client):
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 3}}
        requests = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(6)]
        await until(lambda: server.queue.running == 4)
        assert server.queue.waiting == 2
        responses = await asyncio.gather(*requests)
    assert all(r.status_code == 200 for r in responses)


async def _asgi_call(
    app: Starlette, path: str, body: dict[str, Any], disconnect: asyncio.Event
) -> list[Message]:
    """Drive the ASGI app by hand, to disconnect the client when ``disconnect`` is set."""
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"dev")],
        "client": ("127.0.0.1", 1),
        "server": ("dev", 80),
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/v1/chat/completions"])
async def test_client_disconnect_while_queued_leaves_the_queue(path: str) -> None:
    async with running_app(lambda: emulated(SLOW)) as (app, server, client):
        busy = asyncio.create_task(
            client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 10}})
        )
        await until(lambda: server.queue.running == 1)
        gone = asyncio.Event()
        body: dict[str, Any] = {"inputs": "queued", "parameters": {"max_new_tokens": 50}}
        if path.startswith("/v1"):
            body = {"messages": [{"role": "user", "content": "queued"}], "max_tokens": 50}
        queued = asyncio.create_task(_asgi_call(app, path, body, gone))
        await until(lambda: server.queue.waiting == 1)
        gone.set()
        await until(lambda: server.queue.waiting == 0)
        await asyncio.wait_for(queued, 2)
        assert server.queue.running == 1  # the running request is untouched
        assert (await busy).status_code == 200
    assert server.queue.waiting == server.queue.running == 0


async def test_client_disconnect_while_generating_frees_the_slot() -> None:
    async with running_app(lambda: emulated(SLOW)) as (app, server, _):
        gone = asyncio.Event()
        call = asyncio.create_task(
            _asgi_call(app, "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 100}}, gone)
        )
        await until(lambda: server.queue.running == 1)
        gone.set()
        await asyncio.wait_for(call, 1)  # far less than the 2 s the generation would take
        assert server.queue.running == 0


# --------------------------------------------------------------------------- queue and emulator
async def test_request_queue_release_is_idempotent_in_every_state() -> None:
    queue = RequestQueue(max_batch_size=1, max_concurrent_requests=3)
    first = queue.enqueue(prompt_tokens=1, max_new_tokens=1)
    second = queue.enqueue(prompt_tokens=1, max_new_tokens=1)
    third = queue.enqueue(prompt_tokens=1, max_new_tokens=1)
    with pytest.raises(QueueFull):
        queue.enqueue(prompt_tokens=1, max_new_tokens=1)
    assert (queue.running, queue.waiting) == (1, 2)
    queue.release(second)  # leaves while waiting
    queue.release(second)
    assert (queue.running, queue.waiting) == (1, 1)
    queue.release(first)  # the next waiting one starts
    assert third.state == "running"
    assert third.admitted.done()
    queue.release(third)
    queue.release(first)
    assert (queue.running, queue.waiting) == (0, 0)


class SimulatedTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


async def test_emulator_service_time_model() -> None:
    time = SimulatedTime()
    service = ServiceTimeModel(prefill_ms_per_token=1.0, decode_ms_per_token=10.0, batch_slowdown=0.5)
    engine = EmulatedEngine(max_batch_size=4, service=service, clock=time.clock, sleep=time.sleep)
    params = SamplingParams(max_new_tokens=3, seed=0)
    tokens = [t async for t in engine.stream("x" * 40, params)]  # 10 prompt tokens
    assert time.sleeps == [0.01, 0.01, 0.01]  # prefill 10 x 1 ms, then two 10 ms decode steps
    assert [t.finish_reason for t in tokens] == [None, None, "length"]
    assert [t.text for t in tokens] == [t.text for t in [t async for t in engine.stream("y", params)]]

    time.sleeps.clear()
    engine.running = 2  # two other sequences in the batch: each step is 1 + 0.5 x 2 = 2x slower
    _ = [t async for t in engine.stream("x" * 4, params)]
    assert time.sleeps == [0.002, 0.02, 0.02]
    assert engine.running == 2


def test_service_time_model_rejects_negative_numbers() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        ServiceTimeModel(decode_ms_per_token=-1)


def test_listening_socket_says_tcp_so_asyncio_disables_nagle() -> None:
    # Regression: with proto=0, asyncio skips TCP_NODELAY and every response with a body took ~44 ms.
    import socket

    from devstack.tgi_dev.cli import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


async def test_log_requests_logs_each_generation_with_its_last_user_turn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``--log-requests``: one line per generation (how the kill test counts generations per request)."""
    messages = [
        {"role": "user", "content": "example question"},
        {"role": "assistant", "content": "example answer"},
        {"role": "user", "content": 'Item 7: say "ok".'},
    ]
    caplog.set_level("INFO", logger="devstack.tgi_dev.app")
    async with running_app(emulated, DevServerConfig(log_requests=True)) as (_, _, client):
        await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
        await client.post("/generate", json={"inputs": "plain", "parameters": {"max_new_tokens": 2}})
    async with running_app(emulated) as (_, _, client):  # off by default
        await client.post("/generate", json={"inputs": "quiet", "parameters": {"max_new_tokens": 2}})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generation request")]
    assert lines == [
        'generation request /v1/chat/completions "Item 7: say \\"ok\\"."',
        'generation request /generate "plain"',
    ]
