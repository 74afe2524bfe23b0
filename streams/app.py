"""The faust app factory. Nothing is built at import: ``build_app(settings)`` returns a fresh app.

Topology (see streams/topology.py and docs/architecture.md)::

    requests --prepare(take: parse, embed, retrieve, select)--> prepared
    prepared --serve(concurrency N: route, generate)----------> replies (+ log)
    log      --admit(take: admission, upsert into Milvus)
    log      --learn(join with feedback, update router/utility models)
    feedback --learn
"""

from __future__ import annotations

import ssl
from typing import Any

import faust

from infra.metrics import Metrics
from infra.resources import AdapterFactories, Resources
from infra.settings import KafkaSettings, Settings

from .codecs import ORJSON_CODEC, register_codecs
from .topology import Topics, declare_topics

__all__ = ["build_app", "kafka_credentials"]


def kafka_credentials(kafka: KafkaSettings) -> Any:
    """faust/aiokafka credentials from settings (None for PLAINTEXT)."""
    if kafka.security_protocol == "PLAINTEXT":
        return None
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
        if kafka.ssl_certfile:
            context.load_cert_chain(str(kafka.ssl_certfile), str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None)
    if kafka.security_protocol == "SSL":
        return context
    if kafka.sasl_username is None or kafka.sasl_password is None:
        raise ValueError(
            f"kafka.security_protocol={kafka.security_protocol} needs kafka.sasl_username and kafka.sasl_password "
            "(ECHOLM_KAFKA__SASL_USERNAME / ECHOLM_KAFKA__SASL_PASSWORD)"
        )
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_password.get_secret_value(),
        mechanism=kafka.sasl_mechanism or "PLAIN",
        ssl_context=context,
    )


def build_app(
    settings: Settings,
    *,
    factories: AdapterFactories | None = None,
    metrics: Metrics | None = None,
    agents: tuple[str, ...] | None = None,
) -> tuple[faust.App, Topics, Resources]:
    """Build the worker app. ``agents`` limits which agents register (default: by ``worker.role``)."""
    register_codecs()
    k, w = settings.kafka, settings.worker
    app = faust.App(
        w.app_id,
        broker=[f"kafka://{server.strip()}" for server in k.bootstrap_servers.split(",")],
        broker_credentials=kafka_credentials(k),
        store="memory://",
        value_serializer=ORJSON_CODEC,
        key_serializer="raw",
        datadir=str(w.data_dir),
        web_enabled=False,
        topic_partitions=k.partitions,
        topic_replication_factor=k.replication_factor,
        topic_allow_declare=True,
        broker_session_timeout=k.session_timeout_s,
        broker_heartbeat_interval=k.heartbeat_interval_s,
        broker_commit_interval=k.commit_interval_s,
        stream_recovery_delay=0,
        producer_max_batch_size=k.producer_max_batch_size,
        consumer_auto_offset_reset="earliest",
        loghandlers=[],
    )
    topics = declare_topics(app, settings)
    resources = Resources(settings, factories=factories, metrics=metrics, loop=None)
    app.service(resources)

    from agents import register_agents  # agents import streams; import here to keep the order explicit

    register_agents(app, topics, resources, only=agents)
    return app, topics, resources
