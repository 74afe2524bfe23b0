"""Worker liveness (infra/liveness.py): ``/livez`` fails when the event loop stops ticking or the
consumer stops fetching, not merely when a thread dies; the worker wires both signals in."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka

from devstack.process import free_port
from echolm.app import build_app
from echolm.worker import watch_liveness
from infra.liveness import Liveness
from infra.metrics import Metrics, serve_metrics
from infra.settings import load_settings
from tests.fakes.backends import fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_fresh_worker_is_live_and_a_stopped_loop_or_consumer_is_not(clock: Clock) -> None:
    live = Liveness(max_tick_age_s=10, max_poll_age_s=30, clock=clock)
    assert live.report().ok
    clock.now += 11  # the loop stopped ticking; the consumer fetched meanwhile
    live.polled(3)
    report = live.report()
    assert not report.ok
    assert report.reasons == ("event loop: no tick for 11.0s (limit 10s)",)
    live.tick()
    assert live.report().ok
    clock.now += 31  # the loop ticks, the consumer hangs
    live.tick()
    report = live.report()
    assert not report.ok
    assert report.reasons == ("consumer: no fetch for 31.0s (limit 30s)",)
    live.polled(0)  # an empty fetch is progress too
    assert live.report().ok
    assert (live.report().polls, live.report().records_fetched) == (2, 3)


@pytest.fixture
def server_port(clock: Clock) -> Iterator[tuple[int, Liveness, Metrics]]:
    live = Liveness(max_tick_age_s=10, max_poll_age_s=30, clock=clock)
    metrics = Metrics()
    port = free_port()
    server = serve_metrics(metrics, port, "127.0.0.1", liveness=live)
    assert server is not None
    yield port, live, metrics
    server.shutdown()
    server.server_close()


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_livez_answers_200_while_live_and_503_once_stale(
    server_port: tuple[int, Liveness, Metrics], clock: Clock
) -> None:
    port, _live, metrics = server_port
    status, body = _get(port, "/livez")
    assert status == 200
    assert json.loads(body)["ok"] is True
    clock.now += 60
    status, body = _get(port, "/livez")
    assert status == 503
    assert len(json.loads(body)["reasons"]) == 2
    metrics.requests.labels("ok").inc()  # /metrics is still the Prometheus exposition
    status, body = _get(port, "/metrics")
    assert status == 200
    assert b'echolm_requests_total{outcome="ok"} 1.0' in body


async def test_the_worker_feeds_liveness_from_its_loop_timer_and_its_consumer_fetches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(kafka={"topic_prefix": "unit"}, worker={"liveness_tick_s": 0.5})
    factories = fake_factories(embedder=FakeEmbedder(8), store=FakeVectorStore(8), generators=[], probe=None)
    app = build_app(settings, factories=factories).app
    tasks_before = len(app._app_tasks)
    live = watch_liveness(app, settings)
    timers = app._app_tasks[tasks_before:]  # what app.timer registered (started with the app)
    assert [(timer.__module__, timer.__name__) for timer in timers] == [("echolm.worker", "tick")]

    async def fetched(self: object, active_partitions: object, wait: float) -> dict[str, list[int]]:
        return {"tp-0": [1, 2], "tp-1": [3]}

    monkeypatch.setattr(faust_aiokafka.AIOKafkaConsumerThread, "getmany", fetched)
    thread = app.consumer._thread  # type: ignore[attr-defined]  # faust's ThreadDelegateConsumer
    await thread.getmany(None, 0.1)
    assert (live.polls, live.records_fetched) == (1, 3)
