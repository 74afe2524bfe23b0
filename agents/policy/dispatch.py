"""What ``serve`` does next with one request: route it, back off, or give up (pure, no clock).

``serve`` calls ``next_step`` before every routing decision, with what happened so far:

* ``Attempt``: generations started so far, the backends that failed in the current round;
* the error of the last step (``None`` before the first route and right after a backoff): a routing
  failure (every usable backend excluded or unhealthy) or a backend failure (with its ``retriable``
  flag and whether it was a timeout);
* the seconds left before the request's deadline, less the margin kept for the reply (``None``: no
  deadline);
* ``RetrySettings``: ``tgi.retries`` and the backoff constants.

The rules, in order (the first that applies decides):

1. nothing failed yet -> route, excluding the current round's failed backends;
2. routing found no backend with nothing excluded (none configured, or every circuit open) -> give up;
3. routing found no backend because the round's backends all failed -> back off
   ``backoff_s * 2 ** (generations - 1)``, then a new round (nothing excluded), when the time left
   covers the pause and a minimal attempt; else give up;
4. a non-retriable backend error -> give up;
5. ``retries + 1`` generations started already -> give up;
6. no time left for another generation -> give up with ``deadline_exceeded``;
7. a retriable backend error -> route again without that backend.

Giving up after a backend error answers ``deadline_exceeded`` when the error was a timeout and no
further round would fit before the deadline (rule 6 always does); otherwise, and after a routing
failure, ``no_backend_available``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Attempt",
    "AttemptError",
    "Backoff",
    "GiveUp",
    "GiveUpCode",
    "RetrySettings",
    "Route",
    "Step",
    "attempt_timeout",
    "next_step",
]

GiveUpCode = Literal["no_backend_available", "deadline_exceeded"]


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """``retries``: re-routes after a failed generation (``tgi.retries``); a request gets at most
    ``retries + 1`` generations. ``backoff_s`` doubles per round; no attempt starts with less than
    ``min_attempt_s`` left."""

    retries: int
    backoff_s: float = 0.1
    min_attempt_s: float = 0.2


@dataclass(frozen=True, slots=True)
class Attempt:
    """Where one request stands: generations started and the backends that failed this round."""

    generations: int = 0
    excluded: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AttemptError:
    """What went wrong in the last step. ``backend`` is empty when routing found no backend."""

    code: str
    retriable: bool = True
    timed_out: bool = False
    backend: str = ""

    @property
    def routing(self) -> bool:
        return not self.backend


@dataclass(frozen=True, slots=True)
class Route:
    """Choose a backend among those not in ``exclude``."""

    exclude: frozenset[str]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Wait ``pause_s``, then ask again with a new round (nothing excluded, no error)."""

    pause_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    code: GiveUpCode


Step = Route | Backoff | GiveUp


def _out_of_time(time_left_s: float | None, needed_s: float, settings: RetrySettings) -> bool:
    """Whether ``needed_s`` plus a minimal attempt no longer fit before the deadline's margin."""
    return time_left_s is not None and time_left_s <= needed_s + settings.min_attempt_s


def _give_up(error: AttemptError, time_left_s: float | None, settings: RetrySettings) -> GiveUp:
    if error.timed_out and _out_of_time(time_left_s, settings.backoff_s, settings):
        return GiveUp("deadline_exceeded")
    return GiveUp("no_backend_available")


def _after_routing_failure(attempt: Attempt, time_left_s: float | None, settings: RetrySettings) -> Step:
    if not attempt.excluded:  # a fresh round found nothing: more waiting will not help this request
        return GiveUp("no_backend_available")
    pause = settings.backoff_s * 2 ** max(0, attempt.generations - 1)
    if _out_of_time(time_left_s, pause, settings):
        return GiveUp("no_backend_available")
    return Backoff(pause)


def next_step(
    attempt: Attempt, error: AttemptError | None, time_left_s: float | None, settings: RetrySettings
) -> Step:
    """The next step for one request (module docstring, rules 1-7)."""
    if error is None:
        return Route(attempt.excluded)
    if error.routing:
        return _after_routing_failure(attempt, time_left_s, settings)
    if not error.retriable or attempt.generations >= settings.retries + 1:
        return _give_up(error, time_left_s, settings)
    if time_left_s is not None and time_left_s <= 0:
        return GiveUp("deadline_exceeded")
    return Route(attempt.excluded | {error.backend})


def attempt_timeout(time_left_s: float | None, request_timeout_s: float) -> float:
    """How long one generation may take: the backend timeout, capped by the time left."""
    return request_timeout_s if time_left_s is None else min(request_timeout_s, time_left_s)
