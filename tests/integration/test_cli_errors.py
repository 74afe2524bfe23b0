"""``echolm`` as a new user meets it: expected failures are one or two lines, a distinct exit code,
and a traceback only under ``-v``. Each command runs as a subprocess, against nothing running or
against a real Tansu broker (its own, on a free port: no workers, so nothing answers)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from devstack.localstack import TansuBroker, create_topics
from devstack.process import free_port
from echolm.bank import read_topic
from echolm.cli_errors import EXIT_CODES
from infra.settings import Settings, child_env, load_settings
from streams.topology import topic_specs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def echolm(*args: str, settings: Settings, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = child_env(settings) | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "echolm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def assert_actionable(result: subprocess.CompletedProcess[str], kind: str, *words: str) -> None:
    """Exit code of ``kind``; stderr is one or two lines naming what failed; no traceback, no warnings."""
    assert result.returncode == EXIT_CODES[kind], result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-2 if len(lines) > 1 else -1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "Unclosed" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr


def nothing_running() -> Settings:
    dead = free_port()  # nothing listens here
    return load_settings(
        kafka={"bootstrap_servers": f"127.0.0.1:{dead}"},
        milvus={"uri": f"http://127.0.0.1:{dead}", "timeout_s": 1.0},
    )


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TansuBroker]:
    tansu = TansuBroker(port=free_port(), log_path=tmp_path_factory.mktemp("tansu") / "tansu.log")
    await tansu.start()
    yield tansu
    await tansu.stop()


def on(broker: TansuBroker) -> Settings:
    return load_settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": f"t{uuid.uuid4().hex[:8]}"}
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# ----------------------------------------------------------------------------- nothing running
@pytest.mark.parametrize(
    "command", [["ask", "hi"], ["feedback", "r1", "1"], ["topics", "create"], ["gateway"]]
)
def test_no_broker(command: list[str]) -> None:
    settings = nothing_running()
    settings = settings.model_copy(
        update={"gateway": settings.gateway.model_copy(update={"trusted_tenant": "t", "port": 0})}
    )
    assert_actionable(echolm(*command, settings=settings), "broker", settings.kafka.bootstrap_servers, "->")


def test_verbose_adds_the_traceback() -> None:
    result = echolm("-v", "ask", "hi", settings=nothing_running())
    assert result.returncode == EXIT_CODES["broker"]
    assert "Traceback" in result.stderr and "KafkaConnectionError" in result.stderr


def test_no_milvus() -> None:
    settings = nothing_running()
    assert_actionable(
        echolm("bank", "export", "--tenant", "acme", settings=settings), "milvus", settings.milvus.uri
    )


def test_busy_ports(busy_port: int) -> None:
    base = nothing_running()
    up = base.model_copy(update={"stack": base.stack.model_copy(update={"broker_port": busy_port})})
    assert_actionable(echolm("up", settings=up), "port", str(busy_port))
    gateway = base.model_copy(update={"gateway": base.gateway.model_copy(update={"port": busy_port})})
    assert_actionable(echolm("gateway", settings=gateway), "port", str(busy_port))


def test_missing_input_file(tmp_path: Path) -> None:
    assert_actionable(
        echolm("send", str(tmp_path / "absent.jsonl"), settings=nothing_running()), "input", "absent"
    )


# ------------------------------------------------------------------------------ a real broker
def test_missing_topic(broker: TansuBroker) -> None:
    assert_actionable(echolm("ask", "hi", settings=on(broker)), "topic", "topics create")


async def test_timeout_when_no_worker_answers(broker: TansuBroker) -> None:
    settings = on(broker)
    await create_topics(settings.kafka.bootstrap_servers, topic_specs(settings))
    result = await asyncio.to_thread(echolm, "ask", "hi", "--timeout", "1", settings=settings)
    assert_actionable(result, "timeout", "within 1.0s", "workers")


async def test_send_reports_bad_lines_by_number_and_sends_the_good_ones(
    broker: TansuBroker, tmp_path: Path
) -> None:
    settings = on(broker)
    await create_topics(settings.kafka.bootstrap_servers, topic_specs(settings))
    path = tmp_path / "requests.jsonl"
    path.write_bytes(
        b'{"prompt": "good one", "request_id": "g1"}\n'
        b'{"prompt": "broken\n'
        b'{"prompt": "good two", "request_id": "g2"}\n'
        b"42\n"
        b'{"text": "no prompt"}\n'
    )
    result = await asyncio.to_thread(echolm, "send", str(path), "--timeout", "1", "-q", settings=settings)
    assert result.returncode == EXIT_CODES["input"], result.stderr
    assert "line 2:" in result.stderr and "line 4:" in result.stderr and "line 5:" in result.stderr
    assert "line 1:" not in result.stderr and "line 3:" not in result.stderr
    assert "Traceback" not in result.stderr
    produced = [orjson.loads(v) for v in await read_topic(settings, settings.topic("requests"), timeout_s=10)]
    assert sorted(r["request_id"] for r in produced) == ["g1", "g2"]
