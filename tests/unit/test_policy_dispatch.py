"""``agents.policy.dispatch.next_step``: route, back off or give up, one table row per rule."""

from __future__ import annotations

import pytest

from agents.policy.dispatch import (
    Attempt,
    AttemptError,
    Backoff,
    GiveUp,
    RetrySettings,
    Route,
    Step,
    attempt_timeout,
    next_step,
)

RETRY = RetrySettings(retries=2, backoff_s=0.1, min_attempt_s=0.2)
NONE: frozenset[str] = frozenset()
A, B = "backend-a", "backend-b"
ROUTING = AttemptError(code="no_backend_available")
OVERLOADED = AttemptError(code="backend_overloaded", backend=A)
TIMED_OUT = AttemptError(code="backend_timeout", timed_out=True, backend=A)
REJECTED = AttemptError(code="backend_rejected", retriable=False, backend=A)
REJECTED_TIMEOUT = AttemptError(code="backend_timeout", retriable=False, timed_out=True, backend=A)


@pytest.mark.parametrize(
    ("attempt", "error", "time_left_s", "expected"),
    [
        # 1. nothing failed yet: route, keeping the round's exclusions
        pytest.param(Attempt(), None, 30.0, Route(NONE), id="first-route"),
        pytest.param(Attempt(), None, None, Route(NONE), id="first-route-no-deadline"),
        pytest.param(
            Attempt(1, frozenset({A})), None, 30.0, Route(frozenset({A})), id="route-keeps-excluded"
        ),
        # 2. a fresh round finds nothing: give up at once
        pytest.param(Attempt(), ROUTING, 30.0, GiveUp("no_backend_available"), id="none-configured"),
        pytest.param(
            Attempt(2), ROUTING, 30.0, GiveUp("no_backend_available"), id="after-backoff-still-none"
        ),
        # 3. the round's backends all failed: back off 100 ms doubling, when it fits
        pytest.param(Attempt(1, frozenset({A})), ROUTING, 30.0, Backoff(0.1), id="backoff-first-round"),
        pytest.param(Attempt(2, frozenset({A, B})), ROUTING, 30.0, Backoff(0.2), id="backoff-doubles"),
        pytest.param(Attempt(3, frozenset({A, B})), ROUTING, None, Backoff(0.4), id="backoff-no-deadline"),
        pytest.param(Attempt(1, frozenset({A})), ROUTING, 0.31, Backoff(0.1), id="backoff-just-fits"),
        pytest.param(
            Attempt(1, frozenset({A})),
            ROUTING,
            0.3,
            GiveUp("no_backend_available"),
            id="backoff-does-not-fit",
        ),
        pytest.param(
            Attempt(1, frozenset({A})),
            ROUTING,
            -1.0,
            GiveUp("no_backend_available"),
            id="routing-past-deadline",
        ),
        # 4. a non-retriable backend error: give up
        pytest.param(Attempt(1), REJECTED, 30.0, GiveUp("no_backend_available"), id="non-retriable"),
        pytest.param(
            Attempt(1), REJECTED_TIMEOUT, 0.1, GiveUp("deadline_exceeded"), id="non-retriable-timeout-late"
        ),
        # 5. retries + 1 generations started: give up; the code says whether time ran out in a generation
        pytest.param(
            Attempt(3, frozenset({A})), OVERLOADED, 30.0, GiveUp("no_backend_available"), id="spent"
        ),
        pytest.param(Attempt(3), TIMED_OUT, 30.0, GiveUp("no_backend_available"), id="spent-timeout-early"),
        pytest.param(Attempt(3), TIMED_OUT, 0.3, GiveUp("deadline_exceeded"), id="spent-timeout-late"),
        pytest.param(Attempt(3), OVERLOADED, 0.1, GiveUp("no_backend_available"), id="spent-429-late"),
        # 6. no time left for another generation
        pytest.param(Attempt(1), OVERLOADED, 0.0, GiveUp("deadline_exceeded"), id="deadline-gone-429"),
        pytest.param(Attempt(1), TIMED_OUT, -0.5, GiveUp("deadline_exceeded"), id="deadline-gone-timeout"),
        # 7. a retriable error with retries left: route again without that backend
        pytest.param(Attempt(1), OVERLOADED, 30.0, Route(frozenset({A})), id="retry-elsewhere"),
        pytest.param(Attempt(1), TIMED_OUT, None, Route(frozenset({A})), id="retry-no-deadline"),
        pytest.param(
            Attempt(2, frozenset({B})),
            OVERLOADED,
            0.05,
            Route(frozenset({A, B})),
            id="retry-with-little-time",
        ),
    ],
)
def test_next_step(
    attempt: Attempt, error: AttemptError | None, time_left_s: float | None, expected: Step
) -> None:
    assert next_step(attempt, error, time_left_s, RETRY) == expected


@pytest.mark.parametrize("retries", [0, 1, 4])
def test_a_request_gets_at_most_retries_plus_one_generations(retries: int) -> None:
    settings = RetrySettings(retries=retries)
    attempt, error, generations = Attempt(), None, 0
    backends = [f"b{i}" for i in range(10)]
    while isinstance(step := next_step(attempt, error, 60.0, settings), Route):
        generations += 1
        attempt = Attempt(generations, step.exclude)
        error = AttemptError(code="backend_unavailable", backend=backends[generations - 1])
    assert step == GiveUp("no_backend_available")
    assert generations == retries + 1


@pytest.mark.parametrize(
    ("time_left_s", "request_timeout_s", "expected"),
    [(None, 30.0, 30.0), (100.0, 30.0, 30.0), (2.5, 30.0, 2.5), (-1.0, 30.0, -1.0)],
)
def test_attempt_timeout(time_left_s: float | None, request_timeout_s: float, expected: float) -> None:
    assert attempt_timeout(time_left_s, request_timeout_s) == expected
