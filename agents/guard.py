"""The per-record guard every agent loop runs its handler under, and in-order acks.

faust acks a record in a ``finally`` when the loop body returns *or raises* (faust-streaming #527),
and ``take_events`` acks its whole batch the same way, so a handler that raised, or was cancelled
at shutdown, would leave its offset committable with nothing sent. Two pieces close that:

* ``Guard.run`` runs one record's handler. Any exception but cancellation becomes an error reply
  (when the record has a reply address) and a dead letter with topic, partition, offset, the stage
  that failed and the reason (``Rejecter.fail``); ``echolm_handler_failures_total{stage}`` counts
  it and the loop goes on with the next record. Cancellation (shutdown) propagates untouched: no
  reply, no dead letter, and the record stays un-acked.
* ``AckGate`` holds one extra reference on every record an agent takes (``hold``), so faust's own
  ``finally`` ack never makes it committable, and gives it back (``release``) only once the record
  was handled *and* every earlier record of its partition was: ``AckLedger`` is the pure part.
  faust commits past a single un-acked record at the head of a partition (its gap check in
  ``Consumer._new_offset`` is off by one, and absent before the first commit), so without the
  ordering a record cut at the grace end could be committed over.

Handlers say which stage they are in with ``mark(stage, *request_ids)``, which writes the stage on
the record's ``Trace`` (a context variable the guard sets per record). With ``worker.fault_stages``
non-empty (tests only) ``mark`` also raises ``InjectedFault`` when a request id starts with
``fault-<stage>``: the fault-injection hook of tests/integration/test_guard.py.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import faust

    from infra.resources import Resources
    from streams.records import ReplyAddress

    from .reject import Coordinates, Rejecter

__all__ = [
    "STAGES",
    "AckGate",
    "AckLedger",
    "Guard",
    "InjectedFault",
    "Trace",
    "current_stage",
    "fault_id",
    "mark",
]

log = logging.getLogger(__name__)

STAGES = ("parse", "embed", "retrieve", "select", "route", "generate", "emit", "admit", "learn", "replay")
FAULT_PREFIX = "fault-"

T = TypeVar("T")


class InjectedFault(RuntimeError):
    """Raised by ``mark`` at a stage named in ``worker.fault_stages`` (tests only)."""


@dataclass
class Trace:
    """What the guard knows about the record in hand: the stage its handler reached."""

    stage: str = "receive"
    faults: frozenset[str] = frozenset()


_trace: ContextVar[Trace | None] = ContextVar("echolm_trace", default=None)


def fault_id(stage: str, suffix: str) -> str:
    """A request id that makes ``mark(stage, ...)`` raise when ``stage`` is in ``worker.fault_stages``."""
    return f"{FAULT_PREFIX}{stage}-{suffix}"


def mark(stage: str, *request_ids: str) -> None:
    """The record in hand entered ``stage`` (a no-op outside a guard)."""
    trace = _trace.get()
    if trace is None:
        return
    trace.stage = stage
    if stage in trace.faults:
        prefix = f"{FAULT_PREFIX}{stage}-"
        hit = next((rid for rid in request_ids if rid.startswith(prefix)), None)
        if hit is not None:
            raise InjectedFault(f"fault injected at stage {stage} for request {hit}")


def current_stage() -> str | None:
    trace = _trace.get()
    return trace.stage if trace is not None else None


@dataclass
class _Partition(Generic[T]):
    offsets: list[int] = field(default_factory=list)  # taken and not yet released, sorted
    items: dict[int, T] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)


class AckLedger(Generic[T]):
    """Per partition, the records taken and not yet released, in offset order (pure).

    ``take`` registers a record (concurrent actors may take a partition's records slightly out of
    order: they are kept sorted; the same offset taken again, a redelivery, replaces the first);
    ``finish`` marks one handled and returns the items that may be acked now: the handled prefix of
    their partition, lowest offset first.
    """

    def __init__(self) -> None:
        self._parts: dict[Hashable, _Partition[T]] = {}

    def take(self, tp: Hashable, offset: int, item: T) -> None:
        part = self._parts.setdefault(tp, _Partition())
        if offset not in part.items:
            bisect.insort(part.offsets, offset)
        part.items[offset] = item
        part.done.discard(offset)

    def finish(self, tp: Hashable, offset: int) -> list[T]:
        part = self._parts.get(tp)
        if part is None or offset not in part.items:
            return []
        part.done.add(offset)
        n = 0
        while n < len(part.offsets) and part.offsets[n] in part.done:
            n += 1
        released = [part.items.pop(o) for o in part.offsets[:n]]
        part.done.difference_update(part.offsets[:n])
        del part.offsets[:n]
        return released

    def pending(self) -> int:
        return sum(len(p.offsets) for p in self._parts.values())


class AckGate:
    """Acks an agent's records in offset order, after their handler finished (see the module doc)."""

    def __init__(self, consumer: Callable[[], Any]) -> None:
        self._consumer = consumer
        self.ledger: AckLedger[faust.EventT[Any]] = AckLedger()

    def hold(self, event: faust.EventT[Any]) -> None:
        message = event.message
        message.incref()
        self.ledger.take(message.tp, message.offset, event)

    def release(self, event: faust.EventT[Any]) -> None:
        message = event.message
        for ready in self.ledger.finish(message.tp, message.offset):
            ready.message.ack(self._consumer())


