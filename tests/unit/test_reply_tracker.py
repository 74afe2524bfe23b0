"""``ReplyTracker`` (echolm/pending.py): every structure an ``EchoClient`` keeps stays bounded.

The 100k test is the issue's scenario, on the pure bookkeeping: requests that never get a reply, sent
faster than they expire. The integration test in tests/integration/test_client.py repeats it at a
smaller scale through a real broker.
"""

from __future__ import annotations

import pytest

from echolm.pending import Outcome, ReplyTracker
from infra.errors import ClientOverloaded


def test_100k_unanswered_requests_keep_every_structure_bounded() -> None:
    tracker = ReplyTracker(max_outstanding=5_000, remember_answered=1_000, remember_expired=2_000)
    deadline_s, rate_per_s = 1.0, 2_000.0  # 2,000 live at a time: under the cap, so nothing is refused
    largest: dict[str, int] = {}
    for i in range(100_000):
        now = i / rate_per_s
        tracker.expire(now)
        tracker.track(f"r{i}", now=now, expires_at=now + deadline_s)
        for name, size in tracker.sizes().items():
            largest[name] = max(largest.get(name, 0), size)
    assert largest["outstanding"] <= deadline_s * rate_per_s + 1
    assert largest["expiries"] <= 2 * largest["outstanding"] + 64
    assert largest["expired"] <= 2_000
    assert largest["answered"] == 0
    tracker.expire(100_000 / rate_per_s + deadline_s)
    assert tracker.outstanding == 0
    assert tracker.expired == 100_000
    assert tracker.sizes()["expiries"] == 0


def test_answered_requests_leave_the_expiry_heap_bounded_too() -> None:
    tracker = ReplyTracker(max_outstanding=100, remember_answered=50)
    for i in range(100_000):  # long deadlines, answered at once: the heap holds only lazy entries
        tracker.track(f"r{i}", now=float(i), expires_at=float(i) + 3600.0)
        assert tracker.resolve(f"r{i}", now=float(i) + 0.5).outcome is Outcome.DELIVER
    sizes = tracker.sizes()
    assert sizes["outstanding"] == 0
    assert sizes["expiries"] <= 64
    assert sizes["answered"] == 50


def test_past_max_outstanding_send_is_refused_until_something_expires() -> None:
    tracker = ReplyTracker(max_outstanding=3)
    for i in range(3):
        tracker.track(f"r{i}", now=0.0, expires_at=10.0)
    with pytest.raises(ClientOverloaded, match=r"client\.max_outstanding=3"):
        tracker.track("r3", now=5.0, expires_at=15.0)
    tracker.track("r3", now=10.0, expires_at=20.0)  # the first three expired at 10
    assert tracker.outstanding == 1
    assert tracker.expired == 3


def test_each_id_is_delivered_once_and_late_or_foreign_replies_are_counted() -> None:
    tracker = ReplyTracker()
    tracker.track("a", now=0.0, expires_at=5.0)
    tracker.track("b", now=0.0, expires_at=5.0)
    tracker.track("c", now=0.0, expires_at=60.0)
    first = tracker.resolve("a", now=1.5)
    assert first.outcome is Outcome.DELIVER
    assert first.latency_s == pytest.approx(1.5)
    assert tracker.resolve("a", now=2.0).outcome is Outcome.DUPLICATE
    assert tracker.expire(5.0) == ["b"]
    assert tracker.resolve("b", now=6.0).outcome is Outcome.LATE
    tracker.abandon("c")  # ask() gave up
    assert tracker.resolve("c", now=7.0).outcome is Outcome.LATE
    assert tracker.resolve("someone-else", now=7.0).outcome is Outcome.UNKNOWN
    assert (tracker.duplicates, tracker.late, tracker.expired, tracker.unknown) == (1, 2, 2, 1)


def test_a_resuming_client_adopts_replies_to_its_earlier_run_once() -> None:
    tracker = ReplyTracker(adopt_unknown=True)
    assert tracker.resolve("from-before-restart", now=0.0).outcome is Outcome.DELIVER
    assert tracker.resolve("from-before-restart", now=1.0).outcome is Outcome.DUPLICATE


def test_ids_must_be_unique_while_outstanding() -> None:
    tracker = ReplyTracker()
    tracker.track("a", now=0.0, expires_at=1.0)
    with pytest.raises(ValueError, match="already outstanding"):
        tracker.track("a", now=0.0, expires_at=1.0)
