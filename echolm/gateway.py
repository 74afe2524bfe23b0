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

The tenant is the key's, never the body's: a client cannot name another tenant, and reply topics
are the gateway's own (a client cannot choose one).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
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
from infra.errors import ClientTimeout
from infra.settings import Settings

from .client import Reply
from .gateway_protocol import (
    GatewayError,
    chat_request_body,
    completion,
    completion_chunks,
    model_list,
    reply_error,
    sse_event,
)

__all__ = ["GatewayMetrics", "Relay", "build_gateway"]

log = logging.getLogger(__name__)


class Relay(Protocol):
    """What the gateway needs of ``EchoClient``: its public ``ask``."""

    async def ask(self, prompt: str, *, tenant: str = ..., timeout: float = ..., **kw: Any) -> Reply: ...


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


async def _relay(state: _State, body: dict[str, Any], wait_s: float) -> Reply:
    if state.relay is None:
        raise GatewayError(503, "the gateway is not connected to Kafka yet", type="service_unavailable")
    messages = body["messages"]
    try:
        # ``raw`` carries the whole v2 record; the prompt argument only fills the client's bookkeeping.
        return await state.relay.ask(
            messages[-1]["content"],
            tenant=body["tenant"],
            timeout=wait_s,
            request_id=body["request_id"],
            raw=orjson.dumps(body),
        )
    except ClientTimeout as exc:
        raise GatewayError(
            504,
            f"no reply within {wait_s:g}s (gateway.timeout_s); the pipeline may be overloaded",
            type="timeout",
        ) from exc
    except KafkaError as exc:
        raise GatewayError(
            503,
            f"the Kafka broker is unavailable ({type(exc).__name__}); retry later",
            type="service_unavailable",
            code="broker_unavailable",
        ) from exc


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
        reply = await _relay(state, body, wait_s)
    finally:
        state.inflight -= 1
        state.metrics.inflight.dec()
    _check_reply(reply, tenant)
    headers = {"x-request-id": request_id}
    if body.get("stream"):
        # TODO(wave 2): relay serve's token chunks from Kafka as they come; wave 1 sends the whole
        # reply as one content chunk after the generation finished, then [DONE].
        async def events() -> AsyncIterator[bytes]:
            for chunk in completion_chunks(reply, model=model):
                yield sse_event(chunk)
            yield sse_event("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
    return JSONResponse(completion(reply, model=model), headers=headers)


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
