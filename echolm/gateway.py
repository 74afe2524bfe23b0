"""``echolm gateway``: an OpenAI-compatible HTTP front door into the Kafka pipeline.

    POST /v1/chat/completions   a chat request -> the requests topic -> the reply (JSON, or SSE)
    GET  /v1/models             echolm-auto and the configured tiers
    GET  /health                200 while the Kafka relay is up, else 503
    GET  /metrics               Prometheus text

Per request, in order: 1. authenticate (API key -> tenant; ``gateway.trusted_tenant`` skips it),
2. the tenant's rate limit (429 ``rate_limit_exceeded``), 3. backpressure: at most
``gateway.max_inflight`` requests relayed at once (429 ``server_busy``), 4. read and validate the body
with the workers' own validator (400), 5. produce a v2 request with a fresh request id and wait for
its reply up to ``gateway.timeout_s`` (the request's deadline too; 504 past it), 6. answer in
OpenAI's shape, with ``x-request-id``. Errors use OpenAI's error body (``gateway_protocol``).

``stream: true``: the request streams through Kafka (``EchoClient.stream``), and each piece is relayed
as an SSE chunk as it arrives. The HTTP status waits for the first piece, so an error reply that comes
before any text is still a proper status; a failure after text was sent (a retry that diverged, the
deadline) ends the stream with an OpenAI error event (``data: {"error": ...}``), which the SDK raises.

The tenant is the key's, never the body's: a client cannot name another tenant, and reply topics
are the gateway's own (a client cannot choose one).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from infra.auth import KeyRing, RateLimiter
from infra.errors import ClientTimeout, StreamDiverged
from infra.settings import Settings

from .client import Delta, Reply
from .gateway_protocol import (
    ChunkMaker,
    GatewayError,
    chat_request_body,
    completion,
    model_list,
    reply_error,
    sse_event,
)

__all__ = ["GatewayMetrics", "Relay", "build_gateway"]

log = logging.getLogger(__name__)


class Relay(Protocol):
    """What the gateway needs of ``EchoClient``: its public ``ask`` and ``stream``."""

    async def ask(self, prompt: str, *, tenant: str = ..., timeout: float = ..., **kw: Any) -> Reply: ...

    def stream(
        self,
        prompt: str | None = ...,
        *,
        tenant: str = ...,
        timeout: float = ...,
        request_id: str | None = ...,
        raw: bytes | None = ...,
    ) -> AsyncGenerator[Delta, None]: ...


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "echolm_gateway_requests", "Chat requests by HTTP status", ["status"], registry=self.registry
        )
        self.seconds = Histogram(
            "echolm_gateway_request_seconds",
            "Time from request to response (non-errors)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.inflight = Gauge("echolm_gateway_inflight", "Requests being relayed", registry=self.registry)


@dataclass
class _State:
    settings: Settings
    relay: Relay | None
    keys: KeyRing
    limiter: RateLimiter
    metrics: GatewayMetrics
    clock: Callable[[], float]
    tiers: Sequence[str]
    inflight: int = 0


def _error_response(err: GatewayError, request_id: str = "") -> JSONResponse:
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _authenticate(state: _State, request: Request) -> tuple[str, float | None, int | None]:
    """The tenant of the request's API key (and its rate overrides), or a 401."""
    gw = state.settings.gateway
    if gw.trusted_tenant is not None:
        return gw.trusted_tenant, None, None
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise GatewayError(
            401,
            "no API key: send 'Authorization: Bearer <key>' (the OpenAI SDK's api_key)",
            type="invalid_request_error",
            code="missing_api_key",
        )
    entry = state.keys.entry_for(key.strip(), now=state.clock())
    if entry is None:
        raise GatewayError(
            401, "incorrect API key provided", type="invalid_request_error", code="invalid_api_key"
        )
    return entry.tenant, entry.rate_per_s, entry.burst


