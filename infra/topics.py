"""Topic administration on the broker.

``TopicDirectory``: which topics exist, cached briefly, so a request naming a reply topic that does
not exist is rejected (error reply on the default topic + dead letter) instead of silently
auto-creating a topic nobody reads. ``create_topics``: create the topics with their partition
counts and configuration (``streams.topology.topic_configs``: the compacted answered topic),
idempotently (``echolm topics create``, the local stack, tests and benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

__all__ = ["TopicAdminError", "TopicDirectory", "create_topics"]

log = logging.getLogger(__name__)


class TopicAdminError(RuntimeError):
    """Creating topics failed; the message names the topic, the broker and the broker's error."""


class TopicDirectory:
    def __init__(self, admin_kwargs: dict[str, Any], *, ttl_s: float = 2.0) -> None:
        self._kwargs = admin_kwargs
        self._ttl_s = ttl_s
        self._admin: AIOKafkaAdminClient | None = None
        self._known: set[str] = set()
        self._fetched_at = -1e9
        self._lock = asyncio.Lock()
        self._closed = False

    async def exists(self, topic: str) -> bool:
        if topic in self._known:
            return True
        async with self._lock:
            if time.monotonic() - self._fetched_at >= self._ttl_s:
                if self._admin is None:
                    self._admin = AIOKafkaAdminClient(**self._kwargs)
                    await self._admin.start()
                self._known = set(await self._admin.list_topics())
                self._fetched_at = time.monotonic()
        return topic in self._known

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._admin is not None:
            await self._admin.close()


async def create_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    timeout_s: float = 15.0,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, int]:
    """Create each topic with its partition count and its entry of ``configs`` (e.g.
    ``cleanup.policy``); existing topics are left as they are (idempotent).

    Returns the partition count each topic has afterwards. A topic that already exists with another
    count is logged, not changed (Tansu cannot add partitions; on Kafka use kafka-topics --alter).
    """
    if not topics:
        return {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        configs = configs or {}
        new = [
            NewTopic(name, n, replication_factor, topic_configs=dict(configs.get(name, {})))
            for name, n in topics.items()
            if name not in existing
        ]
        if new:
            response = await admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            for name, code, message in response.topic_errors:
                error = for_code(code)
                if code != 0 and error is not TopicAlreadyExistsError:
                    raise TopicAdminError(
                        f"creating topic {name!r} on {bootstrap_servers} failed: {error.__name__}: {message}"
                    )
        described = await admin.describe_topics(list(topics))
    except KafkaError as exc:
        raise TopicAdminError(
            f"could not create topics on {bootstrap_servers}: {exc}; is the broker running (`echolm up`)?"
        ) from exc
    finally:
        await admin.close()
    actual = {str(t["topic"]): len(t["partitions"]) for t in described}
    for name, wanted in topics.items():
        if actual.get(name, wanted) != wanted:
            log.warning("topic %s has %d partitions, not %d: left as it is", name, actual[name], wanted)
    return actual
