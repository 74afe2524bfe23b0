"""``echolm gateway`` end to end: the real ``openai`` SDK -> HTTP -> Kafka -> workers -> TGI -> back.

The local stack (Tansu, embedded Milvus, two dev TGI servers running SmolLM2) and a real worker;
the gateway runs in uvicorn on a free port. Reply text from a 135M model is never asserted on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import openai
import pytest
import uvicorn
from openai import AsyncOpenAI

from echolm.bank import read_log
from echolm.client import EchoClient
from echolm.gateway import build_gateway
from echolm.gateway_server import bind
from infra.auth import hash_key, new_api_key
from infra.protocols import ChatMessage
from infra.settings import ApiKeySettings, Settings
from streams.conversation import retrieval_key
from streams.records import LogRecord

from .conftest import PipelineFactory

pytestmark = pytest.mark.integration

ACME, LIMITED = new_api_key(), new_api_key()


@dataclass
class Gateway:
    url: str
    settings: Settings

    def sdk(self, key: str = ACME) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=300)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_factory(pipeline_factory: PipelineFactory) -> AsyncIterator[GatewayFactory]:
    clients: list[EchoClient] = []
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def make(**gateway: object) -> Gateway:
        pipeline = await pipeline_factory(workers=1)
        keys = [
            ApiKeySettings(tenant="acme", key_hash=hash_key(ACME)),
            ApiKeySettings(tenant="limited", key_hash=hash_key(LIMITED), burst=1, rate_per_s=0.001),
        ]
        settings = pipeline.settings.model_copy(
            update={"gateway": pipeline.settings.gateway.model_copy(update={"api_keys": keys, **gateway})}
        )
        client = EchoClient(settings)
        clients.append(client)
        await client.start()
        sock = bind("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(build_gateway(settings, client), log_level="warning"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        servers.append((server, task))
        # no wait for start-up: the socket already listens, so early connections queue until uvicorn accepts
        return Gateway(url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", settings=settings)

    yield make
    for server, task in servers:
        server.should_exit = True
        await task
    for client in clients:
        await client.aclose()


async def _logged(settings: Settings, request_id: str) -> LogRecord:
    for _ in range(60):
        for record in await read_log(settings):
            if record.request.request_id == request_id:
                return record
        await asyncio.sleep(0.5)
    raise AssertionError(f"no log record for {request_id}")


async def test_completion_conversation_stream_and_errors_through_the_openai_sdk(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory()
    sdk = gw.sdk()

    # a plain completion
    reply = await sdk.chat.completions.create(
        model="echolm-auto", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12
    )
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].message.content.strip()

    # a multi-turn conversation: every turn reaches the pipeline, keyed on the turn plus its context
    turns = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Tell me about Paris."},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "What about its population?"},
    ]
    raw = await sdk.chat.completions.with_raw_response.create(
        model="echolm-auto", messages=turns, max_tokens=12
    )
    request_id = raw.headers["x-request-id"]
    assert raw.parse().choices[0].message.content is not None
    record = await _logged(gw.settings, request_id)
    assert [(t.role, t.content) for t in record.request.messages] == [
        (t["role"], t["content"]) for t in turns
    ]
    expected_key = retrieval_key([ChatMessage(role=t["role"], content=t["content"]) for t in turns])  # type: ignore[arg-type]
    assert record.request.prompt == expected_key and record.request.tenant == "acme"

    # stream=True: the pieces as serve generates them, then the finish and the usage
    stream = await sdk.chat.completions.create(
        model="echolm-auto",
        messages=[{"role": "user", "content": "Count from one to twenty in words."}],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) > 2, contents  # relayed as they came, not one piece at the end
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    streamed = await _logged(gw.settings, chunks[0].id.removeprefix("chatcmpl-"))
    assert streamed.request.stream and streamed.reply.text == "".join(contents)
    assert reply.usage is not None and reply.usage.prompt_tokens > 0

    # bad input and an unknown model: nothing produced, OpenAI's error types
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.chat.completions.create(
            model="echolm-auto", messages=[{"role": "assistant", "content": "x"}]
        )
    assert "last message" in str(bad.value)
    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(
            model="echolm-auto", messages=[{"role": "user", "content": "x"}], max_tokens=10**6
        )
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])

    # an unknown key
    with pytest.raises(openai.AuthenticationError):
        await gw.sdk("elm-not-a-key").chat.completions.create(
            model="echolm-auto", messages=[{"role": "user", "content": "x"}]
        )
    models = await sdk.models.list()
    assert "echolm-auto" in [m.id for m in models.data]


async def test_a_tenant_over_its_limit_gets_429_while_others_are_served(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory()
    limited = gw.sdk(LIMITED)
    question = [{"role": "user", "content": "Name a fruit."}]
    first = await limited.chat.completions.create(model="echolm-auto", messages=question, max_tokens=8)  # type: ignore[arg-type]
    assert first.choices[0].message.content is not None
    with pytest.raises(openai.RateLimitError) as limited_error:
        await limited.chat.completions.create(model="echolm-auto", messages=question, max_tokens=8)  # type: ignore[arg-type]
    assert "limited" in str(limited_error.value)
    other = await gw.sdk().chat.completions.create(model="echolm-auto", messages=question, max_tokens=8)  # type: ignore[arg-type]
    assert other.choices[0].message.content is not None


async def test_fifty_concurrent_streams_are_each_complete_and_in_order(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(burst=100)  # one tenant, 50 at once: over the default burst of 40
    sdk = gw.sdk()

    async def stream(i: int) -> tuple[str, str]:
        chunks = await sdk.chat.completions.create(
            model="echolm-auto",
            messages=[{"role": "user", "content": f"Say the number {i} and one fact about it."}],
            max_tokens=10,
            stream=True,
        )
        pieces = [c async for c in chunks]
        assert pieces[-1].choices[0].finish_reason in ("stop", "length")
        text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        return pieces[0].id.removeprefix("chatcmpl-"), text

    results = await asyncio.gather(*(stream(i) for i in range(50)))
    assert len({request_id for request_id, _ in results}) == 50
    logged = {r.request.request_id: r.reply.text for r in await read_log(gw.settings)}
    for _ in range(60):
        if all(request_id in logged for request_id, _ in results):
            break
        await asyncio.sleep(0.5)
        logged = {r.request.request_id: r.reply.text for r in await read_log(gw.settings)}
    # every stream is the whole reply the worker logged, in order: nothing missing, nothing twice
    assert all(logged[request_id] == text for request_id, text in results)


async def test_twenty_concurrent_requests_are_all_answered(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    sdk = gw.sdk()

    async def ask(i: int) -> tuple[str, str | None]:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="echolm-auto",
            messages=[{"role": "user", "content": f"Give me a number near {i}."}],
            max_tokens=6,
        )
        return raw.headers["x-request-id"], raw.parse().choices[0].message.content

    results = await asyncio.gather(*(ask(i) for i in range(20)))
    assert len({request_id for request_id, _ in results}) == 20
    assert all(content is not None for _, content in results)


async def test_a_key_cannot_speak_for_another_tenant(gateway_factory: GatewayFactory) -> None:
    """Over HTTP the key alone decides the tenant: a tenant named in the body is refused, ``user`` and
    headers naming another tenant change nothing, and nothing of that tenant reaches the caller."""
    gw = await gateway_factory()
    vault = "The vault code of the Harrow branch is 4417."
    told = await gw.sdk().chat.completions.create(
        model="echolm-auto", messages=[{"role": "user", "content": f"{vault} Repeat it."}], max_tokens=16
    )
    assert told.choices[0].message.content is not None

    with pytest.raises(openai.BadRequestError) as refused:  # a body naming a tenant
        await gw.sdk().chat.completions.create(
            model="echolm-auto",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"tenant": "limited"},
        )
    assert refused.value.status_code == 400 and "tenant" in str(refused.value)

    raw = await gw.sdk(LIMITED).chat.completions.with_raw_response.create(
        model="echolm-auto",
        messages=[{"role": "user", "content": "What is the vault code of the Harrow branch?"}],
        max_tokens=16,
        user="acme",
        extra_headers={"x-echolm-tenant": "acme", "x-tenant": "acme"},
    )
    answer = raw.parse().choices[0].message.content or ""
    record = await _logged(gw.settings, raw.headers["x-request-id"])
    assert record.request.tenant == "limited"
    assert all(e.tenant == "limited" for e in [*record.examples, *(record.selected or [])])
    assert "4417" not in answer, answer
