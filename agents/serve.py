"""Stage 2 agent, ``serve``: route -> generate -> emit, ``worker.concurrency`` requests at a time.

Routing happens here, at dispatch time, not in ``prepare``: the queue depths it reads are then at
most one probe interval old, instead of older by the time a record spent on the prepared topic.
The bandit context it routes on comes computed in the ``PreparedRecord`` (``prepare`` has the
selected examples' real similarity, utility and quality); the embedding is passed on, undecoded,
to the log record.

Error policy (the decisions are ``agents.policy.dispatch.next_step``; this module does the I/O):
    * a retriable ``BackendError`` (429, 5xx, refused, timeout) -> the backend's circuit is told,
      the backend is excluded and the request re-routed, up to ``tgi.retries`` more times and
      never past the request's deadline;
    * every backend tried once and time left -> a short backoff (100 ms, doubling), then they are
      tried again (a keep-alive connection closed under us or a 429 burst must not cost the request);
    * a non-retriable ``BackendError`` or nothing left to try -> an error reply (never silence),
      sent before the deadline: backends get the deadline minus a margin for the reply itself;
      ``deadline_exceeded`` when the deadline ran out during a generation, else ``no_backend_available``;
    * a router failure -> bypass: the least-loaded healthy backend (counted);
    * anything else the handler raises -> the guard (agents/guard.py): an error reply (``internal``) to
      the request's reply topic and a dead letter with topic, partition, offset and the stage it
      reached (``route``, ``generate`` or ``emit``), counted in ``echolm_handler_failures_total``; the
      actor goes on with the next record. Cancellation (shutdown) is not a failure: nothing is sent.

Streaming (a request with ``stream``): the generation goes through the backend's stream and
``ReplyChunkRecord``s go to the reply topic as tokens arrive (``Server._stream``); each attempt has
its own ``attempt`` id, so a retry after a partial stream starts a new sequence and readers never
show the abandoned attempt's text twice (``echolm.streaming``). The final reply and the log record
are the same as for a request that does not stream.

Every generation attempt is timed: ``echolm_stage_seconds{stage="generate"}`` observes each, the
worker log has a line per attempt, and the log record lists them (``RouteInfo.generate_ms``).

Ordering (reply-then-commit), per request:
    0. the idempotency check (``agents/idempotency.py``): a request answered before, by this worker
       or another, gets its stored reply re-sent (awaited) and nothing else: no route, no generation;
    1. route, 2. generate (with retries), 3a. send the answered record (``<prefix>.answered``) and
    await delivery, 3b. send the reply and await delivery, 4. send the log record and await delivery,
    5. release the event to the ``AckGate``, which acks it once every earlier record of its partition
    is done too (a record cut by shutdown is never acked, so nothing after it is committed either).
Replies are keyed and deduplicated by request id (at-least-once processing, exactly one reply per
request id as the client sees it, and one generation per request id: docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field

import faust
import numpy as np

from agents.policy.dispatch import (
    Attempt,
    AttemptError,
    Backoff,
    GiveUp,
    RetrySettings,
    attempt_timeout,
    next_step,
)
from agents.policy.prompt import build_chat
from agents.policy.retrieval import Selected
from agents.policy.routing import (
    RouteDecision,
    choose_backend,
    context_features,
    fallback_decision,
    route_estimates,
    without_examples,
)
from infra.errors import BackendError, BackendTimeout, NoBackendAvailable, ServiceError
from infra.protocols import (
    ChatMessage,
    Generation,
    GenerationParams,
    QueueDepth,
    StreamChunk,
    StreamingGenerator,
)
from infra.resources import Resources
from streams.codecs import decode_vector
from streams.records import (
    ExampleRef,
    LogRecord,
    PreparedRecord,
    ReplyAddress,
    ReplyChunkRecord,
    ReplyRecord,
    RequestRecord,
    RouteInfo,
)
from streams.topology import Topics

from .guard import AckGate, Guard, mark
from .idempotency import guard_for
from .reject import Coordinates, Rejecter
from .state import DecisionState

__all__ = ["register_serve"]

log = logging.getLogger(__name__)

_REPLY_MARGIN_S = 1.0  # at most this much of a request's deadline is kept for sending its reply


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def routing_context(prepared: PreparedRecord, dim: int) -> np.ndarray:
    """The bandit context ``prepare`` computed; for a v1 record (none shipped) it is recomputed from
    the wire's examples, whose quality fields then hold the v1 defaults."""
    if prepared.context:
        return np.asarray(prepared.context, dtype=np.float64)
    query = decode_vector(prepared.embedding) if prepared.embedding else np.zeros(dim, dtype=np.float32)
    tenant = prepared.request.tenant
    selected = [Selected(r.example(tenant, query), r.similarity, r.utility) for r in prepared.examples]
    return context_features(query, selected, prompt_text=prepared.request.prompt)


