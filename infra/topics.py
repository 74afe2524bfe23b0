"""Which topics exist on the broker, cached briefly, so a request naming a reply topic that does not
exist is rejected (error reply on the default topic + dead letter) instead of silently auto-creating
a topic nobody reads.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

__all__ = ["TopicDirectory"]


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