def _rate_limit(state: _State, tenant: str, rate: float | None, burst: int | None) -> None:
    wait = state.limiter.acquire(tenant, state.clock(), rate_per_s=rate, burst=burst)
    if wait > 0:
        raise GatewayError(
            429,
            f"rate limit reached for tenant {tenant!r}; retry after {wait:.2f}s",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"retry-after": str(max(1, round(wait + 0.5)))},
        )


async def _read_json(request: Request, max_bytes: int) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise GatewayError(
                413, f"request body over gateway.max_body_bytes={max_bytes}", code="body_too_large"
            )
    try:
        return orjson.loads(bytes(body))
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from exc


def _relay_error(exc: BaseException, wait_s: float) -> GatewayError:
    if isinstance(exc, ClientTimeout):
        return GatewayError(
            504,
            f"no reply within {wait_s:g}s (gateway.timeout_s); the pipeline may be overloaded",
            type="timeout",
        )
    if isinstance(exc, StreamDiverged):
        return GatewayError(502, str(exc), type="upstream_error", code=exc.code)
    return GatewayError(
        503,
        f"the Kafka broker is unavailable ({type(exc).__name__}); retry later",
        type="service_unavailable",
        code="broker_unavailable",
    )


def _connected(state: _State) -> Relay:
    if state.relay is None:
        raise GatewayError(503, "the gateway is not connected to Kafka yet", type="service_unavailable")
    return state.relay


async def _relay(state: _State, body: dict[str, Any], wait_s: float) -> Reply:
    relay = _connected(state)
    messages = body["messages"]
    try:
        # ``raw`` carries the whole v2 record; the prompt argument only fills the client's bookkeeping.
        return await relay.ask(
            messages[-1]["content"],
            tenant=body["tenant"],
            timeout=wait_s,
            request_id=body["request_id"],
            raw=orjson.dumps(body),
        )
    except (ClientTimeout, KafkaError) as exc:
        raise _relay_error(exc, wait_s) from exc


async def _events(
    first: Delta,
    deltas: AsyncGenerator[Delta, None],
    make: ChunkMaker,
    tenant: str,
    wait_s: float,
    *,
    include_usage: bool,
    done: Callable[[], None],
) -> AsyncIterator[bytes]:
    """The SSE body: the role, each piece as it arrives, the finish (and usage), then ``[DONE]``; a
    failure after the status was sent is an OpenAI error event."""
    try:
        yield sse_event(make.role())
        delta: Delta | None = first
        while delta is not None:
            if delta.text:
                yield sse_event(make.content(delta.text))
            if delta.reply is not None:
                _check_reply(delta.reply, tenant)
                for chunk in make.finish(delta.reply, include_usage=include_usage):
                    yield sse_event(chunk)
                break
            delta = await anext(deltas, None)
        yield sse_event("[DONE]")
    except GatewayError as err:
        yield sse_event(err.body())
    except (ClientTimeout, KafkaError, StreamDiverged) as exc:
        yield sse_event(_relay_error(exc, wait_s).body())
    finally:
        await deltas.aclose()
        done()


async def _stream(
    state: _State,
    body: dict[str, Any],
    model: str,
    wait_s: float,
    *,
    include_usage: bool,
    done: Callable[[], None],
) -> StreamingResponse:
    """The SSE response of a streaming request; ``done`` is called once the stream has ended."""
    relay = _connected(state)
    tenant, request_id = body["tenant"], body["request_id"]
    deltas = relay.stream(None, tenant=tenant, timeout=wait_s, request_id=request_id, raw=orjson.dumps(body))
    try:
        first = await anext(deltas)
        if first.reply is not None:
            _check_reply(first.reply, tenant)
    except (ClientTimeout, KafkaError, StreamDiverged) as exc:
        await deltas.aclose()
        raise _relay_error(exc, wait_s) from exc
    except BaseException:
        await deltas.aclose()
        raise
    make = ChunkMaker(request_id=request_id, model=model)
    events = _events(first, deltas, make, tenant, wait_s, include_usage=include_usage, done=done)
    return StreamingResponse(events, media_type="text/event-stream", headers={"x-request-id": request_id})


