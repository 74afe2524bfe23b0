"""Expected CLI failures map to one or two actionable lines and distinct exit codes."""

from __future__ import annotations

import errno
from pathlib import Path

import httpx
import pytest
from aiokafka.errors import KafkaConnectionError, UnknownTopicOrPartitionError

from devstack.process import LocalStackError
from echolm.cli import read_jsonl_requests
from echolm.cli_errors import EXIT_CODES, CliFailure, describe
from infra.errors import BackendUnavailable, ClientTimeout, DependencyUnavailable
from infra.settings import load_settings

SETTINGS = load_settings(kafka={"bootstrap_servers": "broker:9"}, milvus={"uri": "http://milvus:1"})


def test_exit_codes_are_distinct() -> None:
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)
    assert 0 not in EXIT_CODES.values()


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (KafkaConnectionError("Unable to bootstrap"), "broker", "broker:9"),
        (UnknownTopicOrPartitionError(), "topic", "topics create"),
        (
            RuntimeError("reply topic 'x' does not exist on b; run `echolm topics create`"),
            "topic",
            "topics create",
        ),
        (DependencyUnavailable("Milvus at http://milvus:1 could not ..."), "milvus", "http://milvus:1"),
        (BackendUnavailable("refused", backend="small-0"), "backend", "TGI__BACKENDS"),
        (httpx.ConnectError("refused"), "backend", "ConnectError"),
        (
            LocalStackError("port 19092 on 127.0.0.1 is in use: x; stop it or set stack.broker_port"),
            "port",
            "stop it",
        ),
        (LocalStackError("Milvus did not start; see its log"), "stack", "see its log"),
        (OSError(errno.EADDRINUSE, "Address already in use"), "port", "in use"),
        (FileNotFoundError(errno.ENOENT, "No such file", "x.jsonl"), "input", "x.jsonl"),
        (ClientTimeout("no reply to request r within 1s; are workers running"), "timeout", "workers"),
        (KeyboardInterrupt(), "interrupted", "interrupted"),
        (CliFailure("input", "bad lines"), "input", "bad lines"),
    ],
)
def test_expected_failures_are_described(exc: BaseException, kind: str, words: str) -> None:
    failure = describe(exc, SETTINGS)
    assert failure is not None and failure.kind == kind
    assert words in failure.lines()
    assert failure.exit_code == EXIT_CODES[kind]
    assert 1 <= len(failure.lines().splitlines()) <= 2


def test_a_wrapped_broker_failure_is_still_the_broker() -> None:
    try:
        try:
            raise KafkaConnectionError("Unable to bootstrap")
        except KafkaConnectionError as inner:
            raise LocalStackError("could not create topics on broker:9") from inner
    except LocalStackError as exc:
        failure = describe(exc, SETTINGS)
    assert failure is not None and failure.kind == "broker"


@pytest.mark.parametrize("exc", [ValueError("bug"), KeyError("k"), RuntimeError("something else")])
def test_unexpected_failures_keep_their_traceback(exc: Exception) -> None:
    assert describe(exc, SETTINGS) is None


def test_jsonl_bad_lines_are_numbered_and_good_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"prompt": "one"}\n'
        b"{not json\n"
        b"\n"
        b"[1, 2]\n"
        b'{"prompt": ""}\n'
        b'{"prompt": "two", "tenant": 5}\n'
        b'{"prompt": "three", "max_new_tokens": "x"}\n'
        b'{"prompt": "four", "tenant": "acme", "max_new_tokens": 8}\n'
    )
    rows, bad = read_jsonl_requests(path)
    assert [r["prompt"] for r in rows] == ["one", "four"]
    assert [m.split(":")[0] for m in bad] == ["line 2", "line 4", "line 5", "line 6", "line 7"]


def test_a_missing_input_file_is_an_input_failure(tmp_path: Path) -> None:
    with pytest.raises(CliFailure) as info:
        read_jsonl_requests(tmp_path / "absent.jsonl")
    assert info.value.exit_code == EXIT_CODES["input"]
