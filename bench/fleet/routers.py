"""Two router baselines for the fleet sweep (issue 12), both serving without in-context examples.

* **least-busy** (LiteLLM's ``least-busy`` routing strategy): every request goes to the replica, of
  either tier, with the fewest requests in flight from this client. Load-aware, quality-blind.
* **quality-router** (a RouteLLM-style stand-in): a request goes to the small tier when the bank
  holds a request at cosine >= ``threshold`` to it (a familiar request: RouteLLM's similarity-weighted
  router predicts the weak model's win rate from similar requests), otherwise to the large tier; the
  least-busy replica of the chosen tier. Quality-aware by that proxy, load-blind. No examples are
  shown, so its small answers are served under ``small_alone``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.baselines import DirectDispatcher, Handler, Scheduled, _failed, _served
from bench.calibrate import Condition, QualityModel
from bench.report import RequestResult
from infra.errors import BackendError

__all__ = ["TierRouter", "serve_quality_router"]


class TierRouter:
    """One ``DirectDispatcher`` per tier, so a router can pick the tier and the tier its replica."""

    def __init__(self, dispatchers: Mapping[str, DirectDispatcher]) -> None:
        self.dispatchers = dict(dispatchers)

    @property
    def tiers(self) -> Sequence[str]:
        return sorted(self.dispatchers)


def serve_quality_router(
    router: TierRouter,
    *,
    embedder: Any,
    store: Any,
    tenant: str,
    threshold: float,
    small_tier: str,
    large_tier: str,
    system: str,
    phase: str,
    quality: QualityModel,
    counts: dict[str, int],
) -> Handler:
    """Small tier for familiar requests (a bank neighbour at cosine >= ``threshold``), else large."""

    async def handle(item: Scheduled, clock: Callable[[], float]) -> RequestResult:
        sent = clock()
        vector = (await embedder.embed([item.text]))[0]
        found = await store.search(tenant, vector[None, :], limit=1)
        best = found[0][0] if found and found[0] else None
        tier = small_tier if best is not None and best.similarity >= threshold else large_tier
        counts[tier] = counts.get(tier, 0) + 1
        try:
            backend, generation = await router.dispatchers[tier].generate(item.text, item.max_new_tokens)
        except BackendError:
            return _failed(item, system, phase)
        condition: Condition = "large" if tier == large_tier else "small_alone"
        return _served(
            item,
            system,
            phase,
            sent=sent,
            done=clock(),
            tier=backend.tier,
            backend=backend.name,
            condition=condition,
            quality=quality,
            generate_ms=generation.latency_s * 1e3,
        )

    return handle
