"""TGI-protocol adapters for the echolm workers.

* ``TGIGenerator`` implements ``infra.protocols.Generator`` for one backend through
  ``huggingface_hub.AsyncInferenceClient.chat_completion`` (TGI's Messages API: the server applies
  the model's chat template). ``info()`` and ``health()`` use the same connection pool.
  ``generate_stream`` yields the same generation as ``StreamChunk`` deltas (SSE, for streaming replies).
* ``TGIQueueProbe`` implements ``infra.protocols.QueueDepthProbe``: it scrapes every backend's
  ``/metrics`` on a timer and keeps the latest ``QueueDepth`` per backend.

Failures become ``infra.errors.BackendError`` subclasses (see ``backend_error``), so a router or a
circuit breaker decides by type:

=====================================================  ==================================
what happened                                          raised
=====================================================  ==================================
HTTP 429                                               ``BackendOverloaded``   (retriable)
HTTP 5xx or 424, connection refused/reset, bad body    ``BackendUnavailable``  (retriable)
HTTP 408/504, connect/read timeout, overall deadline   ``BackendTimeout``      (retriable)
any other HTTP 4xx (422: prompt too long, bad params)  ``BackendRejected``     (not retriable)
=====================================================  ==================================
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, cast

import httpx
from huggingface_hub import AsyncInferenceClient, ChatCompletionInputStreamOptions
from huggingface_hub.errors import HfHubHTTPError
from prometheus_client.parser import text_string_to_metric_families

from infra.errors import (
    BackendError,
    BackendOverloaded,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)
from infra.protocols import BackendInfo, ChatMessage, Generation, GenerationParams, QueueDepth, StreamChunk
from infra.settings import BackendSettings, TGISettings

__all__ = [
    "QUEUE_GAUGES",
    "StreamChunk",
    "TGIGenerator",
    "TGIQueueProbe",
    "backend_error",
    "parse_queue_gauges",
]

logger = logging.getLogger(__name__)

# (waiting, running) gauge names, in order of preference: TGI, vLLM, SGLang.
QUEUE_GAUGES: tuple[tuple[str, str], ...] = (
    ("tgi_queue_size", "tgi_batch_current_size"),
    ("vllm:num_requests_waiting", "vllm:num_requests_running"),
    ("sglang:num_queue_reqs", "sglang:num_running_reqs"),
)


# ------------------------------------------------------------------------------- error mapping
def _server_message(response: httpx.Response) -> str:
    """TGI's ``{"error": ...}`` (or the start of the body) for an error response."""
    try:
        text = response.text
    except httpx.ResponseNotRead:
        return ""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:200]
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:200]
    return text.strip()[:200]


def _status_error(status: int, server: str, *, where: str, operation: str) -> BackendError:
    said = f"{operation} answered HTTP {status}" + (f" ({server})" if server else "")
    if status == 429:
        return BackendOverloaded(
            f"{where} is overloaded: {said}. Its waiting + running requests reached its "
            "max_concurrent_requests; route to another replica or lower tgi.backends[].max_concurrency.",
            status=status,
        )
    if status in (408, 504):
        return BackendTimeout(
            f"{where} timed out: {said}. The backend or a proxy in front of it gave up; "
            "check its queue (/metrics) and tgi.request_timeout_s.",
            status=status,
        )
    if status >= 500 or status == 424:  # TGI: 424 = the generation itself failed (e.g. out of memory)
        return BackendUnavailable(
            f"{where} failed: {said}. The server is erroring or still loading its model; "
            "check its /health and its logs.",
            status=status,
        )
    return BackendRejected(
        f"{where} rejected the request: {said}. The request does not fit this backend (prompt longer "
        "than its max_input_tokens, or parameters it refuses); do not retry it unchanged.",
        status=status,
    )