@dataclass
class _Dispatch:
    """One request's way through route -> generate: what ``next_step`` is told, and the timings."""

    request: RequestRecord
    examples: list[ExampleRef]
    context: np.ndarray
    reply_margin: float
    attempt: Attempt = field(default_factory=Attempt)
    error: AttemptError | None = None
    last_exception: ServiceError | None = None
    route_s: float = 0.0
    generate_s: list[float] = field(default_factory=list)

    def time_left(self) -> float | None:
        """Seconds before the deadline's reply margin; None when the request has no deadline."""
        deadline = self.request.deadline_at
        return deadline - self.reply_margin - time.time() if deadline else None

    def timings(self, timings: dict[str, float]) -> dict[str, float]:
        return {**timings, "route": _ms(self.route_s), "generate": _ms(sum(self.generate_s))}


class Server:
    def __init__(self, app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
        self.app, self.topics, self.res, self.state = app, topics, res, state
        self.rejecter = Rejecter(app, topics, res)
        self.large_tier = res.settings.tgi.large_tier
        self.retry = RetrySettings(retries=res.settings.tgi.retries)
        # backend -> {attempt token: monotonic dispatch time} for generations in flight
        self._inflight: dict[str, dict[int, float]] = {}
        self._tokens = itertools.count()
        self.idempotency = guard_for(app, res)  # step 0 and 3a (one guard per worker)
        self._attempts = itertools.count()  # streamed generation attempts (ReplyChunkRecord.attempt)

    def pending(self, depths: Mapping[str, QueueDepth]) -> dict[str, float]:
        """Per backend: this worker's requests in flight there that its latest sample cannot count."""
        out: dict[str, float] = {}
        for backend, started in self._inflight.items():
            sample = depths.get(backend)
            taken = sample.at if sample is not None else float("-inf")
            n = sum(1 for t in started.values() if t > taken)
            if n:
                out[backend] = float(n)
        return out

    def route(self, context: np.ndarray, exclude: set[str], now_mono: float) -> RouteDecision:
        s = self.res.settings
        probe = self.res.probe
        depths = probe.snapshot() if probe is not None else {}
        open_circuits = self.state.breaker.open_backends(now_mono)
        try:
            estimates, examples = route_estimates(
                self.state.bandit, context, margin=s.routing.examples_margin
            )
            return choose_backend(
                pending=self.pending(depths),
                estimates=estimates,
                examples=examples,
                backends=self.state.backends,
                depths=depths,
                now=now_mono,
                stale_after_s=s.tgi.stale_after_s,
                settings=s.routing,
                exclude=frozenset(exclude),
                open_circuits=frozenset(open_circuits),
            )
        except NoBackendAvailable:
            raise
        except Exception:
            log.exception("router failed; bypassing to the least-loaded backend")
            self.res.metrics.bypass.labels("router_failed").inc()
            return fallback_decision(
                self.state.backends,
                depths,
                now=now_mono,
                stale_after_s=s.tgi.stale_after_s,
                q0=s.routing.load_q0,
                exclude=frozenset(exclude),
                open_circuits=frozenset(open_circuits),
                examples={b.tier: b.tier != self.large_tier for b in self.state.backends},
            )

    async def handle(self, prepared: PreparedRecord) -> None:
        """Steps 0-5 of the module docstring for one prepared request."""
        request_id = prepared.request.request_id
        answered = await self.idempotency.begin(request_id)  # 0. answered before?
        if answered is not None:
            await self.idempotency.resend(self.app, self.topics, answered)
            return
        try:
            await self._serve_new(prepared)
        finally:
            self.idempotency.end(request_id)

    async def _serve_new(self, prepared: PreparedRecord) -> None:
        """Steps 1-5 for a request not answered before."""
        request = prepared.request
        start_wall = time.time()
        timings = self._arrival(prepared, start_wall)
        if request.deadline_at and start_wall >= request.deadline_at:
            await self._give_up(request, GiveUp("deadline_exceeded"), None, timings)
            return
        # Stop waiting on backends a little before the deadline, so the error reply (a produce and the
        # client's fetch) reaches the client before the deadline, not just after it.
        run = _Dispatch(
            request=request,
            examples=list(prepared.examples),
            context=routing_context(prepared, self.res.settings.milvus.dimension),
            reply_margin=min(_REPLY_MARGIN_S, 0.1 * max(0.0, request.deadline_at - start_wall)),
        )
        served = await self._dispatch(run)  # 1. route, 2. generate (with retries)
        self.res.metrics.observe_stage("route", run.route_s)
        if isinstance(served, GiveUp):
            await self._give_up(request, served, run, run.timings(timings))
            return
        mark("emit", request.request_id)
        await self._emit(prepared, run, *served, run.timings(timings))  # 3. reply, 4. log

    def _arrival(self, prepared: PreparedRecord, now_wall: float) -> dict[str, float]:
        """The prepared record's timings, with the hop over the prepared topic (``kafka_hop``)."""
        timings = dict(prepared.timings_ms)
        sent_at = timings.pop("sent_at", None)
        if sent_at is not None:
            timings["kafka_hop"] = round(max(0.0, now_wall * 1000.0 - sent_at), 3)
            self.res.metrics.observe_stage("kafka_hop", timings["kafka_hop"] / 1000.0)
        return timings

    async def _dispatch(self, run: _Dispatch) -> tuple[RouteDecision, Generation] | GiveUp:
        """Ask ``next_step`` what to do until a generation succeeds or it gives up."""
        while True:
            step = next_step(run.attempt, run.error, run.time_left(), self.retry)
            if isinstance(step, GiveUp):
                return step
            if isinstance(step, Backoff):
                await asyncio.sleep(step.pause_s)
                run.attempt, run.error = Attempt(run.attempt.generations), None
                continue
            run.attempt = Attempt(run.attempt.generations, step.exclude)
            mark("route", run.request.request_id)
            t = time.perf_counter()
            try:
                decision = self.route(run.context, set(step.exclude), time.monotonic())
            except NoBackendAvailable as exc:
                run.error, run.last_exception = AttemptError(code=exc.code), exc
                continue
            finally:
                run.route_s += time.perf_counter() - t
            outcome = await self._generate(run, decision)
            if not isinstance(outcome, BackendError):
                return decision, outcome
            run.last_exception = outcome
            run.error = AttemptError(
                code=outcome.code,
                retriable=outcome.retriable,
                timed_out=isinstance(outcome, BackendTimeout),
                backend=decision.backend,
            )

    async def _generate(self, run: _Dispatch, decision: RouteDecision) -> Generation | BackendError:
        """One generation on the routed backend, timed and counted; a failure is returned, not raised."""
        mark("generate", run.request.request_id)
        s, metrics, backend = self.res.settings, self.res.metrics, decision.backend
        timeout = attempt_timeout(run.time_left(), s.tgi.request_timeout_s)
        if timeout <= 0:
            return BackendTimeout("deadline reached before generation", backend=backend)
        # a half-open circuit admits one probe: claim it, so concurrent requests route elsewhere
        self.state.breaker.record_attempt(backend, time.monotonic())
        metrics.route.labels(backend, decision.reason[:32]).inc()
        metrics.load_bias.set(decision.bias)
        run.attempt = Attempt(run.attempt.generations + 1, run.attempt.excluded)
        shown = run.examples if decision.with_examples else []  # the router decides, per tier
        messages = build_chat(
            s.tgi.system_prompt, shown, run.request.prompt, conversation=run.request.conversation()
        )
        params = run.request.generation_params()
        metrics.inflight.inc()
        token = next(self._tokens)
        self._inflight.setdefault(backend, {})[token] = time.monotonic()
        t = time.perf_counter()
        try:
            generator = self.res.generators[backend]
            if run.request.stream and isinstance(generator, StreamingGenerator):
                job = self._stream(run, generator, messages, params)
            else:
                job = generator.generate(messages, params)
            generation = await asyncio.wait_for(job, timeout=timeout)
        except (TimeoutError, BackendError) as exc:
            err = (
                exc
                if isinstance(exc, BackendError)
                else BackendTimeout(
                    f"backend {backend} did not answer within {timeout:.1f}s", backend=backend
                )
            )
            self._attempt_done(run, backend, time.perf_counter() - t, err)
            return err
        finally:
            metrics.inflight.dec()
            self._inflight[backend].pop(token, None)
        self._attempt_done(run, backend, time.perf_counter() - t, None)
        return generation

    async def _stream(
        self,
        run: _Dispatch,
        generator: StreamingGenerator,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
    ) -> Generation:
        """One streamed generation: ``ReplyChunkRecord``s to the reply topic as tokens arrive, then the
        whole ``Generation`` (the final reply is sent by ``_emit`` as for any request).

        Text is batched by ``worker.stream_window_s``: the first token goes out at once, later ones
        when a token arrives a window after the last chunk, and the rest at the end, so a request sends
        at most one chunk per window. Chunk deliveries are not awaited one by one (the producer keeps
        their order in the partition); they are awaited before the final reply is sent. A failed chunk
        delivery is logged and counted, not retried: the final reply still carries the whole text.
        """
        request = run.request
        topic = self.topics.reply_topic(self.app, request.reply_topic)
        attempt = f"{self.res.worker_id}:{next(self._attempts)}"
        window = self.res.settings.worker.stream_window_s
        started = time.perf_counter()
        pieces: list[str] = []
        pending: list[str] = []
        deliveries: list[Awaitable[object]] = []
        last_flush = float("-inf")
        final = StreamChunk(text="")

        async def flush() -> None:
            nonlocal last_flush
            if not pending:
                return
            chunk = ReplyChunkRecord(
                request_id=request.request_id,
                tenant=request.tenant,
                attempt=attempt,
                seq=len(deliveries),
                text="".join(pending),
                sent_at=time.time(),
            )
            pending.clear()
            deliveries.append(await topic.send(key=request.request_id, value=chunk))
            last_flush = time.monotonic()

        try:
            async for piece in generator.generate_stream(messages, params):
                if piece.finish_reason:
                    final = piece
                if piece.text:
                    pieces.append(piece.text)
                    pending.append(piece.text)
                    if time.monotonic() - last_flush >= window:
                        await flush()
            await flush()
        finally:
            for outcome in await asyncio.gather(*deliveries, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    self.res.metrics.backend_errors.labels(generator.name, "chunk_not_delivered").inc()
                    log.warning("a reply chunk of %s was not delivered: %s", request.request_id, outcome)
        return Generation(
            text="".join(pieces),
            backend=generator.name,
            generated_tokens=final.generated_tokens,
            prompt_tokens=final.prompt_tokens,
            latency_s=time.perf_counter() - started,
            finish_reason=final.finish_reason,
        )

    def _attempt_done(self, run: _Dispatch, backend: str, seconds: float, err: BackendError | None) -> None:
        """Time one attempt (metrics, the worker log, the log record) and tell the backend's circuit."""
        run.generate_s.append(seconds)
        self.res.metrics.observe_stage("generate", seconds)
        now = time.monotonic()
        if err is None:
            self.state.breaker.record_success(backend, now)
            log.debug("attempt %d on %s answered in %.3fs", len(run.generate_s), backend, seconds)
            return
        self.res.metrics.backend_errors.labels(backend, err.code).inc()
        self.state.breaker.record_failure(backend, now)
        log.warning(
            "attempt %d on %s failed after %.3fs (%s): %s",
            len(run.generate_s),
            backend,
            seconds,
            err.code,
            err,
        )

    async def _give_up(
        self, request: RequestRecord, step: GiveUp, run: _Dispatch | None, timings: dict[str, float]
    ) -> None:
        """An error reply, never silence (no log record: there is nothing to admit or learn from)."""
        if run is None:
            error = (
                "the request's deadline passed before a backend could take it; retry with a longer "
                "deadline_s or add capacity"
            )
        else:
            exc = run.last_exception
            reason = f"{type(exc).__name__}: {exc}" if exc is not None else "no backend configured"
            tried = run.attempt.generations
            if step.code == "deadline_exceeded":
                error = (
                    f"the request's deadline passed while a backend was generating ({reason}); it was "
                    f"tried on {tried} backend(s). Retry with a longer deadline_s or add capacity"
                )
            else:
                error = f"no backend could answer ({reason}); the request was tried on {tried} backend(s)"
        outcome = "deadline_exceeded" if step.code == "deadline_exceeded" else "no_backend"
        self.res.metrics.requests.labels(outcome).inc()
        await self.rejecter.error_reply(
            request_id=request.request_id,
            tenant=request.tenant,
            reply_topic=request.reply_topic,
            error=error,
            code=step.code,
            timings_ms=timings,
        )

    async def _emit(
        self,
        prepared: PreparedRecord,
        run: _Dispatch,
        decision: RouteDecision,
        generation: Generation,
        timings: dict[str, float],
    ) -> None:
        """3a. the answered record, 3b. the reply, then 4. the log record, each awaited to the broker."""
        metrics, request = self.res.metrics, prepared.request
        t_emit = time.perf_counter()
        used = run.examples if decision.with_examples else []
        reply = ReplyRecord(
            request_id=request.request_id,
            tenant=request.tenant,
            ok=True,
            text=generation.text,
            backend=decision.backend,
            tier=decision.tier,
            n_examples=len(used),
            timings_ms=timings,
            worker=self.res.worker_id,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.generated_tokens,
            finish_reason=generation.finish_reason,
        )
        await self.idempotency.record(self.topics, request.reply_topic, reply)  # 3a.
        reply_topic = self.topics.reply_topic(self.app, request.reply_topic)
        reply_fut = await reply_topic.send(key=request.request_id, value=reply)
        await reply_fut
        route_info = RouteInfo(
            backend=decision.backend,
            tier=decision.tier,
            scores=dict(decision.scores),
            expected_quality=dict(decision.expected_quality),
            load_penalty=dict(decision.load_penalty),
            queue_depths=dict(decision.queue_depths),
            reason=decision.reason,
            ask_feedback=decision.ask_feedback,
            attempts=run.attempt.generations,
            bias=decision.bias,
            # the context the served arm saw: learning credits (tier, with or without examples)
            context=[float(x) for x in (run.context if used else without_examples(run.context))],
            generate_ms=[_ms(x) for x in run.generate_s],
            with_examples=bool(used),
        )
        record = LogRecord(
            request=request,
            embedding=prepared.embedding,
            examples=used,
            selected=list(run.examples),
            route=route_info,
            reply=reply,
            generated_tokens=generation.generated_tokens,
            logged_at=time.time(),
        )
        log_fut = await self.topics.log.send(key=request.tenant, value=record)
        await log_fut
        metrics.observe_stage("emit", time.perf_counter() - t_emit)
        metrics.observe_stage("total", time.time() - request.created_at)
        metrics.requests.labels("ok").inc()
        metrics.count_served(decision.tier, self.large_tier, len(used))


def register_serve(app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
    """One prepared record at a time per actor, under the guard (agents/guard.py): a handler that
    raises is answered and dead-lettered; its offset, like every other, is acked in order once
    handled. On SIGTERM (``res.draining``) a record taken from the stream buffer is not served: it
    stays un-acked and uncommitted, for the worker that takes the partition over."""
    server = Server(app, topics, res, state)
    guard = Guard(res, server.rejecter)
    gate = AckGate(lambda: app.consumer)

    @app.agent(topics.prepared, name="echolm.serve", concurrency=res.settings.worker.concurrency)
    async def serve(stream: faust.StreamT[PreparedRecord]) -> None:
        await res.ready.wait()
        async for event in stream.events():
            gate.hold(event)
            if res.draining:
                continue
            prepared: PreparedRecord = event.value
            request = prepared.request
            res.inflight += 1
            try:
                await guard.run(
                    server.handle,
                    prepared,
                    coords=Coordinates.of(event),
                    address=ReplyAddress(request.request_id, request.tenant, request.reply_topic),
                )
                gate.release(event)  # not reached when cancelled: the offset stays uncommitted
            finally:
                res.inflight -= 1
