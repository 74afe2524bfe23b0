"""SASL/SCRAM settings reach every Kafka client the same way: faust's worker (credentials), aiokafka
clients (keyword arguments), and a SASL setting without its credentials fails at load, by name."""

from __future__ import annotations

import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import ValidationError

from infra.kafka import kafka_client_kwargs, kafka_credentials
from infra.settings import load_settings

SCRAM = {
    "security_protocol": "SASL_PLAINTEXT",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "worker",
    "sasl_password": "scram-password-value",
}


def test_scram_settings_become_the_same_auth_for_faust_and_aiokafka() -> None:
    settings = load_settings(kafka=SCRAM)
    credentials = kafka_credentials(settings.kafka)
    assert isinstance(credentials, faust.SASLCredentials)
    faust_auth = dict(credentials_to_aiokafka_auth(credentials))
    client_auth = kafka_client_kwargs(settings)
    for key, value in {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "worker",
        "sasl_plain_password": "scram-password-value",
        "ssl_context": None,
    }.items():
        assert faust_auth[key] == value
        assert client_auth[key] == value
    assert "scram-password-value" not in repr(settings) + repr(credentials)


@pytest.mark.parametrize("missing", ["sasl_username", "sasl_password"])
def test_sasl_without_its_credentials_fails_at_load(missing: str) -> None:
    with pytest.raises(ValidationError, match=r"needs kafka\.sasl_username and kafka\.sasl_password"):
        load_settings(kafka={k: v for k, v in SCRAM.items() if k != missing})
