"""Admission: what may be cached, PII scrubbing, and stable tenant-scoped example ids."""

from __future__ import annotations

import re

import pytest

from agents.policy.admission import (
    AdmissionDecision,
    decide_admission,
    example_id,
    luhn_valid,
    normalise_request,
    scrub_pii,
)

OK = {
    "tier": "large",
    "large_tier": "large",
    "no_store": False,
    "ok": True,
    "text": "Paris.",
    "prompt": "capital?",
}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, AdmissionDecision(True, "admitted")),
        ({"no_store": True}, AdmissionDecision(False, "no_store")),
        ({"ok": False}, AdmissionDecision(False, "error_reply")),
        ({"tier": "small"}, AdmissionDecision(False, "tier_not_admitted")),
        ({"tier": "small", "also_admit": frozenset({"small"})}, AdmissionDecision(True, "admitted")),
        ({"text": "  \n"}, AdmissionDecision(False, "empty_answer")),
        ({"prompt": ""}, AdmissionDecision(False, "empty_prompt")),
        ({"no_store": True, "ok": False}, AdmissionDecision(False, "no_store")),  # no_store always wins
    ],
)
def test_decide_admission_table(overrides: dict[str, object], expected: AdmissionDecision) -> None:
    assert decide_admission(**{**OK, **overrides}) == expected  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- PII
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail me at jane.doe+tag@example.co.uk please", "mail me at [EMAIL] please"),
        ("a@b.io and x_y@sub.domain.org", "[EMAIL] and [EMAIL]"),
        ("call +44 20 7946 0958 now", "call [PHONE] now"),
        ("call (415) 555-0100 now", "call [PHONE] now"),
        ("call 415-555-0100 or 415.555.0199", "call [PHONE] or [PHONE]"),
        ("+1-415-555-0100", "[PHONE]"),
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok"),
        ("card 4111-1111-1111-1111", "card [CARD]"),
        ("card 5500005555555559", "card [CARD]"),
        ("card 4111 1111 1111 1112", "card 4111 1111 1111 1112"),  # fails Luhn: not a card
        ("ssn 123-45-6789", "ssn [SSN]"),
        ("ssn 000-45-6789", "ssn 000-45-6789"),  # never issued
        ("host 192.168.1.20 down", "host [IP] down"),
        ("host 10.0.0.1:8080", "host [IP]:8080"),
        ("iban GB82 WEST 1234 5698 7654 32 paid", "iban [IBAN] paid"),
        ("iban DE89370400440532013000", "iban [IBAN]"),
        # left alone
        ("released 2024-01-15 at 10:30", "released 2024-01-15 at 10:30"),
        ("python 3.11.4 and numpy 2.1", "python 3.11.4 and numpy 2.1"),
        ("order 12345 costs $1,299.99", "order 12345 costs $1,299.99"),
        ("999.1.1.1 is not an address", "999.1.1.1 is not an address"),
        ("the year 1999 and 42 apples", "the year 1999 and 42 apples"),
        ("use @decorator and user@localhost", "use @decorator and user@localhost"),
    ],
)
def test_scrub_pii_table(text: str, expected: str) -> None:
    assert scrub_pii(text) == expected


def test_scrub_pii_is_idempotent() -> None:
    text = "jane@example.com, 4111 1111 1111 1111, 123-45-6789, +44 20 7946 0958, 8.8.8.8"
    once = scrub_pii(text)
    assert scrub_pii(once) == once
    assert not re.search(r"\d{4}", once)


@pytest.mark.parametrize(
    ("digits", "valid"),
    [("4111111111111111", True), ("79927398713", True), ("79927398710", False), ("", False), ("12a4", False)],
)
def test_luhn_table(digits: str, valid: bool) -> None:
    assert luhn_valid(digits) is valid


# ---------------------------------------------------------------------------------------------- ids
def test_example_id_shape_and_stability() -> None:
    eid = example_id("acme", "What is the capital of France?")
    assert re.fullmatch(r"[0-9a-f]{32}", eid)
    assert example_id("acme", "  What is the capital\tof France? ") == eid  # whitespace does not matter
    assert example_id("acme", "What is the capital of France?") == eid


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("acme", "q"), ("globex", "q")),  # different tenants never share an id
        (("ab", "c"), ("a", "bc")),  # the tenant/request boundary is unambiguous
        (("a", "1:b\x00q"), ("a1:b", "q")),
        (("acme", "Capital"), ("acme", "capital")),  # case is meaning (code, identifiers)
    ],
)
def test_example_ids_do_not_collide(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert example_id(*a) != example_id(*b)


def test_normalise_request_folds_compatibility_forms() -> None:
    assert normalise_request("\uff21\uff22\uff23\u00a0 x") == "ABC x"
