"""infra/tgi.py without a server: Prometheus parsing, the probe's health/staleness marking, and the
mapping of every failure to a typed ``BackendError``, through ``httpx.MockTransport``.

The ``TGIGenerator`` cases go through the real ``AsyncInferenceClient.chat_completion`` path
(its HTTP session is ours, so the mock transport sees every request).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError

from infra.errors import (
    BackendError,
    BackendOverloaded,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)
from infra.protocols import ChatMessage, GenerationParams, Generator, QueueDepthProbe
from infra.settings import BackendSettings, TGISettings
from infra.tgi import TGIGenerator, TGIQueueProbe, backend_error, parse_queue_gauges

Handler = Callable[[httpx.Request], httpx.Response]

TGI_PAGE = """\
# HELP tgi_queue_size Requests waiting
# TYPE tgi_queue_size gauge
tgi_queue_size 3
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 1
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 2048
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.5"} 4
tgi_request_duration_bucket{le="+Inf"} 9
tgi_request_duration_sum 3.5
tgi_request_duration_count 9
"""
VLLM_PAGE = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 5.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
"""
SGLANG_PAGE = """\
sglang:num_running_reqs{model_name="m"} 4.0 1700000000000
sglang:num_queue_reqs{model_name="m"} 7.0 1700000000000
"""
CHAT_OK = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "system_fingerprint": "x",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "length"}
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}
INFO_OK = {
    "model_id": "m",
    "max_input_tokens": 1024,
    "max_total_tokens": 2048,
    "max_concurrent_requests": 8,
}


def backend(name: str = "small-0", url: str = "http://tgi.test", **kw: Any) -> BackendSettings:
    return BackendSettings(name=name, url=url, tier="small", **kw)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (TGI_PAGE, (3.0, 1.0)),
        (VLLM_PAGE, (5.0, 3.0)),  # summed over labels
        (SGLANG_PAGE, (7.0, 4.0)),  # sample timestamps are allowed
        (VLLM_PAGE + TGI_PAGE, (3.0, 1.0)),  # TGI's gauges win when several are present
        ("tgi_queue_size 0\ntgi_batch_current_size 0\n", (0.0, 0.0)),
    ],
    ids=["tgi", "vllm", "sglang", "tgi-preferred", "untyped-zero"],
)
def test_parse_queue_gauges(page: str, expected: tuple[float, float]) -> None:
    assert parse_queue_gauges(page) == expected


@pytest.mark.parametrize(
    "page",
    ["", "# nothing\n", "tgi_queue_size 3\n", "<html>not metrics</html>\n", "tgi_request_count 4\n"],
    ids=["empty", "comments", "half-pair", "html", "other-metrics"],
)
def test_parse_queue_gauges_rejects_pages_without_a_pair(page: str) -> None:
    with pytest.raises(ValueError, match="no queue gauges"):
        parse_queue_gauges(page)


# ----------------------------------------------------------------------------- error mapping
def _request() -> httpx.Request:
    return httpx.Request("POST", "http://tgi.test/v1/chat/completions")


def _hf_error(status: int, body: str = '{"error": "server says no", "error_type": "x"}') -> HfHubHTTPError:
    response = httpx.Response(status, text=body, request=_request())
    return HfHubHTTPError(f"{status} error", response=response)


def _status_error(status: int) -> httpx.HTTPStatusError:
    response = httpx.Response(status, json={"error": "nope"}, request=_request())
    return httpx.HTTPStatusError("bad status", request=response.request, response=response)


