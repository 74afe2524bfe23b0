"""API keys and per-tenant rate limits for the gateway.

Keys are never stored, only their hashes (``gateway.api_keys`` or a ``gateway.keys_file``):

* ``sha256:<hex>`` for generated keys (``new_api_key``: 256 random bits). A key that long needs no
  salt or stretching, and the hash is a dictionary lookup per request, so this is the default.
* ``scrypt:<n>:<r>:<p>:<salt>:<hex>`` for keys a person chose. Checking one costs a scrypt per
  configured scrypt entry, so a verified key is remembered (by its sha256, in memory) and unknown
  keys are tried against scrypt entries at most ``SCRYPT_MISSES_PER_S`` times a second.

``KeyRing.tenant_for(key)`` answers the tenant or None; ``RateLimiter.acquire(tenant, now)``
answers 0 (go) or the seconds to wait. Both are pure (the clock is passed in).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from infra.settings import ApiKeySettings, GatewaySettings

__all__ = [
    "SCRYPT_MISSES_PER_S",
    "KeyRing",
    "RateLimiter",
    "hash_key",
    "load_key_entries",
    "new_api_key",
    "verify_key",
]

KEY_PREFIX = "elm-"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_MISSES_PER_S = 20.0


def new_api_key() -> str:
    """A fresh random API key (256 bits, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _scrypt(key: str, salt: bytes, n: int, r: int, p: int) -> str:
    return hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32).hex()


def hash_key(key: str, *, scheme: str = "sha256") -> str:
    """The stored form of ``key``: ``sha256:<hex>``, or ``scrypt:n:r:p:salt:hex`` with a random salt."""
    if not key:
        raise ValueError("an API key cannot be empty")
    if scheme == "sha256":
        return "sha256:" + _sha256(key)
    if scheme == "scrypt":
        salt = secrets.token_bytes(16)
        digest = _scrypt(key, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        return f"scrypt:{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}:{salt.hex()}:{digest}"
    raise ValueError(f"unknown key hash scheme {scheme!r}; use sha256 or scrypt")


def verify_key(key: str, stored: str) -> bool:
    """Whether ``key`` hashes to ``stored`` (constant-time compare)."""
    scheme, _, rest = stored.partition(":")
    if scheme == "sha256":
        return hmac.compare_digest(_sha256(key), rest)
    if scheme == "scrypt":
        n, r, p, salt, digest = rest.split(":")
        return hmac.compare_digest(_scrypt(key, bytes.fromhex(salt), int(n), int(r), int(p)), digest)
    raise ValueError(f"unknown key hash scheme {scheme!r}")


def load_key_entries(path: Path) -> list[ApiKeySettings]:
    """Read a keys file: one ``<tenant> <key hash>`` per line; blank lines and ``#`` comments skipped."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: want '<tenant> <key hash>', got {len(parts)} fields")
        try:
            entries.append(ApiKeySettings(tenant=parts[0], key_hash=parts[1]))
        except ValueError as exc:
            raise ValueError(
                f"{path}:{number}: not a tenant and a key hash ({exc.__class__.__name__})"
            ) from None
    return entries


class KeyRing:
    """Hashed API keys -> tenants."""

    def __init__(self, entries: Iterable[ApiKeySettings]) -> None:
        self._by_sha: dict[str, ApiKeySettings] = {}
        self._scrypt: list[ApiKeySettings] = []
        for entry in entries:
            if entry.key_hash.startswith("sha256:"):
                self._by_sha[entry.key_hash.removeprefix("sha256:")] = entry
            else:
                self._scrypt.append(entry)
        self._miss_bucket = _Bucket(rate=SCRYPT_MISSES_PER_S, burst=SCRYPT_MISSES_PER_S)

    def __len__(self) -> int:
        return len(self._by_sha) + len(self._scrypt)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> KeyRing:
        entries = list(settings.api_keys)
        if settings.keys_file is not None:
            entries += load_key_entries(settings.keys_file)
        return cls(entries)

    def entry_for(self, key: str, *, now: float) -> ApiKeySettings | None:
        """The configured entry of ``key``, or None for an unknown key."""
        if not key:
            return None
        digest = _sha256(key)
        entry = self._by_sha.get(digest)
        if entry is not None or not self._scrypt:
            return entry
        if self._miss_bucket.take(now) > 0:  # bound the scrypt work unknown keys can cause
            return None
        for candidate in self._scrypt:
            if verify_key(key, candidate.key_hash):
                self._by_sha[digest] = candidate  # remembered in memory only, by the key's sha256
                return candidate
        return None


@dataclass
class _Bucket:
    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def take(self, now: float) -> float:
        """Take one token: 0 when granted, else the seconds until one is available."""
        if self.tokens < 0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class RateLimiter:
    """A token bucket per tenant: ``rate_per_s`` refill, ``burst`` capacity (per-key overrides)."""

    rate_per_s: float
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def acquire(
        self, tenant: str, now: float, *, rate_per_s: float | None = None, burst: int | None = None
    ) -> float:
        """0 when the request may go, else the seconds until the tenant may send again."""
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = _Bucket(rate=rate_per_s or self.rate_per_s, burst=float(burst or self.burst))
            self._buckets[tenant] = bucket
        return bucket.take(now)
