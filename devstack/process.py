"""Child processes of the local stack: ports, readiness, termination, and dying with the parent.

Shared by ``devstack/localstack.py`` (the broker and the stack) and ``devstack/milvus_embedded.py`` (the
embedded Milvus server). Everything here is small and synchronous except the two waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, ClassVar

__all__ = [
    "ChildProcess",
    "LocalStackError",
    "alive",
    "cmdline",
    "die_with_parent",
    "free_port",
    "log_tail",
    "pdeathsig_prefix",
    "port_is_free",
    "terminate",
    "wait_for_port",
    "wait_port_free",
]

log = logging.getLogger(__name__)

_POLL_S = 0.05


class LocalStackError(RuntimeError):
    """A local service did not start or stop; the message says which, why, and where its log is."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to port 0, read it, close). Racy, fine for tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now. SO_REUSEADDR, as servers set it: connections
    in TIME_WAIT (after a server was stopped) do not count as in use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


async def wait_port_free(port: int, *, timeout_s: float) -> bool:
    """A server that was just killed can hold its port for a moment."""
    deadline = time.monotonic() + timeout_s
    while not port_is_free(port):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def wait_for_port(
    host: str, port: int, *, timeout_s: float, process: subprocess.Popen[bytes] | None = None, what: str = ""
) -> None:
    """Wait until ``host:port`` accepts a TCP connection; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=1.0)
        except (OSError, TimeoutError):
            pass
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        if process is not None and process.poll() is not None:
            raise LocalStackError(
                f"{what or 'the process'} exited with code {process.returncode} before {port} opened"
            )
        if time.monotonic() > deadline:
            raise LocalStackError(f"{what or host}: port {port} did not open within {timeout_s:.0f} s")
        await asyncio.sleep(_POLL_S)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log yet)"


def pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig TERM --``: the child gets SIGTERM when we die (Linux, util-linux)."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def terminate(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM, wait, then SIGKILL. Blocking: call through ``asyncio.to_thread``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s; killing it", process.pid, timeout_s)
            process.kill()
            process.wait()
    return process.returncode


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: it holds no ports)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM us when our parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent_pid and os.getppid() != parent_pid:
        raise SystemExit("parent already exited")


class ChildProcess:
    """One child process we own, with its output appended to ``log_path``.

    * ``_spawn(command, ...)`` starts it unless one is running (idempotent: a second call while it
      runs does nothing; a call after it exited or was stopped starts a fresh one);
    * ``pid``: the last started process's pid (kept after it exits, for logs and fault tests);
    * ``stop_blocking()`` / ``astop()``: SIGTERM, then SIGKILL after ``stop_timeout_s``; idempotent,
      returns the exit code (None if never started) and closes the log file;
    * ``kill()``: SIGKILL at once (a crash, for fault-injection tests);
    * ``log_tail()``: the last lines of the log, for error messages.

    ``error`` is the exception type a launcher raises when its child does not start.
    """

    error: ClassVar[type[RuntimeError]] = LocalStackError
    tail_lines: ClassVar[int] = 20

    def __init__(self, *, log_path: Path, stop_timeout_s: float) -> None:
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def _spawn(
        self,
        command: Sequence[str],
        *,
        stdin: int = subprocess.DEVNULL,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        new_session: bool = True,
    ) -> bool:
        """Start ``command`` unless a child is running; True when a new one was started."""
        if self.running:
            return False
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            list(command),
            stdin=stdin,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=new_session,
        )
        return True

    def _raise_if_exited(self, what: str, doing: str = "while starting") -> None:
        """Raise ``error`` with the exit code and the log's tail if the child has exited."""
        code = self.returncode
        if code is not None:
            tail = self.log_tail()
            raise self.error(
                f"{what} exited with code {code} {doing}; last log lines ({self.log_path}):\n{tail}"
            )

    def stop_blocking(self) -> int | None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``. Idempotent; blocks (see ``astop``)."""
        process = self._process
        if process is None:
            return None
        terminate(process, self.stop_timeout_s)
        self._close_log()
        return process.returncode

    async def astop(self) -> int | None:
        """``stop_blocking`` in a thread, so the event loop keeps running while the child drains."""
        return await asyncio.to_thread(self.stop_blocking)

    def kill(self) -> None:
        """SIGKILL now and reap: a crash, for fault-injection tests."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        self._close_log()

    def log_tail(self, lines: int | None = None) -> str:
        return log_tail(self.log_path, lines or self.tail_lines)

    def _close_log(self) -> None:
        log_file, self._log = self._log, None
        if log_file is not None:
            log_file.close()
