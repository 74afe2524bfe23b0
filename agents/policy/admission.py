"""What may enter the example bank, scrubbed of what must not, under which id.

* ``decide_admission``: only successful, non-empty answers of the large tier (by default), never a
  request marked ``no_store``, never an error reply.
* ``scrub_pii``: emails, phone numbers, card numbers (Luhn-checked), IPv4 addresses, IBANs and US
  SSNs become typed placeholders (``[EMAIL]``, ``[PHONE]``, ...) before anything is stored. Regular
  expressions catch the common shapes only; they are a floor, not a guarantee.
* ``example_id``: one id per (tenant, normalised request), so a repeated request overwrites its
  example instead of duplicating it, and two tenants never share one.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Set
from dataclasses import dataclass

__all__ = [
    "PII_PLACEHOLDERS",
    "AdmissionDecision",
    "decide_admission",
    "example_id",
    "luhn_valid",
    "normalise_request",
    "scrub_pii",
]


@dataclass(frozen=True, slots=True)
class AdmissionDecision:
    admit: bool
    reason: str


def decide_admission(
    *,
    tier: str,
    large_tier: str,
    no_store: bool,
    ok: bool,
    text: str,
    prompt: str,
    also_admit: Set[str] = frozenset(),
) -> AdmissionDecision:
    """Whether one served reply may become an example. Checks in order; the first failing one is the
    reason. ``also_admit`` names further tiers whose answers may be cached (none by default: the bank
    should hold the answers a small model is to learn from)."""
    if no_store:
        return AdmissionDecision(False, "no_store")
    if not ok:
        return AdmissionDecision(False, "error_reply")
    if tier != large_tier and tier not in also_admit:
        return AdmissionDecision(False, "tier_not_admitted")
    if not prompt.strip():
        return AdmissionDecision(False, "empty_prompt")
    if not text.strip():
        return AdmissionDecision(False, "empty_answer")
    return AdmissionDecision(True, "admitted")


# --------------------------------------------------------------------------------------------- PII
def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


PII_PLACEHOLDERS = ("[EMAIL]", "[IBAN]", "[CARD]", "[SSN]", "[IP]", "[PHONE]")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Two letters, two check digits, then 11-30 letters/digits, optionally in groups of four.
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
# 13-19 digits, optionally split by single spaces or dashes.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.])")
_PHONE = re.compile(
    r"""(?<![\w+])(?:
        \+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}   # +44 20 7946 0958
      | \(\d{3}\)[ .-]?\d{3}[ .-]\d{4}                                      # (415) 555-0100
      | \d{3}[.-]\d{3}[.-]\d{4}                                             # 415-555-0100
    )(?!\w)""",
    re.VERBOSE,
)


def _iban(match: re.Match[str]) -> str:
    compact = match.group(0).replace(" ", "")
    return "[IBAN]" if 15 <= len(compact) <= 34 and any(c.isdigit() for c in compact[4:]) else match.group(0)


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else match.group(0)


def _phone(match: re.Match[str]) -> str:
    return "[PHONE]" if sum(c.isdigit() for c in match.group(0)) >= 7 else match.group(0)


_SCRUBBERS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    (_EMAIL, "[EMAIL]"),  # first: addresses contain digits the others would take
    (_IBAN, _iban),
    (_CARD, _card),  # before phones: a card number is a long digit run
    (_SSN, "[SSN]"),
    (_IPV4, "[IP]"),  # before phones: dotted quads look like dotted numbers
    (_PHONE, _phone),
)


def scrub_pii(text: str) -> str:
    """``text`` with personal data replaced by typed placeholders (``PII_PLACEHOLDERS``)."""
    for pattern, replacement in _SCRUBBERS:
        text = pattern.sub(replacement, text)
    return text


# ---------------------------------------------------------------------------------------------- id
def normalise_request(request: str) -> str:
    """The request as identity sees it: NFKC, whitespace runs collapsed, ends trimmed. Case is kept:
    in code and identifiers it changes meaning."""
    return " ".join(unicodedata.normalize("NFKC", request).split())


def example_id(tenant: str, request: str) -> str:
    """sha256 over the tenant and the normalised request, 32 hex characters (128 bits).

    The tenant is length-prefixed, so no (tenant, request) pair encodes like another: two tenants
    can only collide through a sha256 collision on the first 128 bits.
    """
    payload = f"{len(tenant)}:{tenant}\x00{normalise_request(request)}".encode()
    return hashlib.sha256(payload).hexdigest()[:32]
