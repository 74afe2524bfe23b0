"""A fleet of TGI-like replicas on a virtual clock: many replicas, one router, no wall time.

``devstack.batching.simulate`` runs one replica; this runs several behind a router that decides each
request at the moment it reaches the fleet, from what a real router can see then: every replica's
last scraped queue gauges (``waiting`` = ``tgi_queue_size``, ``running`` = ``tgi_batch_current_size``,
refreshed every ``probe_interval_s``, as ``TGIQueueProbe`` does) and its own requests still in flight.
Each replica is ``BatchScheduler`` (TGI's batching loop and launcher limits) timed by a
``ServiceModel``, event by event, exactly as ``simulate`` times one replica: a step plans the next
batch, prefills the newcomers (one packed pass), then decodes every running sequence once. Arrivals
at the same instant as a step's end are seen by that step, as in ``simulate``; a request is offered
to its replica when it arrives (TGI's queue accepts or refuses it at once).

Pure: no I/O, no clock. ``run_fleet`` takes the arrivals and a router callback and returns one
``Served`` per arrival. The fleet sweep (``bench.fleet.vsweep``) drives it with each system's router.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from devstack.batching import BatchLimits, BatchScheduler, Job, ServiceModel
from infra.protocols import QueueDepth

__all__ = [
    "Arrival",
    "Dispatch",
    "Feedback",
    "FleetView",
    "Replica",
    "Router",
    "Served",
    "least_loaded",
    "run_fleet",
]

_ARRIVAL, _PROBE, _STEP = 0, 1, 2  # event order at one instant: arrivals first, as ``simulate``


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request reaching the fleet's router at ``at_s`` (after the system's own control plane)."""

    request_id: str
    at_s: float
    max_new_tokens: int


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A router's answer: the replica (None: answered without a backend, e.g. a cache hit), the prompt
    tokens that replica prefills, and a tag (the serving condition) carried to the outcome."""

    replica: str | None
    prompt_tokens: int
    tag: str


@dataclass(frozen=True, slots=True)
class Served:
    request_id: str
    replica: str | None
    tag: str
    at_s: float  # reached the router
    first_token_s: float | None
    done_s: float | None  # None: refused (over max_concurrent_requests)

    @property
    def refused(self) -> bool:
        return self.done_s is None


@dataclass(slots=True)
class Replica:
    """One emulated GPU: a tier, its step-time model and TGI's limits."""

    name: str
    tier: str
    service: ServiceModel
    limits: BatchLimits = field(default_factory=BatchLimits)
    sched: BatchScheduler = field(init=False)
    busy: bool = False
    new: list[Job] = field(default_factory=list)  # the batch being prefilled this step

    def __post_init__(self) -> None:
        self.sched = BatchScheduler(self.limits)


