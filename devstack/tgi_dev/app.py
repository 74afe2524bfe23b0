"""The dev server's Starlette app: TGI's routes over an ``Engine`` and a ``RequestQueue``.

Every generation route follows the same steps:

1. count the request (``tgi_request_count``) and refuse with 503 while the model is loading,
2. parse and validate the body (``wire.parse_*``; 400/422 on failure),
3. enqueue it (429 "Model is overloaded" past ``max_concurrent_requests``),
4. wait for a batch slot, then stream tokens from the engine; a client that disconnects while
   queued or generating is dropped from the queue and its generation stopped,
5. release the slot (always, in ``finally``) and answer with TGI's body and timing headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from devstack.tgi_dev import wire
from devstack.tgi_dev.engine import Engine, Token
from devstack.tgi_dev.metrics import DevMetrics
from devstack.tgi_dev.scheduler import QueueFull, RequestQueue, Ticket

__all__ = ["VERSION", "DevServer", "DevServerConfig", "build_app"]

logger = logging.getLogger(__name__)
VERSION = "0.1.0"
_FINGERPRINT = f"{VERSION}-echolm-tgi-dev"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DevServerConfig:
    max_concurrent_requests: int = 128
    max_batch_size: int = 1  # capped by the engine's own max_batch_size
    max_input_tokens: int | None = None  # None: max_total_tokens - 1
    max_total_tokens: int | None = None  # None: the engine's context window
    max_stop_sequences: int = 4
    default_max_new_tokens: int = 100
    # one INFO line per generation request it accepts, with the last user turn (tests count generations)
    log_requests: bool = False


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class DevServer:
    """State and handlers of one dev server; ``build_app`` wires it into Starlette."""

    def __init__(self, config: DevServerConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self.queue = RequestQueue(
            max_batch_size=config.max_batch_size,
            max_concurrent_requests=config.max_concurrent_requests,
            clock=clock,
        )
        self.metrics = DevMetrics(self.queue)
        self.engine: Engine | None = None
        self.limits = wire.Limits(max_input_tokens=0, max_total_tokens=0)
        self.load_error: Exception | None = None

    # --------------------------------------------------------------------------------- lifetime
    def attach(self, engine: Engine) -> None:
        total = min(self.config.max_total_tokens or engine.max_total_tokens, engine.max_total_tokens)
        max_input = self.config.max_input_tokens or total - 1
        if max_input >= total:
            raise ValueError(f"max_input_tokens ({max_input}) must be below max_total_tokens ({total})")
        if engine.max_batch_size < self.queue.max_batch_size:
            logger.warning(
                "engine %s decodes at most %d sequences at once; --max-batch-size %d lowered to it",
                engine.model_id,
                engine.max_batch_size,
                self.queue.max_batch_size,
            )
            self.queue.max_batch_size = engine.max_batch_size
        gauges = getattr(engine, "gauges", None)  # an engine that batches itself reports its own queue
        if gauges is not None:
            self.metrics.read_gauges_from(engine)
        self.limits = wire.Limits(
            max_input_tokens=max_input,
            max_total_tokens=total,
            max_stop_sequences=self.config.max_stop_sequences,
            default_max_new_tokens=self.config.default_max_new_tokens,
        )
        self.engine = engine

    async def load(self, factory: Callable[[], Engine], on_error: Callable[[Exception], None] | None) -> None:
        try:
            engine = await asyncio.to_thread(factory)
            self.attach(engine)
        except Exception as exc:
            logger.exception("the dev TGI server could not load its engine; /health stays 503")
            self.load_error = exc
            if on_error is not None:
                on_error(exc)
            return
        logger.info("engine %s ready (max_batch_size=%d)", engine.model_id, self.queue.max_batch_size)

    async def aclose(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await engine.aclose()

    # ------------------------------------------------------------------------------ plain routes
    async def health(self, request: Request) -> Response:
        if self.engine is not None:
            return Response(status_code=200)
        reason = f"Model failed to load: {self.load_error}" if self.load_error else "Model is loading"
        return JSONResponse({"error": reason, "error_type": "unhealthy"}, status_code=503)

    async def info(self, request: Request) -> Response:
        engine = self._engine_or_503()
        if isinstance(engine, Response):
            return engine
        return JSONResponse(
            {
                "model_id": engine.model_id,
                "model_sha": None,
                "model_dtype": "gguf",
                "model_device_type": "cpu",
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": self.queue.max_concurrent_requests,
                "max_best_of": 1,
                "max_stop_sequences": self.limits.max_stop_sequences,
                "max_input_tokens": self.limits.max_input_tokens,
                "max_input_length": self.limits.max_input_tokens,  # TGI < 2.1 name
                "max_total_tokens": self.limits.max_total_tokens,
                "max_batch_size": self.queue.max_batch_size,
                "max_batch_total_tokens": self.limits.max_total_tokens * self.queue.max_batch_size,
                "max_waiting_tokens": 0,
                "validation_workers": 1,
                "max_client_batch_size": 1,
                "router": "echolm-tgi-dev",
                "version": VERSION,
                "sha": None,
                "docker_label": None,
            }
        )

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------------- generation routes
    async def generate(self, request: Request) -> Response:
        return await self._guarded(request, self._generate)

    async def generate_stream(self, request: Request) -> Response:
        return await self._guarded(request, self._generate_stream)

    async def compat(self, request: Request) -> Response:
        async def dispatch(request: Request, body: Any, engine: Engine) -> Response:
            if isinstance(body, dict) and body.get("stream"):
                return await self._generate_stream(request, body, engine)
            answer, headers = await self._generate_body(request, body, engine)
            return JSONResponse([answer], headers=headers)  # TGI's compat route answers a list

        return await self._guarded(request, dispatch)

    async def chat(self, request: Request) -> Response:
        return await self._guarded(request, self._chat)

    # --------------------------------------------------------------------------------- internals
    def _engine_or_503(self) -> Engine | Response:
        if self.engine is None:
            return JSONResponse(
                {"error": "Model is not loaded yet", "error_type": "unhealthy"}, status_code=503
            )
        return self.engine

    async def _guarded(
        self, request: Request, handler: Callable[[Request, Any, Engine], Awaitable[Response]]
    ) -> Response:
        """Steps 1-2 and the mapping of ``RequestRejected`` to TGI's error bodies."""
        self.metrics.request_received()
        engine = self._engine_or_503()
        if isinstance(engine, Response):
            self.metrics.request_failed("unhealthy")
            return engine
        try:
            try:
                body = await request.json()
            except ValueError as exc:
                raise wire.RequestRejected(
                    400, f"Failed to parse the request body as JSON: {exc}", "validation"
                ) from exc
            return await handler(request, body, engine)
        except wire.RequestRejected as exc:
            self.metrics.request_failed(exc.error_type)
            return JSONResponse(exc.body(), status_code=exc.status)
        except _ClientGone:
            self.metrics.request_failed("client_closed")
            return Response(status_code=499)

    def _log_request(self, route: str, body: Any, job: wire.Job) -> None:
        """With ``log_requests``: ``generation request <route> <JSON of the last user turn>``."""
        if not self.config.log_requests:
            return
        text = job.inputs or job.prompt
        messages = body.get("messages") if isinstance(body, dict) else None
        if isinstance(messages, list):
            users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            text = str(users[-1]) if users else text
        logger.info("generation request %s %s", route, json.dumps(text))

    def _enqueue(self, job: wire.Job) -> Ticket:
        try:
            return self.queue.enqueue(
                prompt_tokens=job.prompt_tokens, max_new_tokens=job.params.max_new_tokens
            )
        except QueueFull as exc:
            raise wire.RequestRejected(429, "Model is overloaded", "overloaded") from exc

    async def _tokens(self, engine: Engine, job: wire.Job, ticket: Ticket) -> AsyncGenerator[Token, None]:
        """Steps 4-5: wait for a slot, stream the engine, always release the slot."""
        try:
            await self.queue.wait_turn(ticket)
            async with aclosing(engine.stream(job.prompt, job.params)) as tokens:
                async for token in tokens:
                    yield token
        finally:
            self.queue.release(ticket)

    async def _collect(self, request: Request, engine: Engine, job: wire.Job) -> tuple[list[Token], Ticket]:
        ticket = self._enqueue(job)

        async def run() -> list[Token]:
            async with aclosing(self._tokens(engine, job, ticket)) as stream:
                return [token async for token in stream]

        try:
            tokens = await _unless_disconnected(request.receive, run())
        except (_ClientGone, wire.RequestRejected):
            raise
        except Exception as exc:
            logger.exception("generation failed for a %d-token prompt", job.prompt_tokens)
            raise wire.RequestRejected(424, f"Request failed during generation: {exc}", "generation") from exc
        finally:
            self.queue.release(ticket)  # idempotent; covers a run() cancelled before it started
        return tokens, ticket

    def _succeeded(self, received: float, job: wire.Job, ticket: Ticket, generated: int) -> dict[str, str]:
        now = self._clock()
        queue_s = ticket.queue_time(now)
        inference_s = now - (ticket.started_at if ticket.started_at is not None else now)
        self.metrics.request_succeeded(
            duration_s=now - received,
            queue_s=queue_s,
            inference_s=inference_s,
            input_tokens=job.prompt_tokens,
            generated_tokens=generated,
        )
        engine = self.engine
        return {
            "x-compute-type": engine.compute_type if engine is not None else "cpu",
            "x-compute-time": f"{now - received:.6f}",
            "x-total-time": str(round((now - received) * 1000)),
            "x-validation-time": str(round(max(ticket.enqueued_at - received, 0.0) * 1000)),
            "x-queue-time": str(round(queue_s * 1000)),
            "x-inference-time": str(round(inference_s * 1000)),
            "x-time-per-token": str(round(inference_s * 1000 / max(generated, 1))),
            "x-prompt-tokens": str(job.prompt_tokens),
            "x-generated-tokens": str(generated),
        }

    async def _generate(self, request: Request, body: Any, engine: Engine) -> Response:
        answer, headers = await self._generate_body(request, body, engine)
        return JSONResponse(answer, headers=headers)

    async def _generate_body(
        self, request: Request, body: Any, engine: Engine
    ) -> tuple[dict[str, Any], dict[str, str]]:
        received = self._clock()
        job = wire.parse_generate(body, self.limits, engine.count_tokens)
        self._log_request("/generate", body, job)
        tokens, ticket = await self._collect(request, engine, job)
        finish = tokens[-1].finish_reason or "length"
        headers = self._succeeded(received, job, ticket, len(tokens))
        return wire.generate_response(job, tokens, finish), headers

    async def _chat(self, request: Request, body: Any, engine: Engine) -> Response:
        received = self._clock()
        job = wire.parse_chat(body, self.limits, engine.count_tokens, engine.render_chat)
        self._log_request("/v1/chat/completions", body, job)
        meta: dict[str, Any] = {
            "request_id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": engine.model_id,
            "fingerprint": _FINGERPRINT,
        }
        if isinstance(body, dict) and body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._event_stream(
                received, engine, job, _chat_events(meta, include_usage), "data: ", "[DONE]"
            )
        tokens, ticket = await self._collect(request, engine, job)
        finish = tokens[-1].finish_reason or "length"
        headers = self._succeeded(received, job, ticket, len(tokens))
        return JSONResponse(
            wire.chat_response(**meta, job=job, tokens=tokens, finish=finish), headers=headers
        )

    async def _generate_stream(self, request: Request, body: Any, engine: Engine) -> Response:
        received = self._clock()
        job = wire.parse_generate(body, self.limits, engine.count_tokens)
        self._log_request("/generate_stream", body, job)
        return self._event_stream(received, engine, job, _tgi_events, "data:", None)

    def _event_stream(
        self,
        received: float,
        engine: Engine,
        job: wire.Job,
        render: Callable[[wire.Job, list[Token]], list[dict[str, Any]]],
        prefix: str,
        done: str | None,
    ) -> Response:
        ticket = self._enqueue(job)  # before the response starts, so a full queue is a plain 429

        async def events() -> AsyncGenerator[str, None]:
            tokens: list[Token] = []
            try:
                async with aclosing(self._tokens(engine, job, ticket)) as stream:
                    async for token in stream:
                        tokens.append(token)
                        for event in render(job, tokens):
                            yield f"{prefix}{json.dumps(event)}\n\n"
                self._succeeded(received, job, ticket, len(tokens))
            except Exception as exc:
                logger.exception("streamed generation failed after %d tokens", len(tokens))
                self.metrics.request_failed("generation")
                error = {"error": f"Request failed during generation: {exc}", "error_type": "generation"}
                yield f"{prefix}{json.dumps(error)}\n\n"
            if done is not None:
                yield f"{prefix}{done}\n\n"

        headers = {
            "x-compute-type": engine.compute_type,
            "x-accel-buffering": "no",
            "cache-control": "no-cache",
        }
        return _EventStream(events(), on_close=lambda: self.queue.release(ticket), headers=headers)


