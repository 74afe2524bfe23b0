"""Faust agents: thin I/O shells around the pure decisions in ``agents.policy``.

``register_agents`` wires them into an app by role:

* ``serve``: prepare (parse, embed, retrieve, select) and serve (route, generate, emit);
* ``background``: admit (log -> example bank), learn (feedback joins, model updates), replay and
  maintenance (eviction, cache statistics);
* ``all``: both (the default, and what ``echolm up`` runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import faust

    from infra.resources import Resources
    from streams.topology import Topics

    from .state import DecisionState

__all__ = ["AGENTS_BY_ROLE", "register_agents"]

AGENTS_BY_ROLE = {
    "serve": ("prepare", "serve"),
    "background": ("admit", "learn", "replay", "maintenance"),
    "all": ("prepare", "serve", "admit", "learn", "replay", "maintenance"),
}


def register_agents(
    app: faust.App, topics: Topics, resources: Resources, *, only: tuple[str, ...] | None = None
) -> DecisionState:
    """Register the agents ``only`` names (default: those of ``worker.role``); returns the decision
    state they share (the bandit, backend health), which every worker also syncs and reports."""
    from .admit import register_admit
    from .gauges import register_gauges
    from .learn import register_learn
    from .maintenance import register_maintenance
    from .models import register_model_sync
    from .prepare import register_prepare
    from .replay import register_replay
    from .serve import register_serve
    from .state import DecisionState

    names = only if only is not None else AGENTS_BY_ROLE[resources.settings.worker.role]
    registry = {
        "prepare": register_prepare,
        "serve": register_serve,
        "admit": register_admit,
        "learn": register_learn,
        "replay": register_replay,
        "maintenance": register_maintenance,
    }
    unknown = set(names) - set(registry)
    if unknown:
        raise ValueError(f"unknown agents {sorted(unknown)}; choose from {sorted(registry)}")
    state = DecisionState.create(resources.settings)
    for name in names:
        registry[name](app, topics, resources, state)
    register_model_sync(app, topics, resources, state)  # every worker routes with the shared bandit
    register_gauges(app, topics, resources, state)
    return state
