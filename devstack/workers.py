"""Worker subprocesses: ``python -m echolm.cli worker`` with the given settings, for ``echolm up``,
the integration tests and the benchmarks.

The child gets the settings as ``ECHOLM_<SECTION>`` JSON variables (``settings.child_env``), so it
loads exactly what the parent holds. Readiness is faust's own "Ready" log line, which it prints once
the consumer has joined the group and agents are running.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

from infra.settings import Settings, child_env

from .process import ChildProcess

__all__ = ["WorkerProcess", "WorkerStartError"]

# Both must appear: faust's consumer joined and resumed ("Worker ready"), and our adapters opened.
_READY_MARKERS = ("Worker ready", "echolm resources ready")


class WorkerStartError(RuntimeError):
    pass


class WorkerProcess(ChildProcess):
    """``python -m echolm.cli worker`` in its own session, configured through ``child_env(settings)``."""

    error = WorkerStartError
    tail_lines = 40

    def __init__(
        self, settings: Settings, *, log_path: Path, role: str | None = None, name: str = "worker"
    ) -> None:
        super().__init__(log_path=log_path, stop_timeout_s=30.0)
        self.settings = settings
        self.role = role
        self.name = name

    def start(self) -> None:
        """Spawn the worker unless it runs (idempotent); ``wait_ready`` waits for it."""
        args = [sys.executable, "-m", "echolm.cli", "worker"]
        if self.role:
            args += ["--role", self.role]
        # our own interpreter and module (S603 is ignored repo-wide)
        self._spawn(args, env=child_env(self.settings))

    async def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._raise_if_exited(self.name, "during start-up")
            with contextlib.suppress(OSError):
                text = self.log_path.read_text(errors="replace")
                if all(marker in text for marker in _READY_MARKERS):
                    return
            await asyncio.sleep(0.2)
        raise WorkerStartError(
            f"{self.name} not ready after {timeout_s}s; last log lines ({self.log_path}):\n{self.log_tail()}"
        )

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout_s``. Idempotent."""
        self.stop_timeout_s = timeout_s
        return await self.astop()
