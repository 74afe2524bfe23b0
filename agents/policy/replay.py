"""The example manager's decisions: what to replay, when, what to keep, and what to evict.

* Replay priority ``G(e)``: examples that are used often, cost a lot to serve without, and have a
  weak answer are worth re-asking (best-of-n) while the large tier is idle.
* Eviction value: the successful offloads an example enabled, decayed by 0.9 per hour; eviction is a
  0/1 knapsack (weight = stored bytes) solved greedily by value density, plus a TTL.

All pure: ``now`` is unix seconds, the clock of ``Example.created_at`` / ``updated_at``, except for
``is_off_peak``, whose ``now`` is the probe's clock (that of ``QueueDepth.at``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from infra.protocols import Example, QueueDepth

__all__ = [
    "credit_offload",
    "decayed_value",
    "is_off_peak",
    "pick_best",
    "plan_eviction",
    "plan_replay",
    "replay_gain",
    "update_gain",
]


def replay_gain(*, quality: float, cost: float, max_cost: float) -> float:
    """``G = (1 - quality) * cost / max_cost``, both factors clipped to [0, 1]."""
    q = min(max(quality, 0.0), 1.0)
    c = min(max(cost / max_cost, 0.0), 1.0) if max_cost > 0 else 0.0
    return (1.0 - q) * c


def update_gain(prev: float, *, quality: float, cost: float, max_cost: float, ema: float) -> float:
    """Fold one use of an example into its replay priority, an EMA of ``replay_gain``.

    The paper's ``G(e) = (1 - normalised quality) * normalised model cost`` (our reading), accumulated
    each time the example is used. ``quality`` is the example's current quality estimate and ``cost``
    the cost of the backend the using request would otherwise need (pass the large tier's cost when
    the example let a small one serve). ``ema`` is ``ReplaySettings.gain_ema``: the weight of this use.

    Our EMA forgets unused examples only when they are next used; ``plan_replay`` reads the stored value.
    """
    if not 0.0 < ema <= 1.0:
        raise ValueError(f"ema must be in (0, 1], got {ema}")
    return (1.0 - ema) * prev + ema * replay_gain(quality=quality, cost=cost, max_cost=max_cost)


def is_off_peak(
    depths: Mapping[str, QueueDepth],
    large_backends: Sequence[str],
    threshold: float,
    now: float,
    stale_after_s: float,
) -> bool:
    """True only when every large backend has a fresh, healthy sample with depth <= ``threshold``.

    Missing, stale or unhealthy samples count as busy: replay is optional work, so when we cannot
    see the large tier we do not add to it. No large backend at all is never off-peak.
    """
    if not large_backends:
        return False
    for name in large_backends:
        sample = depths.get(name)
        if sample is None or not sample.healthy or now - sample.at > stale_after_s:
            return False
        if sample.total > threshold:
            return False
    return True


def plan_replay(examples: Sequence[Example], *, k: int, min_gain: float, max_rounds: int) -> list[Example]:
    """Up to ``k`` examples to replay now, highest gain first (ties: fewer rounds, then id).

    Skipped: unusable ones, those that already had ``max_rounds`` replay rounds (the paper drops an
    example from replay after 5), and those whose gain is below ``min_gain``: past that point a replay
    no longer buys offloading worth its cost.
    """
    eligible = [
        e
        for e in examples
        if e.usable and e.replay_rounds < max_rounds and math.isfinite(e.gain) and e.gain >= min_gain
    ]
    eligible.sort(key=lambda e: (-e.gain, e.replay_rounds, e.example_id))
    return eligible[: max(k, 0)]


def pick_best(candidates: Sequence[tuple[str, float]], incumbent_score: float, margin: float) -> str | None:
    """The best replayed answer if it beats the incumbent by more than ``margin``, else None.

    ``candidates`` are (answer, score) pairs on the incumbent's scale; ties go to the first. Replacing
    only on a clear win keeps scorer noise from churning good answers.
    """
    best: tuple[str, float] | None = None
    for text, score in candidates:
        if text.strip() and math.isfinite(score) and (best is None or score > best[1]):
            best = (text, score)
    if best is None or not best[1] > incumbent_score + margin:
        return None
    return best[0]


def decayed_value(offloads: float, last_update: float, now: float, decay_per_hour: float) -> float:
    """``offloads * decay_per_hour ** hours_since(last_update)``: 0.9 per hour in the paper."""
    hours = max(0.0, now - last_update) / 3600.0
    return float(max(offloads, 0.0) * decay_per_hour**hours)


def credit_offload(example: Example, success: bool, now: float, decay_per_hour: float) -> Example:
    """The example after one request used it: its value decayed to ``now``, plus 1 on success.

    ``updated_at`` becomes ``now``: it marks when ``offloads`` was last brought up to date.
    """
    value = decayed_value(example.offloads, example.updated_at, now, decay_per_hour) + (
        1.0 if success else 0.0
    )
    return dataclasses.replace(example, offloads=value, updated_at=max(now, example.updated_at))


def plan_eviction(
    examples: Sequence[Example], *, budget_bytes: int, now: float, ttl_s: float, decay_per_hour: float
) -> list[str]:
    """The ids to evict so the rest fit in ``budget_bytes``: expired ones first, then by knapsack.

    1. TTL: every example created more than ``ttl_s`` ago goes.
    2. If the rest fit, stop. Otherwise solve the 0/1 knapsack (weight ``stored_bytes``, value the
       decayed offloads; 0 for unusable examples) greedily: keep by value density, highest first,
       skipping any that no longer fit. Classic fix-up: if the single most valuable example that
       fits alone is worth more than the greedy set, keep it alone instead (this makes the result at
       least half the optimum). Ties keep the newer example.

    Evicted ids come back expired first, then lowest density first.
    """
    expired = [e for e in examples if now - e.created_at > ttl_s]
    alive = [e for e in examples if now - e.created_at <= ttl_s]
    evict = [e.example_id for e in sorted(expired, key=lambda e: (e.created_at, e.example_id))]
    if sum(e.stored_bytes for e in alive) <= budget_bytes:
        return evict

    def value(e: Example) -> float:
        return decayed_value(e.offloads, e.updated_at, now, decay_per_hour) if e.usable else 0.0

    def density(e: Example) -> float:
        return value(e) / e.stored_bytes if e.stored_bytes else math.inf

    order = sorted(alive, key=lambda e: (-density(e), -e.created_at, e.example_id))
    kept: set[str] = set()
    used = 0
    for e in order:
        if used + e.stored_bytes <= budget_bytes:
            kept.add(e.example_id)
            used += e.stored_bytes
    greedy_value = sum(value(e) for e in alive if e.example_id in kept)
    fitting = [e for e in alive if e.stored_bytes <= budget_bytes]
    if fitting:
        single = max(fitting, key=lambda e: (value(e), e.created_at))
        if value(single) > greedy_value:
            kept = {single.example_id}
            # fill the rest of the room greedily around it
            used = single.stored_bytes
            for e in order:
                if e.example_id not in kept and used + e.stored_bytes <= budget_bytes:
                    kept.add(e.example_id)
                    used += e.stored_bytes
    evict.extend(e.example_id for e in reversed(order) if e.example_id not in kept)
    return evict
