"""Expected failures of ``echolm`` commands, as one or two lines a person can act on.

``describe(exc, settings)`` maps an exception to a ``CliFailure``: what failed, what to do, and a
distinct exit code (the table below, also in ``echolm --help``). Anything it does not recognise is
a bug and keeps its traceback. ``main`` prints tracebacks of expected failures only under ``-v``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from infra.errors import BackendError, ClientTimeout, DependencyUnavailable, NoBackendAvailable
from infra.settings import Settings

__all__ = ["EXIT_CODES", "CliFailure", "describe"]

EXIT_CODES = {
    "failed": 1,  # a request was answered with an error, or some replies are missing
    "usage": 2,  # bad arguments or configuration
    "broker": 3,  # the Kafka broker cannot be reached
    "milvus": 4,  # Milvus cannot be reached
    "backend": 5,  # a model backend cannot be reached
    "port": 6,  # a port we must listen on is taken
    "input": 7,  # a bad input file, or bad lines in it
    "topic": 8,  # a topic is missing
    "timeout": 9,  # no reply in time
    "stack": 10,  # the local stack failed to start for another reason
    "interrupted": 130,
}


@dataclass(frozen=True)
class CliFailure(Exception):
    """An expected failure: ``what`` failed, ``todo`` says what to do; ``kind`` picks the exit code."""

    kind: str
    what: str
    todo: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]

    def lines(self) -> str:
        return f"error: {self.what}" + (f"\n  -> {self.todo}" if self.todo else "")


def _kafka(exc: BaseException, settings: Settings) -> CliFailure | None:
    from aiokafka.errors import (
        KafkaConnectionError,
        KafkaError,
        KafkaTimeoutError,
        UnknownTopicOrPartitionError,
    )

    servers = settings.kafka.bootstrap_servers
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError):
        return CliFailure(
            "broker",
            f"cannot reach the Kafka broker at {servers}",
            "start it (`echolm up`, or docker compose up) or set ECHOLM_KAFKA__BOOTSTRAP_SERVERS",
        )
    if isinstance(exc, UnknownTopicOrPartitionError):
        return CliFailure("topic", f"a topic is missing on {servers}", "run `echolm topics create`")
    if isinstance(exc, KafkaError):
        return CliFailure("broker", f"the Kafka broker at {servers} failed: {exc}", "check the broker's logs")
    return None


def describe(exc: BaseException, settings: Settings) -> CliFailure | None:
    """The expected failure ``exc`` stands for, or None (a bug: keep the traceback)."""
    if isinstance(exc, CliFailure):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return CliFailure("interrupted", "interrupted")
    kafka = _kafka(exc, settings) or (_kafka(exc.__cause__, settings) if exc.__cause__ else None)
    if kafka is not None:
        return kafka
    return _service_failure(exc, settings) or _local_failure(exc)


def _service_failure(exc: BaseException, settings: Settings) -> CliFailure | None:
    """A timeout, or a service (Milvus, a model backend) that cannot be reached."""
    if isinstance(exc, ClientTimeout):
        return CliFailure(
            "timeout",
            str(exc).split(";")[0],
            "are workers running (`echolm up` or `echolm worker`)? or raise --timeout",
        )
    if isinstance(exc, DependencyUnavailable) and "milvus" in str(exc).lower():
        return CliFailure(
            "milvus",
            f"cannot reach Milvus at {settings.milvus.uri}",
            "start it (`echolm up` starts one) or set ECHOLM_MILVUS__URI (and milvus.token)",
        )
    if isinstance(exc, BackendError | NoBackendAvailable):
        return CliFailure(
            "backend",
            f"a model backend cannot serve: {exc}",
            "check ECHOLM_TGI__BACKENDS and that the servers run",
        )
    return None


def _local_failure(exc: BaseException) -> CliFailure | None:
    """A local cause: the dev stack, a port in use, an unreadable input, a missing topic, HTTP."""
    if _is_local_stack_error(exc):
        kind = "port" if "in use" in str(exc) else "stack"
        what, _, todo = str(exc).partition("; ")
        return CliFailure(kind, what, todo)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return CliFailure(
            "port", f"the address is in use ({exc.strerror})", "stop what listens there or pick another port"
        )
    if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError | UnicodeDecodeError):
        name = getattr(exc, "filename", None) or "the input file"
        return CliFailure(
            "input", f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}", "check the path"
        )
    if isinstance(exc, RuntimeError) and "does not exist" in str(exc) and "topic" in str(exc):
        what, _, todo = str(exc).partition("; ")
        return CliFailure("topic", what, todo or "run `echolm topics create`")
    if type(exc).__module__.startswith(("httpx", "httpcore")):
        return CliFailure(
            "backend", f"an HTTP call failed: {type(exc).__name__}: {exc}", "check the server it names"
        )
    return None


def _is_local_stack_error(exc: BaseException) -> bool:
    """A ``devstack.process.LocalStackError``, recognised by class without importing devstack: the
    runtime sits below the development stack (tests/unit/test_layers.py)."""
    return any(
        cls.__name__ == "LocalStackError" and cls.__module__.startswith("devstack.")
        for cls in type(exc).__mro__
    )