class Guard:
    """Runs one record's handler so that any failure is answered and dead-lettered (module doc)."""

    def __init__(self, res: Resources, rejecter: Rejecter) -> None:
        self.res, self.rejecter = res, rejecter
        self.faults = frozenset(res.settings.worker.fault_stages)

    async def run(
        self,
        handler: Callable[[T], Awaitable[None]],
        item: T,
        *,
        coords: Coordinates,
        address: ReplyAddress | None,
        raw: bytes | str | None = None,
        reply: bool = True,
    ) -> bool:
        """``handler(item)``: True when it returned; False when it raised and the failure was sent
        (the dead letter names ``address``' request; an error reply goes there only with ``reply``).

        Cancellation is re-raised, and so is a failure to send the dead letter itself (the broker
        is gone: the agent's supervisor restarts it and the record, never acked, comes again)."""
        trace = Trace(faults=self.faults)
        token = _trace.set(trace)
        try:
            await handler(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = exc
            log.exception(
                "handler failed at stage %s on %s[%d]@%d",
                trace.stage,
                coords.topic,
                coords.partition,
                coords.offset,
            )
        else:
            return True
        finally:
            _trace.reset(token)
        self.res.metrics.handler_failures.labels(trace.stage).inc()
        await self.rejecter.fail(coords, address, stage=trace.stage, exc=failure, raw=raw, reply=reply)
        return False

    async def run_batch(
        self,
        handler: Callable[[Sequence[faust.EventT[Any]]], Awaitable[None]],
        events: Sequence[faust.EventT[Any]],
        address: Callable[[faust.EventT[Any]], ReplyAddress | None],
        *,
        reply: bool = True,
    ) -> None:
        """``handler`` on the whole batch; if it raises, on each record alone under ``run``, so one
        poisoned record fails alone (records of the batch may then be handled twice: every agent's
        outputs are idempotent by request id or example id)."""
        from .reject import Coordinates

        if len(events) > 1:
            token = _trace.set(Trace(faults=self.faults))
            try:
                await handler(events)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning(
                    "a batch of %d failed; handling its records one at a time", len(events), exc_info=True
                )
            else:
                return
            finally:
                _trace.reset(token)
        for event in events:
            await self.run(
                handler,
                [event],
                coords=Coordinates.of(event),
                address=address(event),
                raw=event.message.value,
                reply=reply,
            )
