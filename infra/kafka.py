"""Kafka connection settings -> faust credentials and aiokafka keyword arguments, in one place."""

from __future__ import annotations

import ssl
from typing import Any

import faust

from .settings import KafkaSettings, Settings

__all__ = ["kafka_client_kwargs", "kafka_consumer_kwargs", "kafka_credentials"]


def kafka_credentials(kafka: KafkaSettings) -> Any:
    """faust/aiokafka credentials from settings (None for PLAINTEXT)."""
    if kafka.security_protocol == "PLAINTEXT":
        return None
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
        if kafka.ssl_certfile:
            context.load_cert_chain(
                str(kafka.ssl_certfile), str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None
            )
    if kafka.security_protocol == "SSL":
        return context
    if kafka.sasl_username is None or kafka.sasl_password is None:
        raise ValueError(
            f"kafka.security_protocol={kafka.security_protocol} needs kafka.sasl_username and "
            "kafka.sasl_password (ECHOLM_KAFKA__SASL_USERNAME / ECHOLM_KAFKA__SASL_PASSWORD)"
        )
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_password.get_secret_value(),
        mechanism=kafka.sasl_mechanism or "PLAIN",
        ssl_context=context,
    )


def kafka_client_kwargs(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments (bootstrap servers and security) for producers, consumers, admin."""
    k = settings.kafka
    kw: dict[str, Any] = {"bootstrap_servers": k.bootstrap_servers}
    creds = kafka_credentials(k)
    if creds is None:
        return kw
    kw["security_protocol"] = k.security_protocol
    if k.security_protocol == "SSL":
        kw["ssl_context"] = creds
    else:
        kw.update(
            sasl_mechanism=k.sasl_mechanism or "PLAIN",
            sasl_plain_username=k.sasl_username,
            sasl_plain_password=k.sasl_password.get_secret_value() if k.sasl_password else None,
            ssl_context=creds.ssl_context,
        )
    return kw


def kafka_consumer_kwargs(settings: Settings, *, background: bool = False) -> dict[str, Any]:
    """``kafka_client_kwargs`` plus the consumer's fetch wait and, with
    ``kafka.processing_guarantee=exactly_once``, ``read_committed`` (records of aborted transactions,
    e.g. a reply written by a worker that died before its commit, are never read).

    The wait is ``kafka.fetch_max_wait_ms`` on the request path (workers' and clients' consumers) and
    ``kafka.background_fetch_max_wait_ms`` for ``background`` consumers, which no request waits on."""
    k = settings.kafka
    wait = k.background_fetch_max_wait_ms if background else k.fetch_max_wait_ms
    kw = {**kafka_client_kwargs(settings), "fetch_max_wait_ms": wait}
    if k.processing_guarantee == "exactly_once":
        kw["isolation_level"] = "read_committed"
    return kw
