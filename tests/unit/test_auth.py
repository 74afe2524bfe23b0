"""API keys are stored hashed and map to tenants; per-tenant token buckets."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra import auth
from infra.auth import (
    SCRYPT_MISSES_PER_S,
    KeyRing,
    RateLimiter,
    hash_key,
    load_key_entries,
    new_api_key,
    verify_key,
)
from infra.settings import ApiKeySettings, GatewaySettings


def test_new_keys_are_long_and_distinct() -> None:
    keys = {new_api_key() for _ in range(100)}
    assert len(keys) == 100 and all(len(k) >= 40 for k in keys)


@pytest.mark.parametrize("scheme", ["sha256", "scrypt"])
def test_a_hash_verifies_its_key_only_and_never_contains_it(scheme: str) -> None:
    key = new_api_key()
    stored = hash_key(key, scheme=scheme)
    assert stored.startswith(scheme + ":") and key not in stored
    assert verify_key(key, stored)
    assert not verify_key(key + "x", stored)
    assert not verify_key(key[:-1], stored)


def test_scrypt_hashes_are_salted() -> None:
    assert hash_key("same key", scheme="scrypt") != hash_key("same key", scheme="scrypt")


def test_keyring_maps_keys_to_their_tenants_and_refuses_others() -> None:
    acme, globex, slow = new_api_key(), new_api_key(), "a passphrase someone chose"
    ring = KeyRing(
        [
            ApiKeySettings(tenant="acme", key_hash=hash_key(acme)),
            ApiKeySettings(tenant="globex", key_hash=hash_key(globex)),
            ApiKeySettings(tenant="slow", key_hash=hash_key(slow, scheme="scrypt")),
        ]
    )
    assert ring.entry_for(acme, now=0.0).tenant == "acme"  # type: ignore[union-attr]
    assert ring.entry_for(globex, now=0.0).tenant == "globex"  # type: ignore[union-attr]
    assert ring.entry_for(slow, now=0.0).tenant == "slow"  # type: ignore[union-attr]
    assert ring.entry_for(slow, now=0.0).tenant == "slow"  # type: ignore[union-attr]  # remembered
    for wrong in ("", "elm-", acme[:-1], acme.upper(), hash_key(acme), hash_key(acme).split(":")[1]):
        assert ring.entry_for(wrong, now=0.0) is None


def test_unknown_keys_cannot_make_unbounded_scrypt_work(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing([ApiKeySettings(tenant="slow", key_hash=hash_key("k", scheme="scrypt"))])
    calls: list[str] = []
    monkeypatch.setattr(auth, "verify_key", lambda key, stored: calls.append(key) or False)
    for i in range(200):
        assert ring.entry_for(f"guess-{i}", now=0.0) is None
    assert len(calls) <= SCRYPT_MISSES_PER_S
    assert ring.entry_for("guess-x", now=1.0) is None and len(calls) > SCRYPT_MISSES_PER_S  # refilled


def test_keys_file_lines_and_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    good = hash_key("k1")
    path.write_text(f"# tenants\n\nacme {good}\n")
    assert load_key_entries(path) == [ApiKeySettings(tenant="acme", key_hash=good)]
    path.write_text(f"acme {good}\nglobex not-a-hash\n")
    with pytest.raises(ValueError, match=r"keys:2"):
        load_key_entries(path)


def test_keyring_from_settings_merges_the_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"globex {hash_key('k2')}\n")
    gw = GatewaySettings(api_keys=[ApiKeySettings(tenant="acme", key_hash=hash_key("k1"))], keys_file=path)
    ring = KeyRing.from_settings(gw)
    assert len(ring) == 2
    assert ring.entry_for("k2", now=0.0).tenant == "globex"  # type: ignore[union-attr]


def test_settings_refuse_a_plain_key_where_a_hash_belongs() -> None:
    with pytest.raises(ValueError, match="key_hash"):
        ApiKeySettings(tenant="acme", key_hash="elm-plaintext-key")


def test_rate_limiter_allows_the_burst_then_refills_per_tenant() -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.acquire("acme", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("acme", 0.0)
    assert wait == pytest.approx(0.5)
    assert limiter.acquire("globex", 0.0) == 0.0  # another tenant's bucket is its own
    assert limiter.acquire("acme", 0.5) == 0.0  # refilled one token after 1/rate seconds
    assert limiter.acquire("acme", 0.5) > 0


def test_rate_limiter_per_key_overrides() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1)
    assert [limiter.acquire("big", 0.0, burst=5) for _ in range(5)] == [0.0] * 5
    assert limiter.acquire("big", 0.0, burst=5) > 0
