"""The embedded Milvus server (``milvus`` wheel 2.3.5) in a child process we own.

Parent side: ``MilvusServer`` starts ``python -m devstack.localstack milvus --port P --dir D`` (the
command name is kept stable: benchmarks find the process by it), waits for ``D/ready.json`` and the
port, and stops it. Child side: ``serve()`` runs ``milvus.MilvusServer`` until SIGTERM/SIGINT, stdin
EOF or parent death. Why a child, and the port fixes the 2.3.5 wheel needs: docs/local-stack.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from .process import (
    ChildProcess,
    LocalStackError,
    alive,
    cmdline,
    die_with_parent,
    free_port,
    port_is_free,
    wait_for_port,
    wait_port_free,
)

__all__ = ["MilvusServer", "serve"]

log = logging.getLogger(__name__)

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding devstack/
# The child's module: kept stable, benchmarks find the process by it in its command line.
_MODULE = "devstack.localstack"


class MilvusServer(ChildProcess):
    """The embedded Milvus standalone server (``milvus`` wheel 2.3.5), in a child process we own.

    ``uri`` is ``http://127.0.0.1:PORT``. Data lives in ``data_dir`` and survives restarts. ``pid`` is
    the supervising child's; the milvus binary's is ``server_pid`` in ``ready_file``.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int = 19530,
        log_path: Path | None = None,
        start_timeout_s: float = 180.0,
        stop_timeout_s: float = 30.0,
        python: str = sys.executable,
    ) -> None:
        self.data_dir = data_dir.resolve()
        super().__init__(log_path=log_path or self.data_dir / "supervisor.log", stop_timeout_s=stop_timeout_s)
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._python = python

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ready_file(self) -> Path:
        return self.data_dir / "ready.json"

    async def start(self) -> None:
        """Start the child and wait until the server answers on ``port``. Idempotent."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._reap_leftover()
        if not await wait_port_free(self.port, timeout_s=5.0):
            raise LocalStackError(
                f"port {self.port} is in use: another Milvus (an earlier `echolm up`?) or another service "
                "holds it; stop it, or set stack.milvus_port, or use stack.milvus='lite'"
            )
        self._spawn(
            [
                self._python, "-m", _MODULE, "milvus",
                "--port", str(self.port), "--dir", str(self.data_dir), "--parent-pid", str(os.getpid()),
                "--start-timeout", str(self.start_timeout_s),
            ],
            stdin=subprocess.PIPE,  # closing it tells the child to stop
            cwd=_PACKAGE_ROOT,
        )  # fmt: skip
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not self.ready_file.is_file():
            self._raise_if_exited("the Milvus server", f"while starting (see also {self.data_dir / 'logs'})")
            if time.monotonic() > deadline:
                raise LocalStackError(
                    f"the Milvus server did not start within {self.start_timeout_s:.0f} s; "
                    f"see {self.data_dir / 'logs'}"
                )
            await asyncio.sleep(0.1)
        await wait_for_port(
            "127.0.0.1", self.port, timeout_s=max(1.0, deadline - time.monotonic()), process=self._process,
            what="the Milvus server",
        )  # fmt: skip

    async def stop(self) -> None:
        """Ask the child to stop the server (it kills the binary after 1 s), then SIGKILL leftovers."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        await self.astop()
        self._reap_leftover()

    def _reap_leftover(self) -> None:
        """Kill a milvus binary that a killed child left running in ``data_dir``; refuse a live one."""
        try:
            info = json.loads(self.ready_file.read_text())
        except (FileNotFoundError, ValueError):
            return
        supervisor, binary = int(info.get("supervisor_pid", 0)), int(info.get("server_pid", 0))
        if supervisor and alive(supervisor) and _MODULE in cmdline(supervisor):
            raise LocalStackError(
                f"another local stack (pid {supervisor}) is running a Milvus server in {self.data_dir}; "
                "stop it first or use another stack.data_dir"
            )
        if binary and alive(binary) and cmdline(binary).startswith(str(self.data_dir / "bin" / "milvus")):
            log.warning(
                "killing Milvus server pid %d left over from a previous run in %s", binary, self.data_dir
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(binary, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while alive(binary) and time.monotonic() < deadline:
                time.sleep(0.05)  # its ports close when it is gone
        self.ready_file.unlink(missing_ok=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


# ------------------------------------------------------------------------------- child side
def _embedded_etcd_config(data_dir: Path) -> tuple[Path, int]:
    """Write (or reuse) the embedded etcd's config with free 127.0.0.1 ports; return it and the client port.

    Milvus 2.3.5's embedded etcd listens on localhost:2379 and :2380 whatever ``etcd.endpoints`` says,
    so a second server on the same host dies at start (``GetEmbedEtcdClient``: nil pointer). A config
    file named by ``ETCD_CONFIG_PATH`` moves both ports (Milvus's own standalone_embed.sh does the
    same). Ports are kept per data folder while they stay free, so etcd's stored member URL holds.
    """
    path = data_dir / "configs" / "embed-etcd.yaml"
    ports: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        ports = [int(line.rsplit(":", 1)[1]) for line in path.read_text().splitlines() if "-urls:" in line][
            :2
        ]
    if len(ports) != 2 or not all(port_is_free(p) for p in ports):
        ports = [free_port(), free_port()]
        while ports[1] == ports[0]:
            ports[1] = free_port()
    client, peer = ports
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"listen-client-urls: http://127.0.0.1:{client}\n"
        f"listen-peer-urls: http://127.0.0.1:{peer}\n"
        f"advertise-client-urls: http://127.0.0.1:{client}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
        f"initial-cluster: default=http://127.0.0.1:{peer}\n"
    )
    return path, client


# The milvus wheel scans for these from fixed defaults (53100, 19529, 19531, ...) and releases each
# port before the binary binds it, seconds later: two servers starting at once on one host both pick
# 53100 and one dies ("listen tcp :53100: bind: address already in use"). Ports from the kernel's
# ephemeral allocator (random offsets) make that collision unlikely; they are kept per data folder
# while they stay free, like the etcd ports.
_INTERNAL_PORTS = (
    "root_coord_port", "proxy_internal_port", "query_coord_port", "query_node_port",
    "index_coord_port", "index_node_port", "data_coord_port", "data_node_port", "webservice_port",
)  # fmt: skip


def _internal_ports(data_dir: Path, taken: set[int]) -> dict[str, int]:
    """Ports for the server's internal listeners (and its /healthz web service), distinct and free."""
    path = data_dir / "configs" / "ports.json"
    ports: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, TypeError):
        ports = {k: int(v) for k, v in json.loads(path.read_text()).items() if k in _INTERNAL_PORTS}
    values = list(ports.values())
    usable = (
        set(ports) == set(_INTERNAL_PORTS)
        and len(set(values)) == len(values)
        and not set(values) & taken
        and all(port_is_free(p) for p in values)
    )
    if not usable:
        ports, used = {}, set(taken)
        for key in _INTERNAL_PORTS:
            port = free_port()
            while port in used:
                port = free_port()
            ports[key] = port
            used.add(port)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ports))
    return ports


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
            return b"OK" in reply.read()
    except (OSError, ValueError):
        return False


