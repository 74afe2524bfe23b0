"""Session fixtures for the contract suites: one embedded Milvus server and one Milvus Lite file.

The server is started once per test session (about 8 s) by ``devstack.localstack.MilvusServer`` in a
child process we own; ``ECHOLM_TEST_MILVUS_URI=http://host:19530`` uses a running server instead
(docker-compose). If the server cannot start, its tests skip loudly (and fail under ``CI=true``).
Each test gets its own collection, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devstack.localstack import LocalStackError, MilvusServer, free_port

ENV_MILVUS_URI = "ECHOLM_TEST_MILVUS_URI"


@pytest.fixture(scope="session")
async def milvus_server_uri(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    given = os.environ.get(ENV_MILVUS_URI)  # a test-only switch
    if given:
        yield given
        return
    server = MilvusServer(data_dir=tmp_path_factory.mktemp("milvus-server"), port=free_port())
    try:
        await server.start()
    except LocalStackError as exc:
        pytest.skip(f"the embedded Milvus server did not start: {exc}")
    try:
        yield server.uri
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def milvus_lite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(Path(tmp_path_factory.mktemp("milvus-lite")) / "contract.db")


@pytest.fixture
def collection_name() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"
