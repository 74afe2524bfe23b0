"""Where one request goes: a contextual bandit over model tiers, a live load term, circuit breakers.

The decision for one request, in order:

1. ``context_features``: a 16-dim context from the query embedding and its selected examples;
2. ``route_estimates``: per tier, ``LinUCBBandit.expected`` twice, for the request with its examples
   and without them (``without_examples``): the expected reply quality (a prior plus a per-tier
   ridge regression on feedback) and a confidence width of each; a tier is shown the examples when
   that raises its expected quality by more than ``RoutingSettings.examples_margin`` (so a tenant's
   bank reaches the large tier too when it is measured or learned to help), and the better of the
   two is the tier's estimate;
3. ``choose_backend``: per backend, ``score = mean + exploration * width - load_penalty(its depth)``;
   replicas of one tier compete by normalised queue depth, tiers by score; ``with_examples`` says
   whether the chosen tier is shown the examples;
4. after the reply, ``CircuitBreaker.record_success/record_failure`` and, when feedback arrives,
   ``LinUCBBandit.update``.

``context_features`` and ``LinUCBBandit`` live in ``bandit.py``, ``CircuitBreaker`` in ``circuit.py``;
both are re-exported here.

All pure: ``now`` is passed in. For ``choose_backend``, ``fallback_backend`` and ``CircuitBreaker``
it must be on the clock of ``QueueDepth.at`` (the probe's monotonic clock).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from agents.policy.bandit import (
    CONTEXT_DIM,
    CONTEXT_NAMES,
    ArmEstimate,
    LinUCBBandit,
    context_features,
    without_examples,
)
from agents.policy.circuit import CircuitBreaker, CircuitState
from infra.errors import NoBackendAvailable
from infra.protocols import QueueDepth
from infra.settings import BackendSettings, RoutingSettings

FloatArray = npt.NDArray[np.float64]
_EXAMPLES = CONTEXT_NAMES.index("examples")

# Re-exported: the bandit lives in bandit.py and the breakers in circuit.py to keep modules small.
__all__ = [
    "CONTEXT_DIM",
    "CONTEXT_NAMES",
    "ArmEstimate",
    "BackendView",
    "CircuitBreaker",
    "CircuitState",
    "DepthState",
    "LinUCBBandit",
    "LoadSignal",
    "RouteDecision",
    "choose_backend",
    "context_features",
    "effective_depth",
    "fallback_backend",
    "fallback_decision",
    "load_penalty",
    "route_estimates",
    "without_examples",
]


# -------------------------------------------------------------------------------------------- load
def load_penalty(
    depth_total: float, *, q0: float, lam: float, gamma: float, cost: float, max_cost: float
) -> float:
    """How much load subtracts from a backend's score.

    The paper (EchoLM / IC-Cache, our reading) scores model ``i`` as
    ``S_i = mu_i - lambda * tanh(gamma * max(0, L - L0)) * C_i`` with ``L`` an EMA of QPS. Ours is the
    same shape with ``L`` = this backend's live queue depth (``RoutingSettings.load_signal``): no
    penalty up to ``q0`` queued requests, then a penalty growing roughly linearly (slope ``lam * gamma``) and
    saturating at ``lam``, so an overloaded backend is never scored below any bound. ``C_i`` is the
    cost normalised by the most expensive backend, so cheap backends barely feel their own queue
    (routing away from them buys little) while the large tier is pushed away hardest.
    """
    if max_cost <= 0:
        return 0.0
    return lam * math.tanh(gamma * max(0.0, depth_total - q0)) * (cost / max_cost)


DepthState = Literal["fresh", "stale", "missing", "unhealthy"]
LoadSignal = Literal["waiting", "total"]


@dataclass(frozen=True, slots=True)
class BackendView:
    """What routing needs to know about one backend (a replica of one tier)."""

    name: str
    tier: str
    cost: float
    max_concurrency: int

    @classmethod
    def from_settings(cls, backend: BackendSettings) -> BackendView:
        return cls(backend.name, backend.tier, backend.cost, backend.max_concurrency)


def effective_depth(
    backend: BackendView, sample: QueueDepth | None, *, now: float, stale_after_s: float, q0: float
) -> tuple[float, DepthState]:
    """The queue depth routing assumes for ``backend``, and the state of its sample.

    * fresh and healthy: the sample's ``total`` (waiting + running);
    * missing or older than ``stale_after_s``: pessimistic, ``q0 + max_concurrency / 2`` (or the last
      value seen, if higher): we cannot see it, so assume it is past the tolerated depth by half of
      what we send it at once. A backend we can see wins ties; a lone blind one still serves;
    * unhealthy (the last scrape failed): the same pessimistic depth, and the state says so, which
      ``choose_backend`` uses to exclude it unless nothing else is left.
    """
    pessimistic = q0 + backend.max_concurrency / 2.0
    if sample is None:
        return pessimistic, "missing"
    if not sample.healthy:
        return max(pessimistic, sample.total), "unhealthy"
    if now - sample.at > stale_after_s:
        return max(pessimistic, sample.total), "stale"
    return max(sample.total, 0.0), "fresh"


def route_estimates(
    bandit: LinUCBBandit, x: FloatArray, *, margin: float = 0.0
) -> tuple[dict[str, ArmEstimate], dict[str, bool]]:
    """Per tier: the estimate ``choose_backend`` scores it by, and whether it is shown the examples.

    ``x`` is the request's context with its selected examples. Each tier is estimated with them and
    without them; it gets the examples when their expected quality beats the tier alone by more
    than ``margin`` (means, not optimistic scores: a wider interval alone never buys examples).
    A context without examples gives every tier ``False``.
    """
    alone = bandit.expected(without_examples(x))
    if not float(x[_EXAMPLES]) > 0.0:  # none were selected
        return alone, dict.fromkeys(alone, False)
    shown = bandit.expected(x)
    use = {t: shown[t].mean > alone[t].mean + margin for t in alone}
    return {t: shown[t] if use[t] else alone[t] for t in alone}, use


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """One routing decision; the mappings cover the backends (tiers for ``expected_quality``) scored.

    ``bias`` is the expected quality given up to load: the mean of the tier a load-blind router would
    pick minus the mean of the chosen tier (0 when load changed nothing). Sustained ``bias > 0`` says
    the preferred tier needs more replicas. ``pressure`` is the load penalty on that preferred tier's
    best replica: it rises before the choice flips.
    """

    backend: str
    tier: str
    scores: Mapping[str, float]
    expected_quality: Mapping[str, float]
    load_penalty: Mapping[str, float]
    queue_depths: Mapping[str, float]
    reason: str
    ask_feedback: bool
    bias: float
    pressure: float = 0.0
    with_examples: bool = False  # whether the chosen tier is shown the request's selected examples


@dataclass(frozen=True, slots=True)
class _Candidate:
    view: BackendView
    depth: float  # waiting + running (+ pending): balances replicas of one tier
    state: DepthState
    queued: float  # what the load penalty sees (``RoutingSettings.load_signal``, + pending)

    @property
    def load(self) -> float:
        return self.depth / max(self.view.max_concurrency, 1)


def _candidates(
    backends: Sequence[BackendView],
    depths: Mapping[str, QueueDepth],
    *,
    now: float,
    stale_after_s: float,
    q0: float,
    exclude: Set[str],
    open_circuits: Set[str],
    tiers: Set[str] | None,
    notes: list[str],
    pending: Mapping[str, float] | None = None,
    load_signal: LoadSignal = "total",
) -> list[_Candidate]:
    out: list[_Candidate] = []
    pending = pending or {}
    by_kind: dict[str, list[str]] = {}
    for b in backends:
        if b.name in exclude:
            by_kind.setdefault("excluded", []).append(b.name)
        elif b.name in open_circuits:
            by_kind.setdefault("circuit open", []).append(b.name)
        elif tiers is not None and b.tier not in tiers:
            by_kind.setdefault("no estimate for tier", []).append(b.name)
        else:
            sample = depths.get(b.name)
            depth, state = effective_depth(b, sample, now=now, stale_after_s=stale_after_s, q0=q0)
            queued = sample.waiting if (state == "fresh" and sample and load_signal == "waiting") else depth
            extra = max(0.0, pending.get(b.name, 0.0))
            out.append(_Candidate(b, depth + extra, state, queued + extra))
            if state != "fresh":
                by_kind.setdefault(state, []).append(b.name)
    notes.extend(f"{why}: {', '.join(names)}" for why, names in by_kind.items())
    return out


def choose_backend(
    *,
    estimates: Mapping[str, ArmEstimate],
    backends: Sequence[BackendView],
    depths: Mapping[str, QueueDepth],
    now: float,
    stale_after_s: float,
    settings: RoutingSettings,
    exclude: Set[str] = frozenset(),
    open_circuits: Set[str] = frozenset(),
    pending: Mapping[str, float] | None = None,
    examples: Mapping[str, bool] | None = None,
) -> RouteDecision:
    """Pick the backend for one request. Raises ``NoBackendAvailable`` when every backend is excluded.

    ``estimates`` and ``examples`` (per tier: show the examples?) come from ``route_estimates``;
    the decision's ``with_examples`` is the chosen tier's entry (False when ``examples`` is None).

    1. Candidates: backends not in ``exclude``, not in ``open_circuits``, whose tier has an estimate;
       their depth from ``effective_depth``. Unhealthy ones are dropped unless only they are left.
       The load penalty sees ``settings.load_signal`` of a fresh sample (``waiting``: requests not yet
       in a batch, TGI's ``tgi_queue_size``; ``total``: waiting + running). ``pending`` (per backend:
       this worker's requests dispatched after its sample was taken and still in flight) is added to
       both, so a burst routed between two scrapes does not see the same short queue every time.
    2. Replicas: within each tier the candidate with the lowest normalised depth
       (depth / max_concurrency; then cost, then name) represents the tier.
    3. Tiers: ``score = mean + exploration * width - load_penalty(depth, cost)``; the highest wins
       (ties: cheaper, then name). Every candidate's own score is reported in ``scores``.
    4. ``ask_feedback`` when the two best tier means among the candidates are closer than
       ``settings.feedback_uncertainty``; ``bias`` and ``pressure`` as in ``RouteDecision``.
    """
    if not backends:
        raise NoBackendAvailable("no backends are configured; add tgi.backends to the settings")
    max_cost = max(b.cost for b in backends)
    notes: list[str] = []
    found = _candidates(
        backends,
        depths,
        now=now,
        stale_after_s=stale_after_s,
        q0=settings.load_q0,
        exclude=exclude,
        open_circuits=open_circuits,
        tiers=set(estimates),
        notes=notes,
        pending=pending,
        load_signal=settings.load_signal,
    )
    healthy = [c for c in found if c.state != "unhealthy"]
    pool = healthy or found
    if not pool:
        raise NoBackendAvailable(
            f"every backend is excluded ({'; '.join(notes) or 'none configured'}); "
            "wait for a circuit to half-open or check the backends' health"
        )
    if not healthy:
        notes.insert(0, "only unhealthy backends left")

    def penalty(c: _Candidate) -> float:
        return load_penalty(
            c.queued,
            q0=settings.load_q0,
            lam=settings.load_lambda,
            gamma=settings.load_gamma,
            cost=c.view.cost,
            max_cost=max_cost,
        )

    tier_cost = {c.view.tier: c.view.cost for c in pool}

    def optimistic(tier: str) -> float:
        # The cost term breaks near-ties toward the cheaper tier: within ``cost_weight`` of
        # expected quality, serve the cheaper model (the point of offloading).
        e = estimates[tier]
        return e.mean + settings.exploration * e.width - settings.cost_weight * tier_cost[tier] / max_cost

    penalties = {c.view.name: penalty(c) for c in pool}
    scores = {c.view.name: optimistic(c.view.tier) - penalties[c.view.name] for c in pool}
    representative: dict[str, _Candidate] = {}
    for c in sorted(pool, key=lambda c: (c.load, c.depth, c.view.cost, c.view.name)):
        representative.setdefault(c.view.tier, c)

    def rank(tier: str, *, with_load: bool) -> tuple[float, float, str]:
        c = representative[tier]
        value = scores[c.view.name] if with_load else optimistic(tier)
        return (-value, c.view.cost, tier)

    chosen_tier = min(representative, key=lambda t: rank(t, with_load=True))
    blind_tier = min(representative, key=lambda t: rank(t, with_load=False))
    chosen = representative[chosen_tier]
    means = sorted((estimates[t].mean for t in representative), reverse=True)
    ask_feedback = len(means) >= 2 and means[0] - means[1] < settings.feedback_uncertainty
    bias = max(0.0, estimates[blind_tier].mean - estimates[chosen_tier].mean)
    reason = "highest score" if chosen_tier == blind_tier else f"load moved it off {blind_tier}"
    return RouteDecision(
        backend=chosen.view.name,
        tier=chosen_tier,
        scores=scores,
        expected_quality={t: estimates[t].mean for t in representative},
        load_penalty=penalties,
        queue_depths={c.view.name: c.queued for c in pool},
        reason="; ".join([reason, *notes]),
        ask_feedback=ask_feedback,
        bias=bias,
        pressure=penalties[representative[blind_tier].view.name],
        with_examples=bool((examples or {}).get(chosen_tier, False)),
    )


def fallback_backend(
    backends: Sequence[BackendView],
    depths: Mapping[str, QueueDepth],
    *,
    now: float,
    stale_after_s: float,
    q0: float = 0.0,
    exclude: Set[str] = frozenset(),
    open_circuits: Set[str] = frozenset(),
) -> BackendView | None:
    """The bypass when the router itself fails: the least-loaded (normalised depth) healthy backend of
    any tier; if none is healthy, the least-loaded one left; None if every backend is excluded."""
    found = _candidates(
        backends,
        depths,
        now=now,
        stale_after_s=stale_after_s,
        q0=q0,
        exclude=exclude,
        open_circuits=open_circuits,
        tiers=None,
        notes=[],
    )
    pool = [c for c in found if c.state != "unhealthy"] or found
    if not pool:
        return None
    return min(pool, key=lambda c: (c.load, c.depth, c.view.cost, c.view.name)).view


def fallback_decision(
    backends: Sequence[BackendView],
    depths: Mapping[str, QueueDepth],
    *,
    now: float,
    stale_after_s: float,
    q0: float = 0.0,
    exclude: Set[str] = frozenset(),
    open_circuits: Set[str] = frozenset(),
    why: str = "router failed",
    examples: Mapping[str, bool] | None = None,
) -> RouteDecision:
    """``fallback_backend`` as a ``RouteDecision`` for the log (no scores, no feedback asked), so the
    bypass path records where it sent the request; ``examples`` (per tier) sets ``with_examples``.
    Raises ``NoBackendAvailable`` if nothing is left."""
    view = fallback_backend(
        backends,
        depths,
        now=now,
        stale_after_s=stale_after_s,
        q0=q0,
        exclude=exclude,
        open_circuits=open_circuits,
    )
    if view is None:
        raise NoBackendAvailable(f"{why}, and every backend is excluded or has an open circuit")
    used, state = effective_depth(view, depths.get(view.name), now=now, stale_after_s=stale_after_s, q0=q0)
    return RouteDecision(
        backend=view.name,
        tier=view.tier,
        scores={},
        expected_quality={},
        load_penalty={},
        queue_depths={view.name: used},
        reason=f"bypass ({why}): least-loaded backend"
        + ("" if state == "fresh" else f"; {state}: {view.name}"),
        ask_feedback=False,
        bias=0.0,
        with_examples=bool((examples or {}).get(view.tier, False)),
    )
