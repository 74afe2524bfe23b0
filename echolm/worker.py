"""``echolm worker``: one faust worker process with a graceful, bounded shutdown.

On SIGTERM/SIGINT: (1) stop taking records: every assigned partition is paused and
``Resources.draining`` is set, so the agents leave the records already fetched into faust's stream
buffers un-acked instead of serving them, (2) wait until the requests already in flight are answered
or ``worker.shutdown_grace_s`` passes, (3) cancel the agents (before the adapters close under
them), then stop the app. Offsets are acked in order and only once handled (agents/guard.py,
``AckGate``), so neither a record the grace cut off nor a buffered one, nor anything after them in
their partition, is committed: the worker that takes the partition over serves them (the client
drops a duplicate reply). Adapters close in reverse order. Counts are logged.

Liveness (infra/liveness.py): a timer in the event loop ticks every ``worker.liveness_tick_s`` and
the consumer thread reports every fetch; ``/livez`` on the metrics port fails when either stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import warnings
from typing import Any

import faust

from infra.liveness import Liveness
from infra.metrics import serve_metrics
from infra.resources import Resources
from infra.settings import Settings
from streams.transport import install_liveness

from .app import build_app

__all__ = ["DrainingWorker", "run_worker", "watch_liveness"]

log = logging.getLogger(__name__)


class DrainingWorker(faust.Worker):
    def __init__(self, app: faust.App, resources: Resources, grace_s: float, **kwargs: Any) -> None:
        self.resources = resources
        self.grace_s = grace_s
        super().__init__(app, **kwargs)

    async def _stop_on_signal(self, sig: signal.Signals) -> None:
        res = self.resources
        res.draining = True  # before anything awaits: no agent takes another record
        consumer = self.app.consumer
        assigned = consumer.assignment()
        if assigned:
            consumer.pause_partitions(assigned)
        deadline = time.monotonic() + self.grace_s
        start_inflight = res.inflight
        # Polls a plain counter the agents update; an Event would need every agent to signal it.
        while res.inflight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        log.info(
            "shutdown on %s: %d in flight at signal, %d drained, %d abandoned after %.1fs grace "
            "(their offsets stay uncommitted and will be re-processed; records still buffered were "
            "not taken)",
            sig.name,
            start_inflight,
            start_inflight - res.inflight,
            res.inflight,
            self.grace_s,
        )
        # Cancel what the grace cut off *before* faust stops the services: it closes the adapters
        # (Resources) before the agents, and a generation whose HTTP client closed under it would end
        # in an error reply sent, and acked, by this worker instead of a cancellation. Cancelled, the
        # record stays un-acked (agents/guard.py) and the worker that takes its partition serves it.
        await self.app.agents.stop()
        # faust's own stop would wait, without a bound, for every record taken and not yet acked:
        # the ones this drain deliberately leaves un-acked (buffered, or cut by the grace) never will
        # be. The bounded wait above replaces it; faust then commits what was acked (in order).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", faust.exceptions.AlreadyConfiguredWarning)
            self.app.conf.stream_wait_empty = False
        await super()._stop_on_signal(sig)


def watch_liveness(app: faust.App, settings: Settings) -> Liveness:
    """A ``Liveness`` fed by a timer in ``app``'s event loop and by its consumer's fetches."""
    w = settings.worker
    liveness = Liveness(max_tick_age_s=w.liveness_max_tick_age_s, max_poll_age_s=w.liveness_max_poll_age_s)
    install_liveness(app, liveness)

    @app.timer(w.liveness_tick_s, name="echolm.liveness-tick")  # type: ignore[untyped-decorator]
    async def tick() -> None:
        liveness.tick()

    return liveness


def run_worker(settings: Settings, *, role: str | None = None) -> int:
    if role:
        settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"role": role})})
    if settings.worker.event_loop == "uvloop":
        import uvloop  # the 'uvloop' extra; faust's worker creates its loop from the policy

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    built = build_app(settings)
    liveness = watch_liveness(built.app, settings)
    serve_metrics(built.resources.metrics, settings.worker.metrics_port, liveness=liveness)
    worker = DrainingWorker(
        built.app,
        built.resources,
        settings.worker.shutdown_grace_s,
        loglevel=settings.worker.log_level.lower(),
        override_logging=False,
    )
    worker.execute_from_commandline()
    return 0
