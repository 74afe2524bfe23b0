"""The bad-input policy shared by every agent: error reply where an address is known, a dead
letter with the record's coordinates always, a log line with topic/partition/offset, and go on.
``fail`` does the same for a handler that raised (agents/guard.py), with the stage it reached.

Both sends are awaited until the broker acknowledges them (``await (await topic.send(...))``),
so the source offset is only committed after the rejection is durable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import faust

from infra.errors import ForbiddenReplyTopic, ServiceError, Unauthorized, UnknownReplyTopic
from infra.resources import Resources
from streams.records import (
    DeadLetterRecord,
    ErrorInfo,
    ReplyAddress,
    ReplyRecord,
    decode_object,
    reply_address,
)
from streams.topology import Topics

__all__ = ["Coordinates", "Rejecter"]

log = logging.getLogger(__name__)
_PREVIEW = 512


@dataclass(frozen=True, slots=True)
class Coordinates:
    topic: str
    partition: int
    offset: int
    key: bytes | str | None = None

    @classmethod
    def of(cls, event: faust.EventT[Any]) -> Coordinates:
        m = event.message
        return cls(topic=m.topic, partition=m.partition, offset=m.offset, key=m.key)


def _preview(raw: bytes | str | None) -> tuple[str, int]:
    if raw is None:
        return "", 0
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    return repr(data[:_PREVIEW])[2:-1], len(data)


def _key_text(key: bytes | str | None) -> str:
    if key is None:
        return ""
    return key.decode("utf-8", "replace")[:256] if isinstance(key, bytes) else str(key)[:256]


class Rejecter:
    def __init__(self, app: faust.App, topics: Topics, resources: Resources) -> None:
        self.app, self.topics, self.res = app, topics, resources

    async def error_reply(
        self,
        *,
        request_id: str,
        tenant: str,
        reply_topic: str,
        error: ServiceError | str,
        code: str | None = None,
        timings_ms: dict[str, float] | None = None,
    ) -> None:
        message = str(error)
        code = code or (error.code if isinstance(error, ServiceError) else "internal")
        reply = ReplyRecord(
            request_id=request_id,
            tenant=tenant,
            ok=False,
            error=ErrorInfo(code=code, message=message),
            timings_ms=timings_ms or {},
            worker=self.res.worker_id,
        )
        topic = self.topics.reply_topic(self.app, reply_topic)
        fut = await topic.send(key=request_id, value=reply)
        await fut

    def address_of(self, raw: bytes | str | None) -> ReplyAddress | None:
        """Best effort: where an error reply for this raw request record can go (None: nowhere)."""
        settings = self.res.settings
        try:
            data = decode_object(raw, settings.limits)
            return reply_address(data, settings.topic("replies"), settings.limits)
        except ServiceError:
            return None

    async def _safe(self, address: ReplyAddress | None, *, shared_only: bool = False) -> ReplyAddress | None:
        """``address``, moved to the shared reply topic when ``shared_only`` or when the topic it names
        does not exist (sending there would auto-create it on brokers that allow it, or fail the send,
        and crash the agent, on brokers that do not)."""
        default = self.res.settings.topic("replies")
        if (
            address is not None
            and address.reply_topic != default
            and (shared_only or not await self.res.topic_directory.exists(address.reply_topic))
        ):
            return replace(address, reply_topic=default)
        return address

    async def _dead_letter(
        self,
        coords: Coordinates,
        address: ReplyAddress | None,
        raw: bytes | str | None,
        *,
        reason: str,
        code: str,
        stage: str = "",
    ) -> Any:
        """Send the dead letter; returns its delivery future (the caller awaits it)."""
        self.res.metrics.dead_letters.labels(code).inc()
        preview, size = _preview(raw)
        letter = DeadLetterRecord(
            source_topic=coords.topic,
            partition=coords.partition,
            offset=coords.offset,
            reason=reason[:2000],
            error_code=code,
            key=_key_text(coords.key),
            value_preview=preview,
            value_bytes=size,
            request_id=address.request_id if address else "",
            tenant=address.tenant if address else "",
            worker=self.res.worker_id,
            at=time.time(),
            stage=stage,
        )
        return await self.topics.deadletter.send(key=letter.request_id or _key_text(coords.key), value=letter)

    async def fail(
        self,
        coords: Coordinates,
        address: ReplyAddress | None,
        *,
        stage: str,
        exc: BaseException,
        raw: bytes | str | None = None,
        reply: bool = True,
    ) -> None:
        """A handler raised at ``stage`` (agents/guard.py): dead letter, and an error reply (``internal``)
        when ``address`` says where and ``reply`` (a record whose request was answered already gets
        none), both awaited to the broker."""
        code = exc.code if isinstance(exc, ServiceError) else "internal"
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        self.res.metrics.requests.labels("failed").inc()
        fut = await self._dead_letter(coords, address, raw, reason=reason, code=code, stage=stage)
        address = await self._safe(address) if reply else None
        if address is not None:
            await self.error_reply(
                request_id=address.request_id,
                tenant=address.tenant,
                reply_topic=address.reply_topic,
                error=f"the request failed at stage {stage} ({reason}); it was dead-lettered",
                code=code,
            )
        await fut

    async def reject(
        self, coords: Coordinates, raw: bytes | str | None, exc: ServiceError, *, reply: bool = True
    ) -> None:
        """Dead-letter one bad record (and reply with the error if the record says where, and ``reply``).

        A record that cannot prove its tenant (``Unauthorized``) or names a reply topic that is not its
        tenant's (``ForbiddenReplyTopic``), or one whose reply topic does not exist, is answered on the
        shared reply topic only, never on the private topic it names (it may be another tenant's)."""
        forged = isinstance(exc, (UnknownReplyTopic, Unauthorized, ForbiddenReplyTopic))
        address = await self._safe(self.address_of(raw), shared_only=forged)
        log.warning(
            "rejected %s[%d]@%d: %s (%s)",
            coords.topic,
            coords.partition,
            coords.offset,
            exc.code,
            exc,
        )
        self.res.metrics.requests.labels(exc.code).inc()
        fut = await self._dead_letter(coords, address, raw, reason=str(exc), code=exc.code)
        if address is not None and reply:
            await self.error_reply(
                request_id=address.request_id,
                tenant=address.tenant,
                reply_topic=address.reply_topic,
                error=exc,
            )
        await fut
