"""A real ``echolm worker`` on a local Tansu broker feeds its ``/livez``: the event loop's timer ticks
and faust's real consumer thread reports its fetches (the unit tests stub the fetch; this one does not).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devstack.localstack import TansuBroker, create_topics
from devstack.process import free_port
from devstack.workers import WorkerProcess
from infra.settings import load_settings
from streams.topology import topic_specs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TansuBroker]:
    tansu = TansuBroker(port=free_port(), log_path=tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        await tansu.start()
    except Exception as exc:  # every test here needs it
        pytest.skip(f"the Tansu broker could not start: {exc}")
    yield tansu
    await tansu.stop()


def _livez(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=3) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_a_running_worker_reports_loop_ticks_and_consumer_fetches(
    broker: TansuBroker, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    metrics_port = free_port()
    settings = load_settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": f"t{tag}"},
        milvus={"uri": f"http://127.0.0.1:{free_port()}"},  # nothing there: background roles retry
        worker={"metrics_port": metrics_port, "app_id": f"g{tag}", "data_dir": str(tmp_path / "w")},
        stack={"data_dir": str(tmp_path / "stack")},
    )
    await create_topics(broker.bootstrap_servers, topic_specs(settings))
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log", role="background", name="w0")
    worker.start()
    try:
        seen: list[tuple[int, dict[str, Any]]] = []
        for _ in range(120):  # up to a minute for start-up, the group join and three fetches
            await asyncio.sleep(0.5)
            try:
                seen.append(await asyncio.to_thread(_livez, metrics_port))
            except OSError:  # the metrics server is not up yet
                continue
            if seen[-1][1]["polls"] >= 3:
                break
        assert seen, f"/livez never answered; worker log:\n{worker.log_tail()}"
        status, report = seen[-1]
        assert report["polls"] >= 3, f"the consumer never reported a fetch: {report}"
        assert status == 200
        assert report["ok"] is True
        assert report["reasons"] == []
        assert all(code == 200 for code, _ in seen), seen
    finally:
        await worker.stop()