@pytest.mark.parametrize(
    ("exc", "expected", "retriable", "status"),
    [
        (_hf_error(429), BackendOverloaded, True, 429),
        (_hf_error(503), BackendUnavailable, True, 503),
        (_hf_error(500, "plain text crash"), BackendUnavailable, True, 500),
        (_hf_error(424), BackendUnavailable, True, 424),
        (_hf_error(504), BackendTimeout, True, 504),
        (_hf_error(408), BackendTimeout, True, 408),
        (_hf_error(422), BackendRejected, False, 422),
        (_hf_error(400), BackendRejected, False, 400),
        (_hf_error(404), BackendRejected, False, 404),
        (_status_error(429), BackendOverloaded, True, 429),
        (_status_error(502), BackendUnavailable, True, 502),
        (httpx.ConnectError("refused", request=_request()), BackendUnavailable, True, None),
        (httpx.RemoteProtocolError("cut", request=_request()), BackendUnavailable, True, None),
        (httpx.ReadError("reset", request=_request()), BackendUnavailable, True, None),
        (httpx.UnsupportedProtocol("no scheme", request=_request()), BackendUnavailable, True, None),
        (httpx.ConnectTimeout("slow", request=_request()), BackendTimeout, True, None),
        (httpx.ReadTimeout("slow", request=_request()), BackendTimeout, True, None),
        (httpx.PoolTimeout("slow", request=_request()), BackendTimeout, True, None),
        (InferenceTimeoutError("hf timeout"), BackendTimeout, True, None),
        (TimeoutError(), BackendTimeout, True, None),
        (json.JSONDecodeError("bad", "x", 0), BackendUnavailable, True, None),
    ],
)
def test_backend_error_mapping(
    exc: BaseException, expected: type[BackendError], retriable: bool, status: int | None
) -> None:
    error = backend_error(exc, backend="small-0", url="http://tgi.test", operation="POST /x", timeout_s=5)
    assert type(error) is expected
    assert error.retriable is retriable
    assert error.status == status
    assert error.backend == "small-0"
    assert "small-0" in str(error)
    assert "http://tgi.test" in str(error)


def test_backend_error_message_carries_the_server_message() -> None:
    error = backend_error(_hf_error(422), backend="b", url="http://u", operation="POST /x")
    assert error is not None
    assert "server says no" in str(error)
    assert "max_input_tokens" in str(error)  # says what to check


@pytest.mark.parametrize("exc", [RuntimeError("bug"), ValueError("bug"), asyncio.CancelledError()])
def test_backend_error_leaves_other_exceptions_alone(exc: BaseException) -> None:
    assert backend_error(exc, backend="b", url="http://u", operation="op") is None


# ------------------------------------------------------------------------------ TGIGenerator
def generator(handler: Handler, **kw: Any) -> TGIGenerator:
    settings = {k: kw.pop(k) for k in list(kw) if k in {"token", "max_concurrency"}}
    return TGIGenerator(backend(**settings), transport=httpx.MockTransport(handler), **kw)


MESSAGES = [ChatMessage("system", "be brief"), ChatMessage("user", "hi")]


