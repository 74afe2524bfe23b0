"""streams/transport.py: faust's worker consumer honours ``kafka.fetch_max_wait_ms`` (faust: 1500 ms)."""

from __future__ import annotations

import pytest

from echolm.app import build_app
from infra.kafka import kafka_consumer_kwargs
from infra.settings import load_settings
from tests.fakes.backends import fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore


@pytest.mark.parametrize("wait_ms", [25, 40, 1500])
async def test_the_worker_consumer_uses_the_configured_fetch_wait(wait_ms: int) -> None:
    settings = load_settings(kafka={"fetch_max_wait_ms": wait_ms, "topic_prefix": "unit"})
    factories = fake_factories(embedder=FakeEmbedder(8), store=FakeVectorStore(8), generators=[], probe=None)
    app = build_app(settings, factories=factories).app
    thread = app.consumer._thread  # type: ignore[attr-defined]  # faust's ThreadDelegateConsumer
    consumer = thread._create_worker_consumer(app.transport)  # built, not started: no broker needed
    try:
        assert consumer._fetch_max_wait_ms == wait_ms
    finally:
        await consumer.stop()


def test_other_consumers_get_it_from_the_consumer_kwargs() -> None:
    settings = load_settings(kafka={"fetch_max_wait_ms": 33})
    assert kafka_consumer_kwargs(settings)["fetch_max_wait_ms"] == 33
    assert kafka_consumer_kwargs(settings)["bootstrap_servers"] == settings.kafka.bootstrap_servers


def test_background_consumers_poll_less_often_than_the_request_path() -> None:
    settings = load_settings(kafka={"fetch_max_wait_ms": 33, "background_fetch_max_wait_ms": 700})
    assert kafka_consumer_kwargs(settings, background=True)["fetch_max_wait_ms"] == 700
    assert kafka_consumer_kwargs(settings)["fetch_max_wait_ms"] == 33


def test_the_answered_feed_is_a_background_consumer() -> None:
    from infra.answered import KafkaAnsweredFeed

    settings = load_settings(kafka={"fetch_max_wait_ms": 33, "background_fetch_max_wait_ms": 700})
    feed = KafkaAnsweredFeed(settings, settings.topic("answered"))
    assert feed._consumer_kwargs()["fetch_max_wait_ms"] == 700
