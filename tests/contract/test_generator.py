"""One contract for every ``Generator``: ``FakeGenerator`` and the real ``TGIGenerator`` talking to
the dev TGI server on its emulated engine (TGI's wire protocol and request queue, no model).

The dev server runs in this process, in uvicorn on a thread with its own event loop, bound to a free
port (the pattern of httpx's ``serve_in_thread``). Its engine decodes at ``DECODE_MS`` per token, so a
generation of ``SLOW_TOKENS`` stays in flight long enough to observe; ``max_concurrent_requests=1``
makes a second concurrent request a 429. The real variant is marked ``integration``:
``-m "not integration"`` runs the fake alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from infra.errors import BackendOverloaded, BackendRejected, BackendUnavailable
from infra.protocols import ChatMessage, GenerationParams, Generator
from infra.settings import BackendSettings
from infra.tgi import TGIGenerator, parse_queue_gauges
from tests.fakes.backends import FakeGenerator

MAX_TOTAL_TOKENS = 512
DECODE_MS = 10.0
SLOW_TOKENS = 60  # ~0.6 s in flight
HELLO = [ChatMessage("system", "You are terse."), ChatMessage("user", "Say hello.")]
GENERATORS = ["fake", pytest.param("tgi", marks=pytest.mark.integration)]
FILLER = " ".join(["word"] * 200)


# ------------------------------------------------------------------------------- the real backend
def _listening_socket() -> socket.socket:
    # IPPROTO_TCP: asyncio then sets TCP_NODELAY (see devstack/tgi_dev/cli.py:_bind)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serve_in_thread(app: object, sock: socket.socket, *, ready_timeout_s: float = 20.0) -> Iterator[str]:
    import uvicorn

    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        log_level="warning",
        access_log=False,
        lifespan="on",
        ws="none",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tgi-dev", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:  # /health is 503 until the engine is attached
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline or not thread.is_alive():
                pytest.fail(f"the dev TGI server did not become healthy within {ready_timeout_s} s")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def dev_tgi_url() -> Iterator[str]:
    pytest.importorskip(
        "starlette", reason="the dev TGI server needs the local extra: pip install '.[local]'"
    )
    pytest.importorskip("uvicorn", reason="the dev TGI server needs the local extra: pip install '.[local]'")
    from devstack.tgi_dev.app import DevServerConfig, build_app
    from devstack.tgi_emulator import EmulatedEngine, ServiceTimeModel

    service = ServiceTimeModel(prefill_ms_per_token=0.0, decode_ms_per_token=DECODE_MS, batch_slowdown=0.0)
    app = build_app(
        DevServerConfig(max_concurrent_requests=1, max_batch_size=1, max_total_tokens=MAX_TOTAL_TOKENS),
        lambda: EmulatedEngine(
            model_id="emulated", max_batch_size=1, max_total_tokens=MAX_TOTAL_TOKENS, service=service
        ),
    )
    with serve_in_thread(app, _listening_socket()) as url:
        yield url


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that is bound but not listening: connecting to it is refused, and no one can take it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# -------------------------------------------------------------------------------------- the rigs
@dataclass
class Rig:
    """How one kind of generator is opened and observed; the tests below are written against it."""

    open: Callable[[], Generator]  # a generator for the backend under test
    open_unreachable: Callable[[], Generator]  # one whose backend refuses connections
    load: Callable[[Generator], Awaitable[float]]  # the backend's waiting + running requests


def _fake_rig() -> Rig:
    fake = FakeGenerator(
        "backend-0",
        reply=FILLER,
        token_latency_s=DECODE_MS / 1000.0,
        max_concurrent_requests=1,
        max_input_tokens=MAX_TOTAL_TOKENS - 1,
        max_total_tokens=MAX_TOTAL_TOKENS,
    )

    def unreachable() -> Generator:
        down = FakeGenerator("backend-0")
        down.unreachable = True
        return down

    async def load(generator: Generator) -> float:
        assert isinstance(generator, FakeGenerator)
        return float(generator.in_flight)

    return Rig(open=lambda: fake, open_unreachable=unreachable, load=load)


def _tgi_rig(url: str, refused: str) -> Rig:
    async def load(generator: Generator) -> float:
        async with httpx.AsyncClient() as client:
            waiting, running = parse_queue_gauges((await client.get(f"{url}/metrics")).text)
        return waiting + running

    return Rig(
        open=lambda: TGIGenerator(BackendSettings(name="backend-0", url=url, tier="small")),
        open_unreachable=lambda: TGIGenerator(
            BackendSettings(name="backend-0", url=refused, tier="small"), connect_timeout_s=1.0
        ),
        load=load,
    )


@pytest.fixture(params=GENERATORS)
def rig(request: pytest.FixtureRequest, refused_url: str) -> Rig:
    if request.param == "fake":
        return _fake_rig()
    return _tgi_rig(str(request.getfixturevalue("dev_tgi_url")), refused_url)


@pytest.fixture
async def generator(rig: Rig) -> AsyncIterator[Generator]:
    opened = rig.open()
    try:
        yield opened
    finally:
        await opened.aclose()


async def _until_busy(rig: Rig, generator: Generator, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await rig.load(generator) < 1:
        if time.monotonic() > deadline:
            pytest.fail("the first generation never showed up in the backend's queue")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------- the contract
async def test_generate_returns_text_and_token_counts(generator: Generator) -> None:
    out = await generator.generate(HELLO, GenerationParams(max_new_tokens=8))
    assert isinstance(out.text, str) and out.text.strip()
    assert out.backend == generator.name == "backend-0"
    assert 1 <= out.generated_tokens <= 8
    assert out.prompt_tokens >= 1
    assert out.latency_s >= 0.0
    assert out.finish_reason in {"length", "stop", "eos_token", "stop_sequence"}


async def test_max_new_tokens_bounds_the_generation(generator: Generator) -> None:
    short = await generator.generate(HELLO, GenerationParams(max_new_tokens=2))
    longer = await generator.generate(HELLO, GenerationParams(max_new_tokens=12))
    assert 1 <= short.generated_tokens <= 2 < longer.generated_tokens <= 12


async def test_info_reports_the_backends_limits(generator: Generator) -> None:
    info = await generator.info()
    assert info.model_id
    assert info.max_concurrent_requests == 1
    assert info.max_total_tokens == MAX_TOTAL_TOKENS
    assert 0 < info.max_input_tokens < info.max_total_tokens


async def test_a_full_backend_answers_429_as_backend_overloaded(rig: Rig, generator: Generator) -> None:
    first = asyncio.create_task(generator.generate(HELLO, GenerationParams(max_new_tokens=SLOW_TOKENS)))
    try:
        await _until_busy(rig, generator)
        with pytest.raises(BackendOverloaded) as caught:
            await generator.generate(HELLO, GenerationParams(max_new_tokens=4))
        assert caught.value.retriable and caught.value.backend == "backend-0"
        assert caught.value.status == 429
    finally:
        done = await first
    assert done.generated_tokens >= 1  # the request that held the slot is unaffected


async def test_a_refused_connection_is_backend_unavailable(rig: Rig) -> None:
    generator = rig.open_unreachable()
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await generator.generate(HELLO, GenerationParams(max_new_tokens=4))
    finally:
        await generator.aclose()
    assert caught.value.retriable and caught.value.backend == "backend-0"


async def test_a_prompt_over_the_input_limit_is_rejected_and_not_retriable(generator: Generator) -> None:
    long_prompt = [ChatMessage("user", " ".join(["tokens"] * (2 * MAX_TOTAL_TOKENS)))]
    with pytest.raises(BackendRejected) as caught:
        await generator.generate(long_prompt, GenerationParams(max_new_tokens=4))
    assert not caught.value.retriable and caught.value.status == 422


async def test_aclose_is_idempotent_and_a_closed_generator_refuses_work(rig: Rig) -> None:
    generator = rig.open()
    await generator.aclose()
    await generator.aclose()
    with pytest.raises(RuntimeError):
        await generator.generate(HELLO, GenerationParams(max_new_tokens=4))
