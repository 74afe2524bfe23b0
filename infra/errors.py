"""The exception hierarchy. Policy travels on the class, so agents decide by type, not by message.

::

    ServiceError                      base; never raised bare
    ├── BadInput                      the record itself is wrong: reply with an error, dead-letter, go on
    │   ├── DecodeError               not UTF-8 JSON, or not an object
    │   ├── SchemaError               wrong/missing fields, wrong types, unknown version
    │   ├── LimitExceeded             prompt too long, max_new_tokens too high, record too large
    │   ├── UnknownTenant             tenant not in the configured list
    │   ├── ForbiddenReplyTopic       reply topic outside the allowed pattern
    │   └── UnknownReplyTopic         reply topic allowed but absent on the broker
    ├── BackendError                  a TGI backend failed; ``retriable`` says whether to try another
    │   ├── BackendOverloaded         HTTP 429 (retriable)
    │   ├── BackendUnavailable        connection refused, 5xx, open circuit (retriable)
    │   ├── BackendTimeout            no answer before the deadline (retriable)
    │   └── BackendRejected           4xx but 429: the request is wrong for this backend (not retriable)
    ├── NoBackendAvailable            nothing can serve before the deadline: the client gets an error reply
    ├── DependencyUnavailable         Milvus or the embedder is down: selection bypassed, request served
    ├── ClientTimeout                 the EchoClient waited past its timeout for a reply
    └── ClientOverloaded              the EchoClient already waits on client.max_outstanding replies

Every error has a stable ``code`` (used in error replies and dead letters) and a message that says
what happened, the likely cause, and what to do.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendOverloaded",
    "BackendRejected",
    "BackendTimeout",
    "BackendUnavailable",
    "BadInput",
    "ClientOverloaded",
    "ClientTimeout",
    "DecodeError",
    "DependencyUnavailable",
    "ForbiddenReplyTopic",
    "LimitExceeded",
    "NoBackendAvailable",
    "SchemaError",
    "ServiceError",
    "StreamDiverged",
    "Unauthorized",
    "UnknownReplyTopic",
    "UnknownTenant",
]


class ServiceError(Exception):
    code: str = "internal"
    retriable: bool = False


class BadInput(ServiceError):
    code = "bad_input"


class DecodeError(BadInput):
    code = "decode_error"


class SchemaError(BadInput):
    code = "schema_error"


class LimitExceeded(BadInput):
    code = "limit_exceeded"


class UnknownTenant(BadInput):
    code = "unknown_tenant"


class ForbiddenReplyTopic(BadInput):
    code = "forbidden_reply_topic"


class UnknownReplyTopic(BadInput):
    code = "unknown_reply_topic"


class Unauthorized(BadInput):
    """A record that cannot prove its tenant: unsigned, or signed with another secret (infra/signing.py)."""

    code = "unauthorized"


class BackendError(ServiceError):
    code = "backend_error"
    retriable = True

    def __init__(self, message: str, *, backend: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.backend = backend
        self.status = status


class BackendOverloaded(BackendError):
    code = "backend_overloaded"


class BackendUnavailable(BackendError):
    code = "backend_unavailable"


class BackendTimeout(BackendError):
    code = "backend_timeout"


class BackendRejected(BackendError):
    code = "backend_rejected"
    retriable = False


class NoBackendAvailable(ServiceError):
    code = "no_backend_available"


class DependencyUnavailable(ServiceError):
    code = "dependency_unavailable"
    retriable = True


class ClientTimeout(ServiceError):
    code = "client_timeout"


class ClientOverloaded(ServiceError):
    code = "client_overloaded"


class StreamDiverged(ServiceError):
    """A retried generation's text disagrees with what a stream already showed (echolm/streaming.py)."""

    code = "stream_diverged"