async def test_generate_maps_the_chat_completion() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=CHAT_OK)

    async with generator(handler) as gen:
        assert isinstance(gen, Generator)
        result = await gen.generate(MESSAGES, GenerationParams(max_new_tokens=7, seed=3, stop=("\n",)))
        await gen.generate(MESSAGES, GenerationParams(max_new_tokens=7, temperature=0.7))

    assert (result.text, result.backend, result.finish_reason) == ("hello", "small-0", "length")
    assert (result.prompt_tokens, result.generated_tokens) == (12, 3)
    assert result.latency_s >= 0
    assert [r.url.path for r in seen] == ["/v1/chat/completions"] * 2
    first, second = (json.loads(r.content) for r in seen)
    assert first["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert (first["max_tokens"], first["temperature"], first["seed"], first["stop"]) == (7, 0.0, 3, ["\n"])
    assert second["temperature"] == 0.7
    assert "stop" not in second


async def test_generate_sends_no_token_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    # A locally saved Hugging Face token must never leak to a non-HF backend.
    monkeypatch.setenv("HF_TOKEN", "hf_should_not_leak")
    headers: list[httpx.Headers] = []

    def handler(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers)
        return httpx.Response(200, json=CHAT_OK)

    async with generator(handler) as gen:
        await gen.generate(MESSAGES, GenerationParams())
    async with generator(handler, token="secret-1") as gen:
        await gen.generate(MESSAGES, GenerationParams())
    assert "authorization" not in headers[0]
    assert headers[1]["authorization"] == "Bearer secret-1"


async def test_generate_reuses_one_connection_pool() -> None:
    clients: set[int] = set()

    async with generator(lambda r: httpx.Response(200, json=CHAT_OK)) as gen:
        for _ in range(3):
            await gen.generate(MESSAGES, GenerationParams())
            clients.add(id(await gen._client._get_async_client()))
        assert clients == {id(gen._http)}
        assert not gen._http.is_closed
    assert gen._http.is_closed


def _raise(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (lambda r: httpx.Response(429, json={"error": "Model is overloaded"}), BackendOverloaded),
        (lambda r: httpx.Response(503, json={"error": "loading"}), BackendUnavailable),
        (lambda r: httpx.Response(500, text="boom"), BackendUnavailable),
        (lambda r: httpx.Response(424, json={"error": "generation failed"}), BackendUnavailable),
        (lambda r: httpx.Response(422, json={"error": "Input validation error"}), BackendRejected),
        (lambda r: httpx.Response(400, json={"error": "bad"}), BackendRejected),
        (lambda r: httpx.Response(504, text="gateway timeout"), BackendTimeout),
        (lambda r: httpx.Response(200, text="this is not json"), BackendUnavailable),
        (lambda r: httpx.Response(200, json={"choices": []}), BackendUnavailable),
        (_raise(httpx.ConnectError("Connection refused")), BackendUnavailable),
        (_raise(httpx.RemoteProtocolError("Server disconnected")), BackendUnavailable),
        (_raise(httpx.ConnectTimeout("connect timeout")), BackendTimeout),
        (_raise(httpx.ReadTimeout("read timeout")), BackendTimeout),
    ],
    ids=[
        "429", "503", "500", "424", "422", "400", "504", "not-json", "no-choices",
        "refused", "cut-off", "connect-timeout", "read-timeout",
    ],
)  # fmt: skip
async def test_generate_raises_typed_errors(handler: Handler, expected: type[BackendError]) -> None:
    async with generator(handler) as gen:
        with pytest.raises(expected) as caught:
            await gen.generate(MESSAGES, GenerationParams())
    assert caught.value.backend == "small-0"
    assert caught.value.__cause__ is not None  # raised `from` the original error


async def test_generate_hang_becomes_backend_timeout() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json=CHAT_OK)

    async with TGIGenerator(backend(), request_timeout_s=0.05, transport=httpx.MockTransport(hang)) as gen:
        with pytest.raises(BackendTimeout, match=r"within 0\.05 s"):
            await gen.generate(MESSAGES, GenerationParams())


async def test_info_is_fetched_once_and_cached() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(200, json=INFO_OK)

    async with generator(handler) as gen:
        first = await gen.info()
        assert await gen.info() is first
    assert calls == ["/info"]
    assert (first.model_id, first.max_input_tokens, first.max_total_tokens) == ("m", 1024, 2048)
    assert first.max_concurrent_requests == 8


async def test_info_accepts_the_pre_2_1_field_name() -> None:
    legacy = {"model_id": "m", "max_input_length": 512, "max_total_tokens": 1024}
    async with generator(lambda r: httpx.Response(200, json=legacy)) as gen:
        info = await gen.info()
    assert (info.max_input_tokens, info.max_concurrent_requests) == (512, 128)


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (lambda r: httpx.Response(200, json={"model_id": "m"}), BackendUnavailable),
        (lambda r: httpx.Response(200, text="<html>"), BackendUnavailable),
        (lambda r: httpx.Response(503, json={"error": "loading"}), BackendUnavailable),
        (lambda r: httpx.Response(404, text="not found"), BackendRejected),
        (_raise(httpx.ConnectError("refused")), BackendUnavailable),
    ],
    ids=["missing-fields", "html", "503", "404", "refused"],
)
async def test_info_failures(handler: Handler, expected: type[BackendError]) -> None:
    async with generator(handler) as gen:
        with pytest.raises(expected):
            await gen.info()


