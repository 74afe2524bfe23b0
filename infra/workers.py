"""Worker subprocesses: ``python -m echolm.cli worker`` with the given settings, for ``echolm up``,
the integration tests and the benchmarks.

The child gets the settings as ``ECHOLM_<SECTION>`` JSON variables (``settings.child_env``), so it
loads exactly what the parent holds. Readiness is faust's own "Ready" log line, which it prints once
the consumer has joined the group and agents are running.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

from .processes import log_tail, terminate
from .settings import Settings, child_env

__all__ = ["WorkerProcess", "WorkerStartError"]

# Both must appear: faust's consumer joined and resumed ("Worker ready"), and our adapters opened.
_READY_MARKERS = ("Worker ready", "echolm resources ready")


class WorkerStartError(RuntimeError):
    pass


class WorkerProcess:
    def __init__(
        self, settings: Settings, *, log_path: Path, role: str | None = None, name: str = "worker"
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.role = role
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "echolm.cli", "worker"]
        if self.role:
            args += ["--role", self.role]
        log_file = self.log_path.open("ab")
        self._log_file = log_file
        self.process = subprocess.Popen(  # our own interpreter and module (S603 is ignored repo-wide)
            args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=child_env(self.settings),
            start_new_session=True,
        )

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    async def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise WorkerStartError(
                    f"{self.name} exited with code {self.process.returncode} during start-up; "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                text = self.log_path.read_text(errors="replace")
                if all(marker in text for marker in _READY_MARKERS):
                    return
            await asyncio.sleep(0.2)
        raise WorkerStartError(
            f"{self.name} not ready after {timeout_s}s; last log lines ({self.log_path}):\n{self.log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL: a crash, for fault-injection tests."""
        if self.running and self.process is not None:
            self.process.kill()
            self.process.wait(10)
        self._close_log()

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout_s``. Idempotent."""
        process = self.process
        if process is None:
            return None
        await asyncio.to_thread(terminate, process, timeout_s)
        self._close_log()
        return process.returncode

    def _close_log(self) -> None:
        log_file = self._log_file
        self._log_file = None
        close = getattr(log_file, "close", None)
        if close is not None:
            close()