def _check_capacity(state: _State) -> None:
    if state.inflight >= state.settings.gateway.max_inflight:
        raise GatewayError(
            429,
            f"the gateway has {state.inflight} requests in flight (gateway.max_inflight); retry shortly",
            type="rate_limit_error",
            code="server_busy",
            headers={"retry-after": "1"},
        )


def _check_reply(reply: Reply, tenant: str) -> None:
    if not reply.ok:
        raise reply_error(reply)
    if reply.tenant and reply.tenant != tenant:  # never hand one tenant's reply to another
        raise GatewayError(502, "the reply named another tenant; not delivered", type="upstream_error")


async def _chat(state: _State, request: Request, request_id: str) -> Response:
    """Steps 1-6 of the module docstring; every failure raises ``GatewayError``."""
    tenant, rate, burst = _authenticate(state, request)
    _rate_limit(state, tenant, rate, burst)
    _check_capacity(state)
    state.inflight += 1
    state.metrics.inflight.inc()
    ended = False

    def done() -> None:  # once per request: here, or when a stream it handed over has ended
        nonlocal ended
        if not ended:
            ended = True
            state.inflight -= 1
            state.metrics.inflight.dec()

    handed_over = False
    try:
        payload = await _read_json(request, state.settings.gateway.max_body_bytes)
        wait_s = state.settings.gateway.timeout_s
        body, model = chat_request_body(
            payload,
            request_id=request_id,
            tenant=tenant,
            settings=state.settings,
            deadline_s=wait_s,
            models=state.tiers,
        )
        if body.get("stream"):
            options = payload.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            response = await _stream(state, body, model, wait_s, include_usage=include_usage, done=done)
            handed_over = True
            return response
        reply = await _relay(state, body, wait_s)
    finally:
        if not handed_over:
            done()
    _check_reply(reply, tenant)
    return JSONResponse(completion(reply, model=model), headers={"x-request-id": request_id})


async def chat_completions(request: Request) -> Response:
    state: _State = request.app.state.gateway
    request_id = uuid.uuid4().hex
    started = time.perf_counter()
    try:
        response = await _chat(state, request, request_id)
    except GatewayError as err:
        state.metrics.requests.labels(str(err.status)).inc()
        return _error_response(err, request_id)
    state.metrics.requests.labels(str(response.status_code)).inc()
    state.metrics.seconds.observe(time.perf_counter() - started)
    return response


async def models(request: Request) -> Response:
    state: _State = request.app.state.gateway
    try:
        _authenticate(state, request)
    except GatewayError as err:
        return _error_response(err)
    return JSONResponse(model_list(state.tiers))


async def health(request: Request) -> Response:
    state: _State = request.app.state.gateway
    up = state.relay is not None
    body = {"status": "ok" if up else "unavailable", "inflight": state.inflight}
    return JSONResponse(body, status_code=200 if up else 503)


async def metrics(request: Request) -> Response:
    state: _State = request.app.state.gateway
    return Response(generate_latest(state.metrics.registry), media_type="text/plain; version=0.0.4")


def build_gateway(
    settings: Settings,
    relay: Relay | None,
    *,
    keys: KeyRing | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Starlette:
    """The ASGI app. ``relay`` is a started ``EchoClient`` (or anything with its ``ask``)."""
    gw = settings.gateway
    keys = KeyRing.from_settings(gw) if keys is None else keys
    if gw.trusted_tenant is None and not len(keys):
        raise ValueError(
            "the gateway has no API keys: add gateway.api_keys or gateway.keys_file "
            "(`echolm gateway new-key --tenant NAME` prints one), or set gateway.trusted_tenant "
            "for a trusted single-tenant deployment"
        )
    tiers = sorted({b.tier for b in settings.tgi.backends})
    state = _State(
        settings=settings,
        relay=relay,
        keys=keys,
        limiter=RateLimiter(rate_per_s=gw.rate_per_s, burst=gw.burst),
        metrics=GatewayMetrics(),
        clock=clock,
        tiers=tiers,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # in-flight requests get a moment to finish before the relay is closed by its owner
        for _ in range(50):
            if not state.inflight:
                break
            await asyncio.sleep(0.1)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = state
    return app