def backend_error(
    exc: BaseException, *, backend: str, url: str, operation: str, timeout_s: float | None = None
) -> BackendError | None:
    """The ``BackendError`` for a failure of ``operation`` on a backend, or None if ``exc`` is not one.

    Handles what ``AsyncInferenceClient`` and httpx raise: ``HfHubHTTPError`` (an ``httpx.HTTPError``
    carrying the response), ``httpx.HTTPStatusError``, ``InferenceTimeoutError``/``TimeoutError``,
    ``httpx.TimeoutException``, other ``httpx.TransportError``s, and an unparseable JSON body.
    """
    where = f"backend {backend!r} at {url}"
    error: BackendError | None
    if isinstance(exc, HfHubHTTPError | httpx.HTTPStatusError) and exc.response is not None:
        error = _status_error(
            exc.response.status_code, _server_message(exc.response), where=where, operation=operation
        )
    elif isinstance(exc, httpx.TimeoutException | TimeoutError):
        limit = f" within {timeout_s:g} s" if timeout_s is not None else ""
        error = BackendTimeout(
            f"{where} gave no answer to {operation}{limit} ({type(exc).__name__}). It is saturated, "
            "stuck or unreachable; check its /metrics queue, the network, or raise tgi.request_timeout_s."
        )
    elif isinstance(exc, httpx.UnsupportedProtocol):
        error = BackendUnavailable(
            f"{where}: {operation} could not be sent ({exc}); the URL needs an http:// or https:// scheme."
        )
    elif isinstance(exc, httpx.TransportError):
        error = BackendUnavailable(
            f"{where}: {operation} failed to connect or was cut off ({type(exc).__name__}: {exc}). "
            "Is the server running, and is the URL right?"
        )
    elif isinstance(exc, json.JSONDecodeError | KeyError | IndexError | TypeError | AttributeError):
        error = BackendUnavailable(
            f"{where}: {operation} returned a body that is not a TGI response ({type(exc).__name__}: "
            f"{exc}). Is this URL a TGI, vLLM or SGLang server?"
        )
    else:
        return None
    error.backend = backend
    return error


