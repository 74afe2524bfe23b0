"""Tenant signatures on the Kafka path: HMAC-SHA256 of a record with its tenant's secret.

A record produced straight to Kafka names its tenant in a JSON field; any producer can write any
name. With ``limits.tenant_secrets`` configured, a request or a feedback record must carry
``signature``: ``"v1=" + hex(HMAC-SHA256(secret of its tenant, canonical bytes))``, where the
canonical bytes are the record's JSON object without ``signature``, keys sorted, as orjson writes it
(``canonical``). Every field is covered, so a signed record cannot be given another tenant, reply
topic, request id or rating without the secret. The threat model is in docs/reliability.md.

Pure functions: no settings object and no I/O here; ``streams.records`` and ``agents.learn`` apply
them, ``EchoClient`` and the gateway sign with them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["SIGNATURE_FIELD", "canonical", "sign", "verify"]

SIGNATURE_FIELD = "signature"
_VERSION = "v1="


def canonical(data: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: every field but ``signature``, keys sorted."""
    return orjson.dumps({k: v for k, v in data.items() if k != SIGNATURE_FIELD}, option=orjson.OPT_SORT_KEYS)


def sign(data: Mapping[str, Any], secret: str) -> str:
    """The signature of ``data`` under ``secret``."""
    return _VERSION + hmac.new(secret.encode(), canonical(data), hashlib.sha256).hexdigest()


def verify(data: Mapping[str, Any], secret: str) -> bool:
    """Whether ``data[signature]`` is ``sign(data, secret)`` (constant-time comparison)."""
    given = data.get(SIGNATURE_FIELD)
    return isinstance(given, str) and hmac.compare_digest(given, sign(data, secret))