def _tgi_events(job: wire.Job, tokens: list[Token]) -> list[dict[str, Any]]:
    token = tokens[-1]
    generated = None
    if token.finish_reason is not None:
        generated = (job.inputs if job.return_full_text else "") + wire.visible_text(tokens)
    return [wire.stream_event(job, len(tokens), token, generated)]


def _chat_events(
    meta: dict[str, Any], include_usage: bool
) -> Callable[[wire.Job, list[Token]], list[dict[str, Any]]]:
    def render(job: wire.Job, tokens: list[Token]) -> list[dict[str, Any]]:
        token = tokens[-1]
        events = [wire.chat_chunk(**meta, token=token)]
        if token.finish_reason is not None and include_usage:
            usage = {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": job.prompt_tokens + len(tokens),
            }
            events.append(wire.chat_chunk(**meta, token=None, usage=usage))
        return events

    return render


class _EventStream(StreamingResponse):
    """SSE response that always closes its generator and releases its queue slot, even if the
    client vanished before the first byte (Starlette would otherwise never start the generator)."""

    def __init__(
        self, events: AsyncGenerator[str, None], *, on_close: Callable[[], None], headers: dict[str, str]
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            self._on_close()


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` until it finishes or the client disconnects (then cancel it: ``_ClientGone``)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone
    return task.result()


def build_app(
    config: DevServerConfig,
    load_engine: Callable[[], Engine],
    *,
    on_load_error: Callable[[Exception], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Starlette:
    """A Starlette app that loads its engine in the background (``/health`` is 503 until then)."""
    server = DevServer(config, clock=clock)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncGenerator[None, None]:
        loading = asyncio.create_task(server.load(load_engine, on_load_error))
        try:
            yield
        finally:
            await loading  # a load runs in a thread and cannot be cancelled; it is short
            await server.aclose()

    routes = [
        Route("/", server.compat, methods=["POST"]),
        Route("/generate", server.generate, methods=["POST"]),
        Route("/generate_stream", server.generate_stream, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/info", server.info, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app
