"""``DevServerProcess``: start the dev TGI server as a child process, wait for it, stop it.

Used by integration tests and by the local-stack launcher::

    with DevServerProcess(port=0, log_path=tmp / "tgi.log") as server:   # starts, waits for /health
        httpx.get(f"{server.url}/info")

    server = DevServerProcess(port=18081, engine="emulated", extra_args=["--decode-ms-per-token", "5"])
    server.start(wait=False)
    await server.wait_ready_async()
    ...
    await server.astop()

``port=0`` lets the child bind a free port and report it through a port file (no race between
picking a port and binding it). ``stop()`` sends SIGTERM, waits ``stop_timeout_s``, then SIGKILLs;
it is idempotent and returns the exit code (-15 after a clean SIGTERM shutdown).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import httpx

from devstack.process import ChildProcess

__all__ = ["DevServerError", "DevServerProcess"]

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding devstack/: importable from there
_POLL_S = 0.05


class DevServerError(RuntimeError):
    """The dev server did not start, or died; the message carries the tail of its log."""


class DevServerProcess(ChildProcess):
    """The dev TGI server in a child process (see the module docstring)."""

    error = DevServerError
    tail_lines = 30

    def __init__(
        self,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        engine: Literal["llama", "emulated"] = "llama",
        gguf: Path | None = None,
        model_id: str | None = None,
        ctx: int = 2048,
        threads: int = 1,
        max_concurrent_requests: int = 128,
        max_batch_size: int = 1,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        ready_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        python: str = sys.executable,
    ) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="tgi-dev-"))
        super().__init__(log_path=log_path or self._workdir / "server.log", stop_timeout_s=stop_timeout_s)
        self.host = host
        self._requested_port = port
        self._port: int | None = port or None
        self.ready_timeout_s = ready_timeout_s
        self._port_file = self._workdir / "port"
        args = [
            python, "-m", "devstack.tgi_dev",
            "--host", host,
            "--port", str(port),
            "--port-file", str(self._port_file),
            "--engine", engine,
            "--ctx", str(ctx),
            "--threads", str(threads),
            "--max-concurrent-requests", str(max_concurrent_requests),
            "--max-batch-size", str(max_batch_size),
            "--parent-pid", str(os.getpid()),  # the server exits if we die without stopping it
        ]  # fmt: skip
        if gguf is not None:
            args += ["--gguf", str(gguf)]
        if model_id is not None:
            args += ["--model-id", model_id]
        self.command: list[str] = [*args, *extra_args]

    # ---------------------------------------------------------------------------------- queries
    @property
    def port(self) -> int:
        if self._port is None:
            self._port = self._read_port()
        if self._port is None:
            raise DevServerError(f"the dev server has not reported its port yet; see {self.log_path}")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -------------------------------------------------------------------------------- lifecycle
    def start(self, *, wait: bool = True) -> DevServerProcess:
        """Spawn the server (unless it runs); with ``wait`` block until ``/health`` answers 200."""
        if not self.running:  # a fresh child reports its own port: forget the last one's
            self._port = self._requested_port or None
            self._port_file.unlink(missing_ok=True)
        # In our session (signals to our process group reach it); it also exits when we die (--parent-pid).
        self._spawn(self.command, cwd=_PACKAGE_ROOT, new_session=False)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        with httpx.Client(timeout=1.0) as client:
            while True:
                if self._healthy_once(client):
                    return
                self._check_deadline(deadline)
                time.sleep(_POLL_S)

    async def wait_ready_async(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                url = self._health_url()
                if url is not None:
                    try:
                        if (await client.get(url)).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass  # not listening yet
                self._check_deadline(deadline)
                await asyncio.sleep(_POLL_S)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``. Idempotent; returns the exit code.

        A clean stop returns ``-SIGTERM`` (-15): uvicorn drains and shuts the app down, then re-raises
        the signal it caught. ``-SIGKILL`` means the deadline passed.
        """
        return self.stop_blocking()

    # ------------------------------------------------------------------------- context managers
    def __enter__(self) -> DevServerProcess:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> DevServerProcess:
        try:
            self.start(wait=False)
            await self.wait_ready_async()
        except BaseException:
            await self.astop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()

    # --------------------------------------------------------------------------------- internals
    def _read_port(self) -> int | None:
        try:
            return int(self._port_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _health_url(self) -> str | None:
        if self._port is None:
            self._port = self._read_port()
        return None if self._port is None else f"http://{self.host}:{self._port}/health"

    def _healthy_once(self, client: httpx.Client) -> bool:
        url = self._health_url()
        if url is None:
            return False
        try:
            return client.get(url).status_code == 200
        except httpx.TransportError:
            return False

    def _check_deadline(self, deadline: float) -> None:
        if self._process is None:
            raise DevServerError("the dev server was never started: call start() first")
        self._raise_if_exited("the dev server", f"before it was ready (command: {' '.join(self.command)})")
        if time.monotonic() > deadline:
            raise DevServerError(
                f"the dev server on {self.host}:{self._port or self._requested_port} was not healthy within "
                f"{self.ready_timeout_s:.0f} s; last log lines from {self.log_path}:\n{self.log_tail()}"
            )