class FleetView:
    """What a router sees at decision time: the last scrape of every replica, and its own in-flight
    requests (dispatch times) per replica."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self.now = 0.0
        self.exclude: frozenset[str] = frozenset()  # replicas that refused this request already
        self.samples: dict[str, QueueDepth] = {}
        self.inflight: dict[str, dict[str, float]] = {r.name: {} for r in replicas}

    def pending(self) -> dict[str, float]:
        """Per replica: requests dispatched after its last sample and still in flight (what
        ``serve``'s ``pending`` adds to a sample)."""
        out: dict[str, float] = {}
        for name, started in self.inflight.items():
            sample = self.samples.get(name)
            taken = sample.at if sample is not None else float("-inf")
            n = sum(1 for t in started.values() if t > taken)
            if n:
                out[name] = float(n)
        return out

    def in_flight(self, name: str) -> int:
        return len(self.inflight[name])


Router = Callable[[Arrival, FleetView], Dispatch]
Feedback = Callable[[str, bool, float], None]  # (replica, answered?, when): what a circuit breaker hears


def run_fleet(  # noqa: C901 - one event loop: arrivals, probes, steps, bookkeeping
    arrivals: Sequence[Arrival],
    router: Router,
    replicas: Sequence[Replica],
    *,
    probe_interval_s: float = 0.25,
    retries: int = 0,
    feedback: Feedback | None = None,
) -> list[Served]:
    """Serve ``arrivals`` (any order) through ``replicas``; one ``Served`` per arrival, in input order.

    A replica that refuses a request (full: ``max_concurrent_requests``) is excluded and the router asked
    again (``view.exclude``), up to ``retries`` more times, at the same instant, as echolm's serve agent
    re-routes a 429. ``feedback`` hears every refusal and every answer (for a circuit breaker)."""
    by_name = {r.name: r for r in replicas}
    view = FleetView(replicas)
    heap: list[tuple[float, int, int, str]] = []
    seq = 0

    def push(t: float, kind: int, key: str) -> None:
        nonlocal seq
        heapq.heappush(heap, (t, kind, seq, key))
        seq += 1

    items = {a.request_id: a for a in arrivals}
    for a in arrivals:
        push(a.at_s, _ARRIVAL, a.request_id)
    push(0.0, _PROBE, "")
    dispatch: dict[str, Dispatch] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    left = len(arrivals)  # arrivals not yet routed

    def finish(rep: Replica, jobs: Sequence[Job], t: float) -> None:
        for job in jobs:
            done[job.request_id] = t
            view.inflight[rep.name].pop(job.request_id, None)
            if feedback is not None:
                feedback(rep.name, True, t)

    def start(rep: Replica, t: float) -> None:
        new = rep.sched.plan()
        if new:
            rep.new = new
            rep.busy = True
            push(t + rep.service.prefill_ms(sum(j.prompt_tokens for j in new)) / 1000.0, _STEP, rep.name)
        elif rep.sched.batch_size:
            rep.new = []
            rep.busy = True
            push(t + _decode_s(rep), _STEP, rep.name)
        elif rep.sched.waiting:
            raise ValueError(f"job {rep.sched.waiting[0]} can never fit the limits {rep.limits}")
        else:
            rep.busy = False

    while heap:
        t, kind, _, key = heapq.heappop(heap)
        view.now = t
        if kind == _PROBE:
            for rep in replicas:
                view.samples[rep.name] = QueueDepth(
                    rep.name, float(len(rep.sched.waiting)), float(rep.sched.batch_size), t
                )
            if left or any(r.busy for r in replicas):
                push(t + probe_interval_s, _PROBE, "")
        elif kind == _ARRIVAL:
            left -= 1
            a = items[key]
            refused: set[str] = set()
            for _ in range(retries + 1):
                view.exclude = frozenset(refused)
                d = router(a, view)
                dispatch[key] = d
                if d.replica is None:
                    first[key] = done[key] = t
                    break
                rep = by_name[d.replica]
                if rep.sched.offer(Job(key, t, d.prompt_tokens, a.max_new_tokens)):
                    view.inflight[rep.name][key] = t
                    if not rep.busy:
                        start(rep, t)
                    break
                if feedback is not None:
                    feedback(rep.name, False, t)
                refused.add(rep.name)
                if len(refused) == len(replicas):
                    break
            view.exclude = frozenset()
        else:
            rep = by_name[key]
            if rep.new:  # the prefill pass just ended: first tokens; then this step's decode
                for job in rep.new:
                    first[job.request_id] = t
                finish(rep, rep.sched.prefilled(rep.new), t)
                rep.new = []
                if rep.sched.batch_size:
                    push(t + _decode_s(rep), _STEP, rep.name)
                    continue
            else:  # a decode step ended
                finish(rep, rep.sched.decoded(), t)
            start(rep, t)
    return [
        Served(
            a.request_id,
            dispatch[a.request_id].replica,
            dispatch[a.request_id].tag,
            a.at_s,
            first.get(a.request_id),
            done.get(a.request_id),
        )
        for a in arrivals
    ]


def _decode_s(rep: Replica) -> float:
    """Seconds of one decode step of everything ``rep`` runs now."""
    return rep.service.decode_ms(rep.sched.batch_size, rep.sched.longest()) / 1000.0


def least_loaded(view: FleetView, names: Sequence[str]) -> str:
    """The replica with the fewest of this client's requests in flight (ties: first named): LiteLLM's
    ``least-busy``, and how ``DirectDispatcher`` spreads one tier."""
    return min(names, key=lambda n: (view.in_flight(n), names.index(n)))
