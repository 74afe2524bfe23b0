"""faust's aiokafka transport with a configurable consumer fetch wait (``kafka.fetch_max_wait_ms``).

faust hard-codes ``fetch_max_wait_ms=1500`` for its worker consumer. A Kafka broker answers a fetch as
soon as ``fetch_min_bytes`` (1) have arrived, so on Kafka the wait only bounds idle polling. The local
Tansu broker answers a fetch later the longer the wait, even when records arrive meanwhile, so there
the wait sets the latency of every topic hop (about 0.4 s per hop at faust's 1500 ms; 3.5 ms at 25 ms:
BENCHMARKS.md, "Kafka hop"). The request path's setting, used by faust workers and by ``EchoClient``
(consumers off the request path use ``kafka.background_fetch_max_wait_ms``).
"""

from __future__ import annotations

from typing import Any

import aiokafka
import faust
from faust.transport.consumer import RecordMap
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from infra.liveness import Liveness

__all__ = ["install_fetch_wait", "install_liveness"]


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    fetch_max_wait_ms: int = 1500

    async def getmany(
        self,
        active_partitions: set[TP] | None,
        timeout: float,  # noqa: ASYNC109 - faust's signature
    ) -> RecordMap:
        records = await super().getmany(active_partitions, timeout)
        # a fetch returned: the consumer is progressing (infra/liveness.py); read at each fetch, so
        # install_liveness works whenever it is called before the app starts
        liveness: Liveness | None = getattr(self.consumer, "liveness", None)
        if liveness is not None:
            liveness.polled(sum(len(batch) for batch in records.values()))
        return records

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # read once, when the consumer starts and builds its Fetcher (aiokafka keeps it under this name)
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    fetch_max_wait_ms: int = 1500
    liveness: Liveness | None = None

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        thread = _ConsumerThread(self, loop=self.loop, beacon=self.beacon)
        thread.fetch_max_wait_ms = self.fetch_max_wait_ms
        return thread


def install_fetch_wait(app: faust.App, fetch_max_wait_ms: int) -> None:
    """Give ``app`` a consumer transport whose consumers wait at most ``fetch_max_wait_ms`` per fetch.

    Call before the app starts (before anything touches ``app.transport``'s consumer).
    """
    consumer_cls = type("Consumer", (_Consumer,), {"fetch_max_wait_ms": int(fetch_max_wait_ms)})
    transport_cls = type("Transport", (faust_aiokafka.Transport,), {"Consumer": consumer_cls})
    app.transport = transport_cls(app.conf.broker_consumer, app)


def install_liveness(app: faust.App, liveness: Liveness) -> None:
    """Make the consumer of ``app`` (after ``install_fetch_wait``) report every fetch to ``liveness``.

    Call before the app starts.
    """
    consumer_cls = app.transport.Consumer
    if not issubclass(consumer_cls, _Consumer):
        raise TypeError("install_liveness needs the transport of install_fetch_wait; call that first")
    consumer_cls.liveness = liveness
