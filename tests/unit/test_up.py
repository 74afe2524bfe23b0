"""``echolm up``'s gateway keys: a key minted per run when none is configured, else the configured ones."""

from __future__ import annotations

from echolm.up import LOCAL_TENANT, gateway_access
from infra.auth import KeyRing, hash_key
from infra.settings import load_settings


def test_without_configured_keys_up_mints_one_for_the_local_tenant_and_keeps_its_hash() -> None:
    settings, key = gateway_access(load_settings())
    assert key is not None and key.startswith("elm-")
    entry = KeyRing.from_settings(settings.gateway).entry_for(key, now=0.0)
    assert entry is not None and entry.tenant == LOCAL_TENANT
    assert all(key not in e.key_hash for e in settings.gateway.api_keys)  # only the hash is kept
    assert gateway_access(load_settings())[1] != key  # a fresh key each run


def test_configured_keys_or_a_trusted_tenant_are_used_as_they_are() -> None:
    keyed = load_settings(gateway={"api_keys": [{"tenant": "acme", "key_hash": hash_key("elm-x")}]})
    assert gateway_access(keyed) == (keyed, None)
    trusted = load_settings(gateway={"trusted_tenant": "solo"})
    assert gateway_access(trusted) == (trusted, None)