@pytest.mark.parametrize(
    ("handler", "healthy"),
    [
        (lambda r: httpx.Response(200), True),
        (lambda r: httpx.Response(503, json={"error": "loading"}), False),
        (_raise(httpx.ConnectError("refused")), False),
        (_raise(httpx.ReadTimeout("slow")), False),
    ],
    ids=["200", "503", "refused", "timeout"],
)
async def test_health(handler: Handler, healthy: bool) -> None:
    async with generator(handler) as gen:
        assert await gen.health() is healthy


async def test_aclose_is_idempotent_and_final() -> None:
    gen = generator(lambda r: httpx.Response(200, json=CHAT_OK))
    await gen.aclose()
    await gen.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await gen.generate(MESSAGES, GenerationParams())


async def test_from_settings_takes_timeouts_from_tgi_settings() -> None:
    tgi = TGISettings(
        backends=[backend(name="large-0", url="http://l/")], large_tier="small", request_timeout_s=9
    )
    async with TGIGenerator.from_settings(tgi.backends[0], tgi) as gen:
        assert (gen.name, gen.url, gen._request_timeout_s) == ("large-0", "http://l", 9)
        assert gen._http.timeout.connect == tgi.connect_timeout_s


# ----------------------------------------------------------------------------- TGIQueueProbe
class ScriptedMetrics:
    """A /metrics endpoint per host whose next answers are set by the test."""

    def __init__(self) -> None:
        self.pages: dict[str, Callable[[], httpx.Response]] = {}
        self.requests: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.url.host}{request.url.path}")
        return self.pages[request.url.host]()

    def serve(self, host: str, waiting: int, running: int) -> None:
        page = f"tgi_queue_size {waiting}\ntgi_batch_current_size {running}\n"
        self.pages[host] = lambda: httpx.Response(200, text=page)

    def fail(self, host: str, exc: Exception | None = None, status: int = 500) -> None:
        if exc is not None:
            self.pages[host] = _raise_no_arg(exc)
        else:
            self.pages[host] = lambda: httpx.Response(status, text="error")


def _raise_no_arg(exc: Exception) -> Callable[[], httpx.Response]:
    def page() -> httpx.Response:
        raise exc

    return page


BACKENDS = [backend("a", "http://a"), backend("b", "http://b")]


def probe(metrics: ScriptedMetrics, clock: FakeClock, **kw: Any) -> TGIQueueProbe:
    return TGIQueueProbe(BACKENDS, clock=clock, transport=httpx.MockTransport(metrics), **kw)


async def test_probe_refresh_stamps_every_backend() -> None:
    metrics, clock = ScriptedMetrics(), FakeClock()
    metrics.serve("a", 3, 1)
    metrics.serve("b", 0, 2)
    async with contextlib.aclosing(probe(metrics, clock)) as p:
        assert isinstance(p, QueueDepthProbe)
        snap = await p.refresh()
    assert sorted(metrics.requests) == ["a/metrics", "b/metrics"]
    assert (snap["a"].waiting, snap["a"].running, snap["a"].total, snap["a"].healthy) == (3, 1, 4, True)
    assert (snap["b"].waiting, snap["b"].running, snap["b"].at) == (0, 2, 100.0)


@pytest.mark.parametrize(
    "failure",
    [
        lambda m: m.fail("a", httpx.ConnectError("refused")),
        lambda m: m.fail("a", httpx.ReadTimeout("slow")),
        lambda m: m.fail("a", status=503),
        lambda m: m.pages.__setitem__("a", lambda: httpx.Response(200, text="no gauges here 1\n")),
    ],
    ids=["refused", "timeout", "503", "no-gauges"],
)
async def test_probe_failed_scrape_keeps_last_good_numbers(
    failure: Callable[[ScriptedMetrics], None],
) -> None:
    metrics, clock = ScriptedMetrics(), FakeClock()
    metrics.serve("a", 4, 1)
    metrics.serve("b", 1, 1)
    async with contextlib.aclosing(probe(metrics, clock)) as p:
        await p.refresh()
        failure(metrics)
        clock.now = 101.0
        snap = await p.refresh()
        assert (snap["a"].waiting, snap["a"].running, snap["a"].healthy, snap["a"].at) == (4, 1, False, 101.0)
        assert snap["b"].healthy  # one backend's failure does not touch the others

        metrics.serve("a", 0, 0)  # it recovers
        clock.now = 102.0
        snap = await p.refresh()
        assert (snap["a"].waiting, snap["a"].healthy, snap["a"].at) == (0, True, 102.0)


