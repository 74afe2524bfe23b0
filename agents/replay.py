"""Background timer, ``replay``: cost-aware best-of-n on the large tier, off-peak only.

Every ``replay.interval_s``: if every large backend's queue is at most ``replay.off_peak_queue_depth``
(``policy.replay.is_off_peak``), take the highest-gain examples from the replay queue (filled by
``admit`` as examples help small models), keep those worth replaying (``plan_replay``: gain above
``replay.min_gain`` and fewer than ``replay.max_rounds`` rounds), ask the large tier ``best_of`` times
with sampling, score the candidates and the incumbent with the configured scorer, and emit a log
record with ``origin="replay"``. ``admit`` applies it (the bank stays a view of the log): the answer is
replaced only when a candidate beats the incumbent by a margin, and the round counter always moves,
so the cap holds.

Error policy: a backend failure, an unavailable vector store or a busy period ends this tick (the
examples go back in the queue); anything else replaying one example raises is handled by the guard
(agents/guard.py): a dead letter with stage ``replay`` and the example's id (``replay:<example id>``,
no source coordinates: partition and offset -1), counted in ``echolm_handler_failures_total``, and
the tick goes on with the next example; a failure outside that is logged and counted
(``tick_failed``) and ends the tick. Replay never competes with live traffic and never raises into
the worker: a faust timer that raises crashes the whole worker.
"""

from __future__ import annotations

import logging
import time
from typing import cast

import faust

from agents.policy.prompt import build_messages
from agents.policy.replay import is_off_peak, pick_best, plan_replay
from infra.errors import BackendError, DependencyUnavailable
from infra.protocols import Example, GenerationParams
from infra.resources import Resources
from streams.codecs import encode_vector
from streams.records import LogRecord, ReplyAddress, ReplyRecord, RequestRecord, RouteInfo
from streams.topology import Topics

from .guard import Guard, mark
from .reject import Coordinates, Rejecter
from .scorers import ReferenceFreeScorer, Scorer
from .state import DecisionState

__all__ = ["Replayer", "register_replay"]

log = logging.getLogger(__name__)
_MARGIN = 0.05


class Replayer:
    def __init__(
        self,
        topics: Topics,
        res: Resources,
        state: DecisionState,
        scorer: Scorer | None = None,
        *,
        app: faust.App | None = None,
    ) -> None:
        self.topics, self.res, self.state = topics, res, state
        # the guard only dead-letters here (no reply): the app is needed for reply topics alone
        self.guard = Guard(res, Rejecter(cast("faust.App", app), topics, res))
        self._scorer = scorer
        self.large = [b for b in state.backends if b.tier == res.settings.tgi.large_tier]

    def scorer(self) -> Scorer | None:
        if self._scorer is None and self.res.embedder is not None:
            self._scorer = ReferenceFreeScorer(self.res.embedder)
        return self._scorer

    async def tick(self, *, k: int = 4) -> int:
        """One replay round; returns how many examples were replayed."""
        s = self.res.settings
        store, probe, scorer = self.res.store, self.res.probe, self.scorer()
        if (
            store is None
            or probe is None
            or scorer is None
            or not self.large
            or not len(self.state.replay_queue)
        ):
            return 0
        if not is_off_peak(
            probe.snapshot(),
            [b.name for b in self.large],
            s.replay.off_peak_queue_depth,
            time.monotonic(),
            s.tgi.stale_after_s,
        ):
            return 0
        picked = self.state.replay_queue.pop(k)
        examples: list[Example] = []
        try:
            for tenant in {t for t, _, _ in picked}:
                examples += await store.get(tenant, [e for t, e, _ in picked if t == tenant])
        except DependencyUnavailable as exc:
            log.warning("replay paused: the vector store is unavailable (%s)", exc)
            self.res.metrics.replayed.labels("store_unavailable").inc()
            for tenant, example_id, gain in picked:
                self.state.replay_queue.push(tenant, example_id, gain)
            return 0
        plan = plan_replay(examples, k=k, min_gain=s.replay.min_gain, max_rounds=s.replay.max_rounds)
        done = 0
        paused: list[BackendError] = []

        async def replay_one(example: Example) -> None:
            mark("replay", f"replay:{example.example_id}")
            try:
                await self._replay_one(example, scorer)
            except BackendError as exc:
                paused.append(exc)

        for example in plan:
            replayed = await self.guard.run(
                replay_one,
                example,
                coords=Coordinates(topic="", partition=-1, offset=-1, key=example.example_id),
                address=ReplyAddress(f"replay:{example.example_id}", example.tenant, ""),
                reply=False,
            )
            if paused:
                log.info("replay paused: %s", paused[0])
                self.res.metrics.replayed.labels("backend_error").inc()
                self.state.replay_queue.push(example.tenant, example.example_id, example.gain)
                break
            done += int(replayed)
        return done

    async def _replay_one(self, example: Example, scorer: Scorer) -> None:
        s = self.res.settings
        backend = min(self.large, key=lambda b: self._depth(b.name))
        generator = self.res.generators[backend.name]
        messages = build_messages(s.tgi.system_prompt, [], example.request)
        candidates = []
        for i in range(s.replay.best_of):
            params = GenerationParams(
                max_new_tokens=s.limits.default_new_tokens, temperature=0.7, seed=1000 + i
            )
            candidates.append((await generator.generate(messages, params)).text)
        scores = await scorer.score(example.request, candidates, incumbent=example.response)
        incumbent_score = (
            await scorer.score(example.request, [example.response], incumbent=example.response)
        )[0]
        best = pick_best(list(zip(candidates, scores, strict=True)), incumbent_score, _MARGIN)
        text = best if best is not None else example.response
        quality = max(scores) if best is not None else incumbent_score
        self.res.metrics.replayed.labels("improved" if best is not None else "kept").inc()
        now = time.time()
        request = RequestRecord(
            request_id=f"replay:{example.example_id}:{example.replay_rounds + 1}",
            tenant=example.tenant,
            prompt=example.request,
            max_new_tokens=s.limits.default_new_tokens,
            reply_topic=s.topic("replies"),
            created_at=now,
        )
        reply = ReplyRecord(
            request_id=request.request_id,
            tenant=example.tenant,
            ok=True,
            text=text,
            backend=backend.name,
            tier=backend.tier,
            worker=self.res.worker_id,
        )
        record = LogRecord(
            request=request,
            embedding=encode_vector(example.embedding),
            examples=[],
            route=RouteInfo(backend=backend.name, tier=backend.tier, reason="replay"),
            reply=reply,
            logged_at=now,
            origin="replay",
            quality=float(quality),
            replay_rounds=example.replay_rounds + 1,
        )
        fut = await self.topics.log.send(key=example.tenant, value=record)
        await fut

    def _depth(self, name: str) -> float:
        probe = self.res.probe
        sample = probe.snapshot().get(name) if probe is not None else None
        return sample.total if sample is not None else 0.0


def register_replay(app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
    if not res.settings.replay.enabled:
        return
    replayer = Replayer(topics, res, state, app=app)

    @app.timer(res.settings.replay.interval_s, name="echolm.replay")  # type: ignore[untyped-decorator]
    async def replay_tick() -> None:
        # A faust timer that raises crashes the whole worker: replay is an optimisation, so any
        # failure ends this tick (logged and counted) and serving goes on.
        if not res.ready.is_set():
            return
        try:
            await replayer.tick()
        except Exception:
            log.exception("replay tick failed; serving is unaffected, the next tick retries")
            res.metrics.replayed.labels("tick_failed").inc()
