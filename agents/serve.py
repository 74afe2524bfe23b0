"""Stage 2 agent, ``serve``: route -> generate -> emit, ``worker.concurrency`` requests at a time.

Routing happens here, at dispatch time, not in ``prepare``: the queue depths it reads are then at
most one probe interval old, instead of older by the time a record spent on the prepared topic.

Error policy:
    * a retriable ``BackendError`` (429, 5xx, refused, timeout) -> the backend's circuit is told,
      the backend is excluded and the request re-routed, up to ``tgi.retries`` more times and
      never past the request's deadline;
    * every backend tried once and time left -> a short backoff, then they are tried again (a
      keep-alive connection closed under us or a 429 burst must not cost the request);
    * a non-retriable ``BackendError`` or nothing left to try -> an error reply (never silence),
      sent before the deadline: backends get the deadline minus a margin for the reply itself;
      ``deadline_exceeded`` when the deadline ran out during a generation, else ``no_backend_available``;
    * a router failure -> bypass: the least-loaded healthy backend (counted);
    * anything else raises (the supervisor restarts the actor; the offset was not committed).

Ordering (reply-then-commit), per request:
    1. route, 2. generate (with retries), 3. send the reply and await delivery,
    4. send the log record and await delivery, 5. return to ``async for`` (faust acks the event).
Replies are keyed and deduplicated by request id (at-least-once processing, exactly one reply per
request id as the client sees it: docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping

import faust
import numpy as np

from agents.policy.prompt import build_messages
from agents.policy.retrieval import Selected
from agents.policy.routing import RouteDecision, choose_backend, context_features, fallback_decision
from infra.errors import BackendError, BackendTimeout, NoBackendAvailable
from infra.protocols import Example, Generation, QueueDepth
from infra.resources import Resources
from streams.codecs import decode_vector
from streams.records import ExampleRef, LogRecord, PreparedRecord, ReplyRecord, RouteInfo
from streams.topology import Topics

from .reject import Rejecter
from .state import DecisionState

__all__ = ["register_serve"]

log = logging.getLogger(__name__)

_REPLY_MARGIN_S = 1.0  # at most this much of a request's deadline is kept for sending its reply
_RETRY_BACKOFF_S = 0.1  # pause before trying already-failed backends again (doubles per round)
_MIN_ATTEMPT_S = 0.2  # an attempt with less time than this left is not started


def _selected(refs: list[ExampleRef], dim: int) -> list[Selected]:
    """Rebuild policy-level examples from wire refs (their embeddings are not needed downstream)."""
    empty = np.zeros(dim, dtype=np.float32)
    return [
        Selected(
            example=Example(
                example_id=r.example_id,
                tenant="",
                request=r.request,
                response=r.response,
                embedding=empty,
                model_tier=r.model_tier,
            ),
            similarity=r.similarity,
            utility=r.utility,
        )
        for r in refs
    ]


class Server:
    def __init__(self, app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
        self.app, self.topics, self.res, self.state = app, topics, res, state
        self.rejecter = Rejecter(app, topics, res)
        self.large_tier = res.settings.tgi.large_tier
        # backend -> {attempt token: monotonic dispatch time} for generations in flight
        self._inflight: dict[str, dict[int, float]] = {}
        self._tokens = itertools.count()

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
            return choose_backend(
                pending=self.pending(depths),
                estimates=self.state.bandit.expected(context),
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
            )

    def _time_left(self, deadline_at: float, reply_margin: float, needed_s: float) -> bool:
        """Whether more than ``needed_s`` (plus a minimal attempt) remains before the reply margin."""
        if not deadline_at:
            return True
        return deadline_at - reply_margin - time.time() > needed_s + _MIN_ATTEMPT_S

    async def handle(self, prepared: PreparedRecord) -> None:
        s, metrics = self.res.settings, self.res.metrics
        request = prepared.request
        start_wall = time.time()
        timings = dict(prepared.timings_ms)
        sent_at = timings.pop("sent_at", None)
        if sent_at is not None:
            timings["kafka_hop"] = round(max(0.0, start_wall * 1000.0 - sent_at), 3)
            metrics.observe_stage("kafka_hop", timings["kafka_hop"] / 1000.0)
        if request.deadline_at and start_wall >= request.deadline_at:
            metrics.requests.labels("deadline_exceeded").inc()
            await self.rejecter.error_reply(
                request_id=request.request_id,
                tenant=request.tenant,
                reply_topic=request.reply_topic,
                error="the request's deadline passed before a backend could take it; retry with a longer "
                "deadline_s or add capacity",
                code="deadline_exceeded",
                timings_ms=timings,
            )
            return

        # Stop waiting on backends a little before the deadline, so the error reply (a produce and the
        # client's fetch) reaches the client before the deadline, not just after it.
        reply_margin = min(_REPLY_MARGIN_S, 0.1 * max(0.0, request.deadline_at - start_wall))

        # 1. route
        t_route = time.perf_counter()
        vector = (
            decode_vector(prepared.embedding)
            if prepared.embedding
            else np.zeros(s.milvus.dimension, dtype=np.float32)
        )
        selected = _selected(list(prepared.examples), s.milvus.dimension)
        context = context_features(vector, selected, prompt_text=request.prompt)
        exclude: set[str] = set()
        generation: Generation | None = None
        decision: RouteDecision | None = None
        last_error: Exception | None = None
        attempts = 0
        route_s = 0.0
        gen_t0 = time.perf_counter()
        for attempt in range(s.tgi.retries + 1):
            t_r = time.perf_counter()
            try:
                decision = self.route(context, exclude, time.monotonic())
            except NoBackendAvailable as exc:
                # Every usable backend has failed this request once. With time left, wait a little and
                # try them again (a keep-alive connection closed under us, a 429 burst, a restart)
                # rather than answer an error the deadline did not force.
                pause = _RETRY_BACKOFF_S * 2 ** max(0, attempt - 1)
                if not exclude or not self._time_left(request.deadline_at, reply_margin, pause):
                    last_error = exc
                    break
                await asyncio.sleep(pause)
                exclude.clear()
                try:
                    decision = self.route(context, exclude, time.monotonic())
                except NoBackendAvailable as again:
                    last_error = again
                    break
            route_s += time.perf_counter() - (t_route if attempt == 0 else t_r)
            # a half-open circuit admits one probe: claim it, so concurrent requests route elsewhere
            self.state.breaker.record_attempt(decision.backend, time.monotonic())
            metrics.route.labels(decision.backend, decision.reason[:32]).inc()
            metrics.load_bias.set(decision.bias)
            attempts += 1
            # 2. generate
            small = decision.tier != self.large_tier
            messages = build_messages(
                s.tgi.system_prompt,
                selected if small else [],
                request.prompt,
                conversation=request.conversation(),
            )
            generator = self.res.generators[decision.backend]
            remaining = (
                (request.deadline_at - reply_margin - time.time())
                if request.deadline_at
                else s.tgi.request_timeout_s
            )
            timeout = min(s.tgi.request_timeout_s, remaining)
            if timeout <= 0:
                last_error = BackendTimeout("deadline reached before generation", backend=decision.backend)
                break
            gen_t0 = time.perf_counter()
            metrics.inflight.inc()
            token = next(self._tokens)
            self._inflight.setdefault(decision.backend, {})[token] = time.monotonic()
            try:
                generation = await asyncio.wait_for(
                    generator.generate(messages, request.generation_params()),
                    timeout=timeout,
                )
            except (TimeoutError, BackendError) as exc:
                err = (
                    exc
                    if isinstance(exc, BackendError)
                    else BackendTimeout(
                        f"backend {decision.backend} did not answer within {timeout:.1f}s",
                        backend=decision.backend,
                    )
                )
                last_error = err
                metrics.backend_errors.labels(decision.backend, err.code).inc()
                self.state.breaker.record_failure(decision.backend, time.monotonic())
                log.warning("backend %s failed (%s): %s", decision.backend, err.code, err)
                if not err.retriable:
                    break
                exclude.add(decision.backend)
                continue
            finally:
                metrics.inflight.dec()
                self._inflight[decision.backend].pop(token, None)
            self.state.breaker.record_success(decision.backend, time.monotonic())
            break
        generate_s = time.perf_counter() - gen_t0
        timings["route"] = round(route_s * 1000.0, 3)
        timings["generate"] = round(generate_s * 1000.0, 3)
        metrics.observe_stage("route", route_s)

        if generation is None or decision is None:
            reason = f"{type(last_error).__name__}: {last_error}" if last_error else "no backend configured"
            out_of_time = request.deadline_at > 0 and not self._time_left(
                request.deadline_at, reply_margin, _RETRY_BACKOFF_S
            )
            if out_of_time and isinstance(last_error, BackendTimeout):
                metrics.requests.labels("deadline_exceeded").inc()
                code = "deadline_exceeded"
                error = (
                    f"the request's deadline passed while a backend was generating ({reason}); it was "
                    f"tried on {attempts} backend(s). Retry with a longer deadline_s or add capacity"
                )
            else:
                metrics.requests.labels("no_backend").inc()
                code = NoBackendAvailable.code
                error = f"no backend could answer ({reason}); the request was tried on {attempts} backend(s)"
            await self.rejecter.error_reply(
                request_id=request.request_id,
                tenant=request.tenant,
                reply_topic=request.reply_topic,
                error=error,
                code=code,
                timings_ms=timings,
            )
            return
        metrics.observe_stage("generate", generate_s)

        # 3. reply
        t_emit = time.perf_counter()
        used = selected if decision.tier != self.large_tier else []
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
        )
        reply_topic = self.topics.reply_topic(self.app, request.reply_topic)
        reply_fut = await reply_topic.send(key=request.request_id, value=reply)
        await reply_fut
        # 4. log
        route_info = RouteInfo(
            backend=decision.backend,
            tier=decision.tier,
            scores=dict(decision.scores),
            expected_quality=dict(decision.expected_quality),
            load_penalty=dict(decision.load_penalty),
            queue_depths=dict(decision.queue_depths),
            reason=decision.reason,
            ask_feedback=decision.ask_feedback,
            attempts=attempts,
            bias=decision.bias,
            context=[float(x) for x in context],
        )
        record = LogRecord(
            request=request,
            embedding=prepared.embedding,
            examples=list(prepared.examples),
            route=route_info,
            reply=reply,
            generated_tokens=generation.generated_tokens,
            logged_at=time.time(),
        )
        log_fut = await self.topics.log.send(key=request.tenant, value=record)
        await log_fut
        emit_s = time.perf_counter() - t_emit
        metrics.observe_stage("emit", emit_s)
        metrics.observe_stage("total", time.time() - request.created_at)
        metrics.requests.labels("ok").inc()
        metrics.count_served(decision.tier, self.large_tier, len(used))


def register_serve(app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
    server = Server(app, topics, res, state)

    @app.agent(topics.prepared, name="echolm.serve", concurrency=res.settings.worker.concurrency)
    async def serve(stream: faust.StreamT[PreparedRecord]) -> None:
        await res.ready.wait()
        async for prepared in stream:
            res.inflight += 1
            try:
                await server.handle(prepared)
            finally:
                res.inflight -= 1
