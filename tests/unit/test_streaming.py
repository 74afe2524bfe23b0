"""``echolm.streaming.StreamAssembler``: the rule that a streamed reply never shows text twice and
never takes text back, over retries, re-processing, duplicates and reordering."""

from __future__ import annotations

import pytest

from echolm.streaming import StreamAssembler
from infra.errors import StreamDiverged


def test_chunks_in_order_are_shown_as_they_come_and_the_final_adds_the_rest() -> None:
    a = StreamAssembler()
    assert [a.chunk("w:0", i, t) for i, t in enumerate(["The", " sky", " is"])] == ["The", " sky", " is"]
    assert a.final("The sky is blue.") == " blue."
    assert a.shown == "The sky is blue."


def test_a_duplicate_chunk_is_dropped_and_a_gap_waits_for_the_missing_chunk() -> None:
    a = StreamAssembler()
    assert a.chunk("w:0", 0, "a") == "a"
    assert a.chunk("w:0", 0, "a") == ""  # redelivered
    assert a.chunk("w:0", 2, "c") == ""  # seq 1 missing: held back
    assert a.chunk("w:0", 1, "b") == "bc"
    assert a.dropped == 1 and a.final("abc") == ""


def test_a_retry_that_repeats_the_shown_text_shows_only_what_is_new() -> None:
    a = StreamAssembler()
    shown = a.chunk("w:0", 0, "Paris is") + a.chunk("w:0", 1, " the")  # then the backend failed
    retried = [a.chunk("w:1", 0, "Paris"), a.chunk("w:1", 1, " is the"), a.chunk("w:1", 2, " capital")]
    assert shown + "".join(retried) + a.final("Paris is the capital.") == "Paris is the capital."
    assert retried == ["", "", " capital"]


def test_an_overtaken_attempt_is_followed_no_further() -> None:
    a = StreamAssembler()
    a.chunk("w:0", 0, "x")
    a.chunk("v:0", 0, "x")  # another worker re-processed the request
    assert a.chunk("w:0", 1, "yyy") == "" and a.dropped == 1
    assert a.chunk("v:0", 1, "z") == "z"


def test_a_retry_that_disagrees_stops_the_stream_and_the_final_reports_it() -> None:
    a = StreamAssembler()
    a.chunk("w:0", 0, "Blue")
    assert a.chunk("w:1", 0, "Red") == "" and a.diverged
    assert a.chunk("w:1", 1, " and Blue") == ""
    with pytest.raises(StreamDiverged):
        a.final("Red and Blue")


def test_a_final_reply_without_any_chunk_is_shown_whole() -> None:
    assert StreamAssembler().final("all at once") == "all at once"
