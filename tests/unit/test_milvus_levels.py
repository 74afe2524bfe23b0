"""Which consistency level each read of the Milvus store asks for (no server: the choice is local)."""

from __future__ import annotations

import pytest

from infra.milvus import MilvusExampleStore
from infra.settings import MilvusSettings


def store(**kw: object) -> MilvusExampleStore:
    return MilvusExampleStore(MilvusSettings(uri="http://127.0.0.1:1", **kw))


def test_the_request_path_reads_bounded_and_everything_else_session() -> None:
    s = store()
    assert (s._search_level(), s._read_level()) == ("Bounded", "Session")


def test_after_a_retraction_the_request_path_reads_exactly_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("infra.milvus.time.monotonic", lambda: clock[0])
    s = store()
    s._retracted()
    assert s._search_level() == "Session"
    s._unseen_delete = True  # a delete: Session has no timestamp to wait on, so Strong
    assert s._search_level() == "Strong"
    s._unseen_delete = False
    clock[0] += 5.01
    assert s._search_level() == "Bounded"


def test_unset_search_consistency_means_the_store_level() -> None:
    assert store(search_consistency=None)._search_level() == "Session"
    assert store(search_consistency=None, consistency_level="Strong")._search_level() == "Strong"
