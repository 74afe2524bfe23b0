"""Every topic, declared once: name, partitions, key and value types.

::

    echolm.requests   raw JSON from clients  -> prepare (embed, retrieve, select)
    echolm.prepared   PreparedRecord         -> serve   (route, generate, emit)
    echolm.replies    ReplyRecord            -> clients (a request may name echolm.replies.<suffix>)
    echolm.log        LogRecord              -> admit, replay, feedback join, cache rebuild
    echolm.feedback   FeedbackRecord         -> feedback (bandit and utility-model updates)
    echolm.deadletter DeadLetterRecord       -> operators (bad input with its coordinates)
    echolm.model-updates ModelUpdateRecord   -> every worker (learned router/utility updates, 1 partition)
    echolm.answered   AnsweredRecord         -> every worker's serve (answers by request id; compacted:
                                                an answered request is re-sent, never generated again)

Requests, prepared records and answers are keyed by request id, so partitions spread load evenly;
the log is keyed by tenant so one tenant's history is ordered. ``topic_configs`` names the topics that
need broker-side configuration at creation (the answered topic is compacted, with a retention that
bounds it: ``cleanup.policy=compact,delete``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust

from infra.settings import Settings

from .records import (
    AnsweredRecord,
    DeadLetterRecord,
    FeedbackRecord,
    LogRecord,
    ModelUpdateRecord,
    PreparedRecord,
    ReplyRecord,
)

__all__ = ["ANSWERED_RETENTION_MS", "TOPIC_NAMES", "Topics", "declare_topics", "topic_configs", "topic_specs"]

TOPIC_NAMES = (
    "requests", "prepared", "replies", "log", "feedback", "deadletter", "model-updates", "answered",
)  # fmt: skip
_SINGLE_PARTITION = frozenset({"deadletter", "model-updates"})
# One day: far past any idempotency.horizon_s a worker would use; compaction keeps one answer per id.
ANSWERED_RETENTION_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Topics:
    requests: faust.TopicT
    prepared: faust.TopicT
    replies: faust.TopicT
    log: faust.TopicT
    feedback: faust.TopicT
    deadletter: faust.TopicT
    model_updates: faust.TopicT
    answered: faust.TopicT

    def reply_topic(self, app: faust.App, name: str) -> faust.TopicT:
        """The reply topic a request named (already validated by records.reply_topic_allowed)."""
        if name == self.replies.get_topic_name():
            return self.replies
        return app.topic(name, key_type=str, value_type=ReplyRecord, partitions=1, internal=False)


def topic_specs(settings: Settings) -> dict[str, int]:
    """Topic name -> partitions, for creating topics up front (auto-create gives the wrong count)."""
    p = settings.kafka.partitions
    return {settings.topic(n): (1 if n in _SINGLE_PARTITION else p) for n in TOPIC_NAMES}


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Topic name -> broker configuration to create it with (topics not named take the defaults)."""
    return {
        settings.topic("answered"): {
            "cleanup.policy": "compact,delete",
            "retention.ms": str(ANSWERED_RETENTION_MS),
        }
    }


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    specs = topic_specs(settings)

    def topic(name: str, **kw: Any) -> faust.TopicT:
        full = settings.topic(name)
        return app.topic(full, partitions=specs[full], replicas=settings.kafka.replication_factor, **kw)

    return Topics(
        requests=topic(
            "requests", key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw"
        ),
        prepared=topic("prepared", key_type=str, value_type=PreparedRecord),
        replies=topic("replies", key_type=str, value_type=ReplyRecord),
        log=topic("log", key_type=str, value_type=LogRecord),
        feedback=topic("feedback", key_type=str, value_type=FeedbackRecord),
        deadletter=topic("deadletter", key_type=str, value_type=DeadLetterRecord),
        model_updates=topic("model-updates", key_type=str, value_type=ModelUpdateRecord),
        answered=topic("answered", key_type=str, value_type=AnsweredRecord),
    )
