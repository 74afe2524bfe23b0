"""The gateway's HTTP contract with a scripted relay: status codes, OpenAI shapes, tenant binding.

The relay here stands in for ``EchoClient.ask`` only (the Protocol the gateway depends on); the
real pipeline behind the real ``openai`` SDK is in tests/integration/test_gateway.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from aiokafka.errors import KafkaConnectionError

from echolm.client import Delta, Reply
from echolm.gateway import build_gateway
from infra.auth import hash_key
from infra.errors import ClientTimeout, StreamDiverged
from infra.settings import Settings, load_settings

ACME_KEY, GLOBEX_KEY = "elm-acme-test-key", "elm-globex-test-key"
CHAT = {"model": "echolm-auto", "messages": [{"role": "user", "content": "hello"}]}


class ScriptedRelay:
    """Answers ``ask`` with ``outcome`` (a Reply factory or an exception); records what it was sent.
    ``stream`` yields ``pieces`` (texts, or an exception to raise there), then the reply ``outcome``
    makes (by default the pieces joined)."""

    def __init__(self) -> None:
        self.pieces: list[str | BaseException] = ["echo", " hel", "lo"]
        self.streams_closed = 0
        self.sent: list[dict[str, Any]] = []
        self.outcome: Any = None
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Condition()

    async def ask(
        self,
        prompt: str,
        *,
        tenant: str = "default",
        timeout: float = 60.0,  # noqa: ASYNC109 - EchoClient.ask's signature
        **kw: Any,
    ) -> Reply:
        body = orjson.loads(kw["raw"])
        self.sent.append({"prompt": prompt, "tenant": tenant, "timeout": timeout, **kw, "body": body})
        async with self.arrived:
            self.arrived.notify_all()
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        if self.outcome is not None:
            return self.outcome(body)  # type: ignore[no-any-return]
        return Reply(request_id=kw["request_id"], tenant=tenant, ok=True, text=f"echo {prompt}", tier="small")

    async def stream(
        self,
        prompt: str | None = None,
        *,
        tenant: str = "default",
        timeout: float = 60.0,  # noqa: ASYNC109 - EchoClient.stream's signature
        request_id: str | None = None,
        raw: bytes | None = None,
    ) -> AsyncIterator[Delta]:
        assert raw is not None and request_id is not None
        body = orjson.loads(raw)
        self.sent.append({"tenant": tenant, "timeout": timeout, "request_id": request_id, "body": body})
        try:
            for piece in self.pieces:
                if isinstance(piece, BaseException):
                    raise piece
                yield Delta(piece)
            text = "".join(p for p in self.pieces if isinstance(p, str))
            reply = (
                self.outcome(body)
                if self.outcome is not None
                else Reply(
                    request_id=request_id,
                    tenant=tenant,
                    ok=True,
                    text=text,
                    tier="small",
                    prompt_tokens=9,
                    completion_tokens=3,
                    finish_reason="length",
                )
            )
            yield Delta("", reply)
        finally:
            self.streams_closed += 1


def _settings(**gateway: Any) -> Settings:
    keys = [
        {"tenant": "acme", "key_hash": hash_key(ACME_KEY)},
        {"tenant": "globex", "key_hash": hash_key(GLOBEX_KEY), "burst": 2, "rate_per_s": 0.01},
    ]
    return load_settings(gateway={"api_keys": keys, **gateway}, limits={"max_prompt_chars": 200})


@pytest.fixture
def relay() -> ScriptedRelay:
    return ScriptedRelay()


@pytest.fixture
async def http(relay: ScriptedRelay) -> AsyncIterator[httpx.AsyncClient]:
    app = build_gateway(_settings(), relay)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        yield client


def _auth(key: str = ACME_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def _post(http: httpx.AsyncClient, body: Any, key: str = ACME_KEY) -> httpx.Response:
    return await http.post("/v1/chat/completions", json=body, headers=_auth(key))


def _error(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error  # type: ignore[no-any-return]


async def test_a_completion_has_openai_shape_and_the_key_tenant(
    http: httpx.AsyncClient, relay: ScriptedRelay
) -> None:
    r = await _post(http, CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "echolm-auto"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo hello"}
    assert body["id"] == f"chatcmpl-{r.headers['x-request-id']}"
    sent = relay.sent[0]
    assert sent["tenant"] == "acme" and sent["body"]["tenant"] == "acme"
    assert sent["body"]["version"] == 2 and sent["body"]["messages"] == CHAT["messages"]
    assert sent["request_id"] == r.headers["x-request-id"]


async def test_the_body_cannot_choose_a_tenant_or_a_reply_topic(
    http: httpx.AsyncClient, relay: ScriptedRelay
) -> None:
    for extra in ({"tenant": "globex"}, {"reply_topic": "echolm.replies.x"}, {"request_id": "mine"}):
        r = await _post(http, {**CHAT, **extra})
        assert r.status_code == 400 and _error(r)["param"] == next(iter(extra))
    assert relay.sent == []


async def test_multi_turn_and_sampling_fields_reach_the_record(
    http: httpx.AsyncClient, relay: ScriptedRelay
) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me about Paris."}]},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "Its population?"},
    ]
    body = {
        **CHAT,
        "messages": messages,
        "max_tokens": 9,
        "temperature": 0.2,
        "top_p": 0.5,
        "stop": ["\n"],
        "seed": 4,
    }
    r = await _post(http, body)
    assert r.status_code == 200
    sent = relay.sent[0]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][1]["content"] == "Tell me about Paris."
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["stop"], sent["seed"]) == (
        9,
        0.2,
        0.5,
        ["\n"],
        4,
    )


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": CHAT["messages"]}, 400, "model"),
        ({**CHAT, "model": "gpt-4o"}, 404, "model"),
        ({**CHAT, "model": "small"}, 400, "model"),
        ({**CHAT, "messages": []}, 400, "messages"),
        ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
        ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0]"),
        ({**CHAT, "messages": [{"role": "assistant", "content": "x"}]}, 400, None),
        ({**CHAT, "messages": [{"role": "user", "content": "x" * 201}]}, 400, None),
        ({**CHAT, "max_tokens": 10_000}, 400, None),
        ({**CHAT, "temperature": 9}, 400, None),
        ({**CHAT, "n": 2}, 400, "n"),
        ({**CHAT, "functions": []}, 400, "functions"),
        ({**CHAT, "max_tokens": 5, "max_completion_tokens": 5}, 400, "max_tokens"),
        ([1, 2], 400, None),
    ],
)
async def test_bad_requests_are_400_or_404_and_never_relayed(
    http: httpx.AsyncClient, relay: ScriptedRelay, body: Any, status: int, param: str | None
) -> None:
    r = await _post(http, body)
    assert r.status_code == status
    assert _error(r)["param"] == param
    assert relay.sent == []


async def test_harmless_sdk_defaults_are_accepted(http: httpx.AsyncClient) -> None:
    r = await _post(http, {**CHAT, "n": 1, "presence_penalty": 0, "user": "u1", "stream_options": None})
    assert r.status_code == 200


async def test_not_json_and_too_large_bodies(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", content=b"{nope", headers=_auth())
    assert r.status_code == 400 and _error(r)["code"] == "invalid_json"
    r = await http.post("/v1/chat/completions", content=b"x" * (2 * 1024 * 1024), headers=_auth())
    assert r.status_code == 413


@pytest.mark.parametrize(
    "headers", [{}, {"authorization": "Bearer "}, {"authorization": "Basic abc"}, _auth("elm-nope")]
)
async def test_missing_or_unknown_keys_are_401(
    http: httpx.AsyncClient, relay: ScriptedRelay, headers: dict[str, str]
) -> None:
    r = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 401 and _error(r)["code"] in {"missing_api_key", "invalid_api_key"}
    assert (await http.get("/v1/models", headers=headers)).status_code == 401
    assert relay.sent == []


async def test_a_tenant_over_its_limit_gets_429_and_others_do_not(http: httpx.AsyncClient) -> None:
    assert [(await _post(http, CHAT, GLOBEX_KEY)).status_code for _ in range(2)] == [200, 200]
    r = await _post(http, CHAT, GLOBEX_KEY)
    assert r.status_code == 429 and _error(r)["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert (await _post(http, CHAT, ACME_KEY)).status_code == 200


async def test_backpressure_answers_429_when_inflight_is_full(relay: ScriptedRelay) -> None:
    relay.gate = asyncio.Event()
    app = build_gateway(_settings(max_inflight=2), relay)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        held = [asyncio.create_task(_post(http, CHAT)) for _ in range(2)]
        async with relay.arrived:
            await relay.arrived.wait_for(lambda: len(relay.sent) == 2)
        r = await _post(http, CHAT)
        assert r.status_code == 429 and _error(r)["code"] == "server_busy"
        relay.gate.set()
        assert [(await t).status_code for t in held] == [200, 200]
        assert (await _post(http, CHAT)).status_code == 200


@pytest.mark.parametrize(
    ("outcome", "status", "code"),
    [
        (ClientTimeout("no reply"), 504, None),
        (KafkaConnectionError("down"), 503, "broker_unavailable"),
        ("deadline_exceeded", 504, "deadline_exceeded"),
        ("no_backend_available", 503, "no_backend_available"),
        ("schema_error", 400, "schema_error"),
        ("unknown_tenant", 403, "unknown_tenant"),
        ("internal", 502, "internal"),
    ],
)
async def test_failures_map_to_openai_errors(
    http: httpx.AsyncClient, relay: ScriptedRelay, outcome: Any, status: int, code: str | None
) -> None:
    if isinstance(outcome, str):
        relay.outcome = lambda body: Reply(
            request_id=body["request_id"],
            tenant="acme",
            ok=False,
            text="",
            error_code=outcome,
            error_message="m",
        )
    else:
        relay.outcome = outcome
    r = await _post(http, CHAT)
    assert r.status_code == status and _error(r)["code"] == code
    assert r.headers["x-request-id"]


async def test_a_reply_for_another_tenant_is_not_delivered(
    http: httpx.AsyncClient, relay: ScriptedRelay
) -> None:
    relay.outcome = lambda body: Reply(request_id=body["request_id"], tenant="globex", ok=True, text="secret")
    r = await _post(http, CHAT)
    assert r.status_code == 502 and "secret" not in r.text


def _events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]


async def test_stream_true_relays_each_piece_as_its_own_sse_chunk(
    http: httpx.AsyncClient, relay: ScriptedRelay
) -> None:
    r = await _post(http, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:4]]
    assert contents == ["echo", " hel", "lo"]  # one SSE chunk per relayed piece, in order
    assert chunks[4]["choices"][0]["finish_reason"] == "length"
    assert chunks[5]["choices"] == [] and chunks[5]["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
    }
    assert relay.sent[0]["body"]["stream"] is True and relay.streams_closed == 1


async def test_a_stream_error_before_any_text_is_an_http_status(
    http: httpx.AsyncClient, relay: ScriptedRelay
) -> None:
    relay.pieces = []
    relay.outcome = lambda body: Reply(
        request_id=body["request_id"], tenant="acme", ok=False, text="", error_code="deadline_exceeded"
    )
    r = await _post(http, {**CHAT, "stream": True})
    assert r.status_code == 504 and _error(r)["code"] == "deadline_exceeded"
    assert relay.streams_closed == 1


async def test_a_diverged_retry_after_text_ends_the_stream_with_an_error_event(
    http: httpx.AsyncClient, relay: ScriptedRelay
) -> None:
    relay.pieces = ["echo", StreamDiverged("a retried generation disagrees")]
    r = await _post(http, {**CHAT, "stream": True})
    events = _events(r)
    assert r.status_code == 200 and "[DONE]" not in events
    assert orjson.loads(events[-1])["error"]["code"] == "stream_diverged"
    assert (await http.get("/health")).json()["inflight"] == 0  # the stream's slot was given back


async def test_usage_and_finish_reason_in_a_completion(http: httpx.AsyncClient, relay: ScriptedRelay) -> None:
    relay.outcome = lambda body: Reply(
        request_id=body["request_id"],
        tenant="acme",
        ok=True,
        text="cut",
        prompt_tokens=5,
        completion_tokens=2,
        finish_reason="length",
    )
    body = (await _post(http, {**CHAT, "top_p": 0.5})).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert relay.sent[0]["body"]["top_p"] == 0.5


async def test_models_health_and_metrics(http: httpx.AsyncClient) -> None:
    models = (await http.get("/v1/models", headers=_auth())).json()
    assert [m["id"] for m in models["data"]] == ["echolm-auto", "large", "small"]
    assert (await http.get("/health")).json()["status"] == "ok"
    await _post(http, CHAT)
    await _post(http, CHAT, "elm-wrong")
    text = (await http.get("/metrics")).text
    assert 'echolm_gateway_requests_total{status="200"} 1.0' in text
    assert 'echolm_gateway_requests_total{status="401"} 1.0' in text


async def test_health_is_503_without_a_relay() -> None:
    app = build_gateway(_settings(), None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        assert (await http.get("/health")).status_code == 503
        assert (await _post(http, CHAT)).status_code == 503


async def test_trusted_single_tenant_mode_needs_no_key_and_is_off_by_default(relay: ScriptedRelay) -> None:
    assert load_settings().gateway.trusted_tenant is None
    with pytest.raises(ValueError, match="no API keys"):
        build_gateway(load_settings(), relay)
    app = build_gateway(load_settings(gateway={"trusted_tenant": "solo"}), relay)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert relay.sent[0]["tenant"] == "solo"