# --------------------------------------------------------------------------------- generation
class _SharedSessionInferenceClient(AsyncInferenceClient):
    """``AsyncInferenceClient`` on our own ``httpx.AsyncClient``.

    It overrides a private hook (``_get_async_client``, huggingface_hub 1.x) so that one connection
    pool per backend serves chat, ``/info`` and ``/health``, its limits match
    ``BackendSettings.max_concurrency``, tests can swap its transport, and we own its closing.
    ``tests/unit/test_tgi_adapter.py`` fails if an upgrade stops honouring the override.
    """

    def __init__(self, http: httpx.AsyncClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shared_http = http

    async def _get_async_client(self) -> httpx.AsyncClient:
        return self._shared_http


# Below the idle timeout of common servers (uvicorn 5 s, as httpx's own default): reusing a connection
# the server is closing at that instant fails the request with "Server disconnected".
_KEEPALIVE_EXPIRY_S = 3.0


class TGIGenerator:
    """``Generator`` for one TGI-protocol backend. An async context manager; ``aclose`` is idempotent."""

    def __init__(
        self,
        backend: BackendSettings,
        *,
        request_timeout_s: float = 60.0,
        connect_timeout_s: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = backend.name
        self.url = backend.url.rstrip("/")
        self._request_timeout_s = request_timeout_s
        self._clock = clock
        timeout = httpx.Timeout(request_timeout_s, connect=connect_timeout_s)
        self._http = httpx.AsyncClient(
            base_url=self.url,
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=backend.max_concurrency,
                max_keepalive_connections=backend.max_concurrency,
                keepalive_expiry=_KEEPALIVE_EXPIRY_S,
            ),
            transport=transport,
        )
        token = backend.token.get_secret_value() if backend.token is not None else None
        # Without a configured token, send none: huggingface_hub would otherwise attach the locally
        # saved Hugging Face token (HF_TOKEN or ~/.cache/huggingface/token) to a non-HF server. A
        # None header value is dropped by the client when it builds the request.
        headers = {} if token is not None else {"authorization": None}
        self._client = _SharedSessionInferenceClient(
            self._http,
            base_url=self.url,
            token=token,
            headers=cast("dict[str, str]", headers),
            # Passed to httpx per request unchanged; an httpx.Timeout keeps the short connect timeout.
            timeout=cast("float", timeout),
        )
        self._info: BackendInfo | None = None
        self._closed = False

    @classmethod
    def from_settings(
        cls, backend: BackendSettings, tgi: TGISettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> TGIGenerator:
        return cls(
            backend,
            request_timeout_s=tgi.request_timeout_s,
            connect_timeout_s=tgi.connect_timeout_s,
            transport=transport,
        )

    def _error(self, exc: BaseException, operation: str) -> BackendError | None:
        return backend_error(
            exc, backend=self.name, url=self.url, operation=operation, timeout_s=self._request_timeout_s
        )

    async def generate(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Generation:
        """One chat completion. ``params.temperature`` None is greedy (TGI's chat route: temperature 0)."""
        if self._closed:
            raise RuntimeError(f"TGIGenerator {self.name!r} is closed")
        started = self._clock()
        try:
            async with asyncio.timeout(self._request_timeout_s):
                output = await self._client.chat_completion(
                    messages=[{"role": m.role, "content": m.content} for m in messages],
                    max_tokens=params.max_new_tokens,
                    temperature=0.0 if params.temperature is None else params.temperature,
                    seed=params.seed,
                    top_p=params.top_p,
                    stop=list(params.stop) or None,
                )
            choice = output.choices[0]
            text = choice.message.content or ""
            usage = output.usage
        except (httpx.HTTPError, TimeoutError, json.JSONDecodeError, IndexError, AttributeError) as exc:
            error = self._error(exc, "POST /v1/chat/completions")
            if error is None:
                raise
            raise error from exc
        return Generation(
            text=text,
            backend=self.name,
            generated_tokens=usage.completion_tokens if usage is not None else 0,
            prompt_tokens=usage.prompt_tokens if usage is not None else 0,
            latency_s=self._clock() - started,
            finish_reason=choice.finish_reason or "",
        )

    async def generate_stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[StreamChunk]:
        """The chat completion as generated (SSE), in order. Each read waits at most ``request_timeout_s``;
        the caller bounds the whole stream. Failures before or during it raise ``BackendError``."""
        if self._closed:
            raise RuntimeError(f"TGIGenerator {self.name!r} is closed")
        finish, usage = "", None
        try:
            stream = await self._client.chat_completion(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                max_tokens=params.max_new_tokens,
                temperature=0.0 if params.temperature is None else params.temperature,
                seed=params.seed,
                top_p=params.top_p,
                stop=list(params.stop) or None,
                stream=True,
                stream_options=ChatCompletionInputStreamOptions(include_usage=True),
            )
            async for event in stream:
                usage = event.usage or usage
                if not event.choices:  # the usage-only event at the end
                    continue
                finish = event.choices[0].finish_reason or finish
                text = event.choices[0].delta.content or ""
                if text:
                    yield StreamChunk(text=text)
        except (httpx.HTTPError, TimeoutError, json.JSONDecodeError, ValueError, AttributeError) as exc:
            error = self._error(exc, "POST /v1/chat/completions (stream)")
            if error is None:
                raise
            raise error from exc
        tokens = (usage.completion_tokens, usage.prompt_tokens) if usage is not None else (0, 0)
        yield StreamChunk(
            text="", finish_reason=finish or "stop", generated_tokens=tokens[0], prompt_tokens=tokens[1]
        )

    async def info(self) -> BackendInfo:
        """The backend's ``/info``, fetched once and cached."""
        if self._info is None:
            try:
                response = await self._http.get("/info")
                response.raise_for_status()
                body = response.json()
                max_input = body.get("max_input_tokens", body.get("max_input_length"))  # TGI < 2.1 name
                self._info = BackendInfo(
                    model_id=str(body["model_id"]),
                    max_input_tokens=int(max_input),
                    max_total_tokens=int(body["max_total_tokens"]),
                    max_concurrent_requests=int(body.get("max_concurrent_requests", 128)),
                )
            except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                error = self._error(exc, "GET /info")
                if error is None:
                    raise
                raise error from exc
        return self._info

    async def health(self) -> bool:
        """True when ``/health`` answers 200; any failure (refused, timeout, 503 loading) is False."""
        try:
            response = await self._http.get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.close()  # type: ignore[no-untyped-call]  # untyped upstream
        await self._http.aclose()

    async def __aenter__(self) -> TGIGenerator:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


# -------------------------------------------------------------------------------- queue probe
def parse_queue_gauges(text: str) -> tuple[float, float]:
    """(waiting, running) from a Prometheus page: TGI's gauges, else vLLM's, else SGLang's.

    Samples of one gauge are summed over labels (vLLM labels by model). Raises ``ValueError`` when
    the page has none of the pairs.
    """
    wanted = {name for pair in QUEUE_GAUGES for name in pair}
    # Parse only the few lines we need: a TGI page has hundreds of histogram lines.
    lines = [
        line
        for line in text.splitlines()
        if line[:1] != "#" and line.split("{", 1)[0].split(" ", 1)[0] in wanted
    ]
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    for waiting, running in QUEUE_GAUGES:
        if waiting in totals and running in totals:
            return totals[waiting], totals[running]
    names = ", ".join(f"{w}/{r}" for w, r in QUEUE_GAUGES)
    raise ValueError(
        f"no queue gauges in /metrics (looked for {names}): is this a TGI, vLLM or SGLang server?"
    )


class TGIQueueProbe:
    """Scrapes every backend's ``/metrics`` every ``interval_s`` with one shared ``httpx.AsyncClient``.

    ``snapshot()`` returns the latest ``QueueDepth`` per backend. ``at`` is the monotonic time of the
    latest scrape attempt; a failed scrape keeps the last good numbers (0 if none) with
    ``healthy=False``. Consumers judge a sample by ``at`` and ``healthy`` (``TGISettings.stale_after_s``),
    never by its numbers alone. A backend never scraped is absent.
    """

    def __init__(
        self,
        backends: Sequence[BackendSettings],
        *,
        interval_s: float = 0.25,
        timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not backends:
            raise ValueError("TGIQueueProbe needs at least one backend")
        self._backends = tuple(backends)
        self._interval_s = interval_s
        self._clock = clock
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), transport=transport)
        self._samples: dict[str, QueueDepth] = {}
        # Scrapes overlap (timer + refresh()); a slow older scrape must not overwrite a newer one.
        self._scrapes = itertools.count()
        self._stored: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_settings(
        cls,
        tgi: TGISettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> TGIQueueProbe:
        # A scrape must finish well inside the staleness window, or every sample arrives stale.
        timeout_s = min(tgi.connect_timeout_s, tgi.stale_after_s / 2)
        return cls(
            tgi.backends,
            interval_s=tgi.probe_interval_s,
            timeout_s=timeout_s,
            clock=clock,
            transport=transport,
        )

    def snapshot(self) -> Mapping[str, QueueDepth]:
        return MappingProxyType(dict(self._samples))

    async def refresh(self) -> Mapping[str, QueueDepth]:
        """Scrape every backend once, concurrently, and return the new snapshot."""
        await asyncio.gather(*(self._scrape(backend) for backend in self._backends))
        return self.snapshot()

    async def start(self) -> None:
        """Start the timer (idempotent). The first scrape happens at once."""
        if self._closed:
            raise RuntimeError("TGIQueueProbe is closed; build a new one")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tgi-queue-probe")
            self._task.add_done_callback(_log_crash)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._http.aclose()

    async def __aenter__(self) -> TGIQueueProbe:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _run(self) -> None:
        while True:
            started = self._clock()
            await self.refresh()
            await asyncio.sleep(max(self._interval_s - (self._clock() - started), 0.0))

    async def _scrape(self, backend: BackendSettings) -> None:
        url = f"{backend.url.rstrip('/')}/metrics"
        scrape = next(self._scrapes)
        try:
            response = await self._http.get(url)
            response.raise_for_status()
            waiting, running = parse_queue_gauges(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            previous = self._samples.get(backend.name)
            if previous is None or previous.healthy:
                logger.warning("queue probe: scraping %s (%s) failed: %r", backend.name, url, exc)
            sample = QueueDepth(
                backend=backend.name,
                waiting=previous.waiting if previous is not None else 0.0,
                running=previous.running if previous is not None else 0.0,
                at=self._clock(),
                healthy=False,
            )
        else:
            sample = QueueDepth(backend=backend.name, waiting=waiting, running=running, at=self._clock())
        if scrape < self._stored.get(backend.name, -1):
            return  # a scrape started later has already answered
        previous = self._samples.get(backend.name)
        if sample.healthy and previous is not None and not previous.healthy:
            logger.info("queue probe: %s (%s) answers again", backend.name, url)
        self._stored[backend.name] = scrape
        self._samples[backend.name] = sample


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("queue probe stopped: samples will go stale", exc_info=task.exception())
