"""Per-backend circuit breakers: a pure state machine, ``now`` always passed in.

``now`` must be one monotonic clock (the probe's, that of ``QueueDepth.at``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CircuitBreaker", "CircuitState"]


# ---------------------------------------------------------------------------------------- breakers
CircuitState = Literal["closed", "open", "half_open"]


@dataclass
class _Circuit:
    state: CircuitState = "closed"
    failures: int = 0
    opened_at: float = 0.0
    probe_at: float | None = None


class CircuitBreaker:
    """Per-backend circuit breakers, a pure state machine (``now`` is always passed in)::

        closed --(failures consecutive failures)--> open
        open --(reset_s elapsed)--> half_open
        half_open --record_attempt--> (one probe in flight; others still kept out)
        half_open --success--> closed        half_open --failure--> open (timer restarts)

    ``open_backends(now)`` is what routing must avoid: open circuits and half-open ones whose probe is
    in flight. Call ``record_attempt(backend, now)`` when dispatching, so a half-open circuit lets
    exactly one probe through; a probe that never reports is forgotten after ``probe_timeout_s``
    (default ``reset_s``) and another may go. A success while open (a reply to a request sent before
    the circuit opened) is ignored; so is a late failure, which does not restart the timer.
    """

    def __init__(
        self, *, failures: int = 3, reset_s: float = 5.0, probe_timeout_s: float | None = None
    ) -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError(f"need failures >= 1 and reset_s > 0, got {failures} and {reset_s}")
        self.failures = failures
        self.reset_s = reset_s
        self.probe_timeout_s = reset_s if probe_timeout_s is None else probe_timeout_s
        self._circuits: dict[str, _Circuit] = {}

    def _advance(self, backend: str, now: float) -> _Circuit:
        c = self._circuits.setdefault(backend, _Circuit())
        if c.state == "open" and now - c.opened_at >= self.reset_s:
            c.state, c.probe_at = "half_open", None
        elif c.state == "half_open" and c.probe_at is not None and now - c.probe_at >= self.probe_timeout_s:
            c.probe_at = None
        return c

    def state(self, backend: str, now: float) -> CircuitState:
        return self._advance(backend, now).state

    def record_attempt(self, backend: str, now: float) -> None:
        c = self._advance(backend, now)
        if c.state == "half_open" and c.probe_at is None:
            c.probe_at = now

    def record_success(self, backend: str, now: float) -> None:
        c = self._advance(backend, now)
        if c.state != "open":
            c.state, c.failures, c.probe_at = "closed", 0, None

    def record_failure(self, backend: str, now: float) -> None:
        c = self._advance(backend, now)
        if c.state == "half_open":
            c.state, c.opened_at, c.probe_at = "open", now, None
        elif c.state == "closed":
            c.failures += 1
            if c.failures >= self.failures:
                c.state, c.opened_at = "open", now

    def open_backends(self, now: float) -> set[str]:
        out: set[str] = set()
        for name in self._circuits:
            c = self._advance(name, now)
            if c.state == "open" or (c.state == "half_open" and c.probe_at is not None):
                out.add(name)
        return out
