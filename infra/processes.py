"""Child processes of the local stack: ports, readiness, termination, and dying with the parent.

Shared by ``infra/localstack.py`` (the broker and the stack) and ``infra/milvus_embedded.py`` (the
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
from pathlib import Path

__all__ = [
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
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


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
