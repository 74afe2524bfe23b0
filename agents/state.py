"""The learned and per-worker decision state the agents share: the router's bandit, the utility
model and its threshold, circuit breakers, the replay queue and recent decisions (for feedback).

Pure policy objects live in ``agents.policy``; this module only holds them, persists them to the
paths in settings (JSON, written atomically) and reloads them on start.

**One rating per (request id, rater) is applied once.** ``claim_rating`` is the gate every model update
passes (``agents.models.apply_update``): the keys of the last ``routing.feedback_window`` ratings
applied are kept in an LRU that is saved in the same atomic checkpoint as the bandit and
``applied_offset``. A feedback record redelivered to ``learn`` (a crash before its offset was
committed, a rebalance) publishes a second, identical update; it is skipped here. After a restart the
worker reloads the bandit, the offset and the keys together and replays ``model-updates`` after that
offset, so every update is applied exactly once to the state it restores. (Feedback only joins while
its decision is in the window of the same size, so an older rating is dropped before it gets here.)
"""

from __future__ import annotations

import heapq
import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from agents.policy.routing import BackendView, CircuitBreaker, LinUCBBandit
from agents.policy.utility import ThresholdTuner, UtilityModel
from agents.priors import load_priors
from infra.settings import Settings

__all__ = ["DecisionState", "RecentDecision", "ReplayQueue"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecentDecision:
    tier: str
    context: np.ndarray
    example_ids: tuple[str, ...]
    example_features: tuple[np.ndarray, ...]
    utilities: tuple[float, ...] = ()
    tenant: str = ""  # the request's tenant: feedback is accepted from it only


class ReplayQueue:
    """A bounded max-heap of (gain, tenant, example_id) candidates for replay, deduplicated."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._heap: list[tuple[float, str, str]] = []
        self._best: dict[tuple[str, str], float] = {}

    def push(self, tenant: str, example_id: str, gain: float) -> None:
        key = (tenant, example_id)
        if self._best.get(key, -1.0) >= gain:
            return
        self._best[key] = gain
        heapq.heappush(self._heap, (-gain, tenant, example_id))
        if len(self._heap) > 2 * self.capacity:
            self._heap = heapq.nsmallest(self.capacity, self._heap)
            heapq.heapify(self._heap)
            self._best = {(t, e): -g for g, t, e in self._heap}

    def pop(self, k: int) -> list[tuple[str, str, float]]:
        out: list[tuple[str, str, float]] = []
        while self._heap and len(out) < k:
            g, tenant, example_id = heapq.heappop(self._heap)
            if self._best.get((tenant, example_id)) == -g:
                del self._best[(tenant, example_id)]
                out.append((tenant, example_id, -g))
        return out

    def __len__(self) -> int:
        return len(self._best)


@dataclass
class DecisionState:
    settings: Settings
    bandit: LinUCBBandit
    utility: UtilityModel
    tuner: ThresholdTuner
    breaker: CircuitBreaker
    backends: tuple[BackendView, ...]
    replay_queue: ReplayQueue = field(default_factory=ReplayQueue)
    recent: OrderedDict[str, RecentDecision] = field(default_factory=OrderedDict)
    training_x: list[np.ndarray] = field(default_factory=list)
    training_y: list[float] = field(default_factory=list)
    token_budget: int = 1024
    recent_capacity: int = 50_000
    updates_since_save: int = 0
    applied_offset: int = -1  # last model-updates offset applied (saved with the checkpoint)
    applied_ratings: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)
    duplicate_ratings: int = 0  # updates skipped by claim_rating (since start)

    @classmethod
    def create(cls, settings: Settings) -> DecisionState:
        backends = tuple(BackendView.from_settings(b) for b in settings.tgi.backends)
        bandit = LinUCBBandit.from_settings(
            settings.tgi.backends,
            settings.routing,
            large_tier=settings.tgi.large_tier,
            measured=load_priors(settings.routing),
        )
        state = cls(
            settings=settings,
            bandit=bandit,
            utility=UtilityModel.prior(settings.selection.prior_similarity),
            tuner=ThresholdTuner(threshold=settings.selection.utility_threshold),
            breaker=CircuitBreaker(
                failures=settings.tgi.circuit_failures, reset_s=settings.tgi.circuit_reset_s
            ),
            backends=backends,
            recent_capacity=settings.routing.feedback_window,
        )
        state.load()
        return state

    # -- feedback joins -------------------------------------------------------------------------
    def remember(self, request_id: str, decision: RecentDecision) -> None:
        self.recent[request_id] = decision
        self.recent.move_to_end(request_id)
        while len(self.recent) > self.recent_capacity:
            self.recent.popitem(last=False)

    def has_rating(self, request_id: str, rater: str) -> bool:
        return (request_id, rater) in self.applied_ratings

    def claim_rating(self, request_id: str, rater: str) -> bool:
        """True the first time a (request id, rater) rating is seen; False (and counted) after that."""
        key = (request_id, rater)
        if key in self.applied_ratings:
            self.applied_ratings.move_to_end(key)
            self.duplicate_ratings += 1
            return False
        self.applied_ratings[key] = None
        while len(self.applied_ratings) > self.recent_capacity:
            self.applied_ratings.popitem(last=False)
        return True

    def add_training(self, features: np.ndarray, label: float, cap: int = 20_000) -> None:
        self.training_x.append(features)
        self.training_y.append(label)
        if len(self.training_x) > cap:
            del self.training_x[: len(self.training_x) - cap]
            del self.training_y[: len(self.training_y) - cap]

    def retrain_utility(self, min_rows: int = 32) -> bool:
        """Refit the utility model on the feedback collected so far; False if too little data."""
        labels = set(self.training_y)
        if len(self.training_y) < min_rows or len(labels) < 2:
            return False
        model = UtilityModel.prior(self.settings.selection.prior_similarity)
        model.fit(np.vstack(self.training_x), np.asarray(self.training_y, dtype=np.float64))
        self.utility = model
        return True

    # -- persistence ------------------------------------------------------------------------------
    def _paths(self) -> tuple[Path | None, Path | None]:
        return self.settings.routing.state_path, self.settings.selection.utility_model_path

    def load(self) -> None:
        bandit_path, utility_path = self._paths()
        if bandit_path and bandit_path.is_file():
            data = orjson.loads(bandit_path.read_bytes())
            self.bandit = LinUCBBandit.from_dict(
                data["bandit"], example_boost=self.settings.routing.example_boost
            )
            self.applied_offset = int(data.get("applied_offset", -1))
            self.applied_ratings = OrderedDict(
                ((str(request_id), str(rater)), None) for request_id, rater in data.get("applied_ratings", [])
            )
            log.info("router state loaded from %s", bandit_path)
        if utility_path and utility_path.is_file():
            data = orjson.loads(utility_path.read_bytes())
            self.utility = UtilityModel.from_dict(data["model"])
            self.tuner = ThresholdTuner(threshold=float(data.get("threshold", self.tuner.threshold)))
            log.info("utility model loaded from %s", utility_path)

    def save(self) -> None:
        bandit_path, utility_path = self._paths()
        if bandit_path:
            _write_atomic(
                bandit_path,
                {
                    "bandit": self.bandit.to_dict(),
                    "applied_offset": self.applied_offset,
                    "applied_ratings": list(self.applied_ratings),
                },
            )
        if utility_path:
            _write_atomic(utility_path, {"model": self.utility.to_dict(), "threshold": self.tuner.threshold})
        self.updates_since_save = 0


def _write_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY))
    Path(tmp).replace(path)