def _wait_healthy(
    process: subprocess.Popen[bytes], web_port: int, stop: threading.Event, deadline: float, data_dir: Path
) -> bool:
    """True once /healthz says OK; False if asked to stop first; raises if the binary dies or times out."""
    while not _healthy(web_port):
        if process.poll() is not None:
            raise RuntimeError(
                f"the milvus binary exited with code {process.returncode}; see {data_dir / 'logs'}"
            )
        if stop.is_set():
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(f"the milvus binary was not healthy in time; see {data_dir / 'logs'}")
        time.sleep(0.1)
    return True


def serve(port: int, data_dir: Path, parent_pid: int, start_timeout_s: float) -> int:
    """Run the embedded Milvus server until SIGTERM/SIGINT, stdin EOF or parent death."""
    die_with_parent(parent_pid)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def _watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.buffer.read(1024):
                pass
        stop.set()

    threading.Thread(target=_watch_stdin, name="stdin-watch", daemon=True).start()
    from milvus import MilvusServer as EmbeddedMilvus
    from milvus import MilvusServerConfig

    etcd_config, etcd_port = _embedded_etcd_config(data_dir)
    # The only way to hand this to the milvus binary: MilvusServer.start() copies os.environ into the
    # binary's environment and offers no other hook. This process exists only to run that server.
    os.environ["ETCD_CONFIG_PATH"] = str(etcd_config)  # noqa: TID251

    class _Config(MilvusServerConfig):  # type: ignore[misc]
        def try_bind_port(self, port: int) -> socket.socket | None:
            """The wheel probes ports without SO_REUSEADDR, so a port restarted within a minute
            (TIME_WAIT) looks taken; the milvus binary itself (Go) can bind it."""
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
            except OSError:
                sock.close()
                return None
            return sock

    etcd_ports = {
        int(line.rsplit(":", 1)[1]) for line in etcd_config.read_text().splitlines() if "-urls:" in line
    }
    internal = _internal_ports(data_dir, taken={port, *etcd_ports})
    web_port = internal.pop("webservice_port")
    config = _Config(data_dir=str(data_dir), proxy_port=port, etcd_port=etcd_port, **internal)
    server = EmbeddedMilvus(config, wait_for_started=False)
    server.webservice_port = web_port  # the wheel scans from 9091 otherwise (same race)
    ready_file = data_dir / "ready.json"
    began = time.monotonic()
    try:
        server.start()  # spawns the binary; readiness is polled below, watching for a crash
        process = server.server_proc
        assert process is not None
        if not _wait_healthy(process, server.webservice_port, stop, began + start_timeout_s, data_dir):
            return 0
        info = {
            "uri": f"http://127.0.0.1:{port}",
            "supervisor_pid": os.getpid(),
            "server_pid": process.pid,
            "etcd_port": etcd_port,
            "started_s": round(time.monotonic() - began, 2),
        }
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(ready_file)
        print(f"milvus ready: {json.dumps(info)}", flush=True)  # noqa: T201 - goes to the supervisor log
        stop.wait()
    except (TimeoutError, RuntimeError, OSError) as exc:
        print(f"milvus failed to start: {exc}", flush=True)  # noqa: T201
        return 1
    else:
        return 0
    finally:
        server.stop()  # SIGTERM, then SIGKILL after 1 s
        ready_file.unlink(missing_ok=True)
