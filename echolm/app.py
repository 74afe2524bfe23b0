"""The worker's composition root: the one place that wires every layer together.

    infra (adapters, settings)  <  streams (faust app, topics)  <  agents (behaviour)  <  echolm

``build_app(settings)`` builds the faust app and its topics (``streams.app``), the adapters' owner
(``infra.resources.Resources``, started and stopped with the app as a faust service) and registers
the agents for ``worker.role`` (or ``agents``). Lower layers never import upward; tests build a
fresh worker with fake adapters through the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust

from agents import register_agents
from agents.state import DecisionState
from infra.metrics import Metrics
from infra.resources import AdapterFactories, Resources
from infra.settings import Settings
from streams.app import build_faust_app
from streams.topology import Topics

__all__ = ["WorkerApp", "build_app"]


@dataclass(frozen=True)
class WorkerApp:
    """What ``build_app`` wired: the app, its topics, the adapters' owner and the shared decision state."""

    app: faust.App
    topics: Topics
    resources: Resources
    state: DecisionState


def build_app(
    settings: Settings,
    *,
    factories: AdapterFactories | None = None,
    metrics: Metrics | None = None,
    agents: tuple[str, ...] | None = None,
) -> WorkerApp:
    """Build the worker app. ``agents`` limits which agents register (default: by ``worker.role``)."""
    app, topics = build_faust_app(settings)
    resources = Resources(settings, factories=factories, metrics=metrics)
    # faust annotates ``service`` for a class, but also starts an instance (App._prepare_subservice)
    app.service(resources)  # type: ignore[arg-type]
    state = register_agents(app, topics, resources, only=agents)
    return WorkerApp(app=app, topics=topics, resources=resources, state=state)