async def test_probe_backend_failing_from_the_start_reads_zero_and_unhealthy() -> None:
    metrics, clock = ScriptedMetrics(), FakeClock()
    metrics.fail("a", httpx.ConnectError("refused"))
    metrics.serve("b", 1, 0)
    async with contextlib.aclosing(probe(metrics, clock)) as p:
        snap = await p.refresh()
    assert (snap["a"].waiting, snap["a"].running, snap["a"].healthy) == (0, 0, False)


async def test_probe_snapshot_is_a_read_only_copy() -> None:
    metrics, clock = ScriptedMetrics(), FakeClock()
    metrics.serve("a", 1, 0)
    metrics.serve("b", 1, 0)
    async with contextlib.aclosing(probe(metrics, clock)) as p:
        assert p.snapshot() == {}  # never scraped: absent
        before = await p.refresh()
        metrics.serve("a", 9, 0)
        await p.refresh()
        assert before["a"].waiting == 1
        assert p.snapshot()["a"].waiting == 9
        with pytest.raises(TypeError):
            before["a"] = before["b"]  # type: ignore[index]


async def test_probe_timer_scrapes_until_closed() -> None:
    metrics = ScriptedMetrics()
    metrics.serve("a", 2, 1)
    metrics.serve("b", 0, 0)
    p = TGIQueueProbe(BACKENDS, interval_s=0.01, transport=httpx.MockTransport(metrics))
    async with p:  # __aenter__ starts the timer
        await p.start()  # idempotent
        for _ in range(200):
            if len(metrics.requests) >= 6:
                break
            await asyncio.sleep(0.01)
        assert len(metrics.requests) >= 6, "the timer should scrape every 10 ms"
        assert p.snapshot()["a"].waiting == 2
    await p.aclose()  # idempotent
    count = len(metrics.requests)
    await asyncio.sleep(0.05)
    assert len(metrics.requests) == count
    with pytest.raises(RuntimeError, match="closed"):
        await p.start()


async def test_probe_from_settings_keeps_scrapes_inside_the_staleness_window() -> None:
    tgi = TGISettings(probe_interval_s=0.1, stale_after_s=1.0, connect_timeout_s=2.0)
    p = TGIQueueProbe.from_settings(tgi)
    assert p._interval_s == 0.1
    assert p._http.timeout.read == 0.5
    assert [b.name for b in p._backends] == [b.name for b in tgi.backends]
    await p.aclose()


def test_probe_needs_a_backend() -> None:
    with pytest.raises(ValueError, match="at least one backend"):
        TGIQueueProbe([])


async def test_probe_a_slow_older_scrape_never_overwrites_a_newer_one() -> None:
    release, first_in_flight = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if not first_in_flight.is_set():  # the first scrape hangs, then reports an old, busy queue
            first_in_flight.set()
            await release.wait()
            return httpx.Response(200, text="tgi_queue_size 5\ntgi_batch_current_size 1\n")
        return httpx.Response(200, text="tgi_queue_size 0\ntgi_batch_current_size 0\n")

    clock = FakeClock()
    p = TGIQueueProbe([backend("a", "http://a")], clock=clock, transport=httpx.MockTransport(handler))
    async with contextlib.aclosing(p):
        old = asyncio.create_task(p.refresh())
        await first_in_flight.wait()
        assert (await p.refresh())["a"].waiting == 0
        release.set()
        assert (await old)["a"].waiting == 0
