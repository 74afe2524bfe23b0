"""Generated support questions, their stand-in answers, and bank rows built from them (seeded)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from infra.protocols import Example

__all__ = ["answer", "bank_example", "question"]

_SUBJECTS = (
    "password", "invoice", "order", "subscription", "refund", "account", "shipping address", "credit card",
    "delivery", "warranty", "hotel booking", "flight", "prescription", "doctor's appointment",
    "insurance claim", "wifi router", "printer", "laptop battery", "email settings", "phone plan",
    "gift card", "loyalty points", "tax return", "bank transfer", "rental car", "train ticket",
    "gym membership", "cloud backup", "two-factor login", "parking permit", "library card", "utility bill",
    "home insurance", "mortgage payment", "student loan", "pension plan", "travel visa", "passport",
    "driving licence", "VPN connection",
)  # fmt: skip
_ACTIONS = (
    "reset", "change", "cancel", "track", "update", "check the status of", "get a copy of", "dispute",
    "renew", "transfer", "set up", "pay for", "report a problem with", "upgrade", "verify",
    "close", "pause", "recover", "share", "download a receipt for",
)  # fmt: skip
_OPENERS = (
    "How do I", "How can I", "What is the fastest way to", "Can you explain how to", "I need help to",
    "Is it possible to", "What are the steps to", "Please tell me how to",
)  # fmt: skip
_QUALIFIERS = (
    "", " on the mobile app", " without logging in", " from abroad", " for my business account",
    " before the deadline", " if I forgot my details", " for a family member",
)  # fmt: skip


def question(rng: np.random.Generator) -> str:
    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    return f"{pick(_OPENERS)} {pick(_ACTIONS)} my {pick(_SUBJECTS)}{pick(_QUALIFIERS)}?"


def answer(prompt: str) -> str:
    topic = prompt.rstrip("?")
    return (
        f"To handle this ({topic.lower()}): sign in, open Settings, choose the matching section and "
        "follow the steps shown. Keep your reference number; changes take effect within one business "
        "day, and support can help if anything fails."
    )


def bank_example(
    tenant: str, request: str, vector: np.ndarray, rng: np.random.Generator, now: float
) -> Example:
    key = hashlib.sha256(f"{tenant}\x00{request}".encode()).hexdigest()[:32]
    age = float(rng.uniform(0, 7 * 86400))
    return Example(
        example_id=key,
        tenant=tenant,
        request=request,
        response=answer(request),
        embedding=vector.astype(np.float32),
        model_tier="large",
        quality=float(rng.uniform(0.5, 0.95)),
        offloads=float(rng.integers(0, 5)),
        created_at=now - age,
        updated_at=now - age / 2,
    )
