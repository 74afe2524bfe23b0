"""Invented-fact sets for knowledge transfer across two tenants, and the checker.

``bench/data/facts-<tenant>.jsonl`` (committed, written for this project; no model knows them): each
row is one fact of one tenant with a bank question and answer (the entry `echolm bank import` would
load), three paraphrased questions a user might ask instead, and the ``fact_token`` (a code, name,
version or extension) that an answer must carry. Two facts per tenant are about an entity both
tenants have ("front office", "guest lounge") with different tokens, so an example leaked across
tenants would be visible in the answer as well as in the examples' tenants.

``carries_fact`` decides from the fact token alone: its letter/digit runs in order, separated by
nothing or by non-alphanumeric characters, not inside a longer alphanumeric run, case-insensitive.
``"ZR-1128"`` matches ``"zr 1128"`` and ``"ZR1128."`` but not ``"ZR-11280"``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FACTS_DIR", "Fact", "carries_fact", "fact_pattern", "load_facts"]

FACTS_DIR = Path(__file__).resolve().parents[1] / "data"


@dataclass(frozen=True, slots=True)
class Fact:
    fact_id: str
    tenant: str
    bank_question: str
    bank_answer: str
    questions: tuple[str, ...]
    fact_token: str


def fact_pattern(token: str) -> re.Pattern[str]:
    runs = re.findall(r"[A-Za-z0-9]+", token)
    if not runs:
        raise ValueError(f"fact token {token!r} has no letters or digits to check for")
    body = r"[^A-Za-z0-9]*".join(re.escape(r) for r in runs)
    return re.compile(rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])", re.IGNORECASE)


def carries_fact(answer: str, token: str) -> bool:
    """Whether ``answer`` states ``token`` (see the module docstring for the matching rule)."""
    return fact_pattern(token).search(answer) is not None


def load_facts(folder: Path = FACTS_DIR) -> list[Fact]:
    """Every fact of every ``facts-*.jsonl`` in ``folder``, in file then line order."""
    out = []
    for path in sorted(folder.glob("facts-*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                fact = Fact(
                    fact_id=str(row["fact_id"]),
                    tenant=str(row["tenant"]),
                    bank_question=str(row["bank_question"]),
                    bank_answer=str(row["bank_answer"]),
                    questions=tuple(str(q) for q in row["questions"]),
                    fact_token=str(row["fact_token"]),
                )
            except KeyError as exc:
                raise ValueError(f"{path}:{n}: a fact needs {exc.args[0]!r}") from exc
            if not carries_fact(fact.bank_answer, fact.fact_token):
                raise ValueError(f"{path}:{n}: the bank answer does not carry its own fact token")
            out.append(fact)
    return out
