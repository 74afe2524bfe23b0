"""The faust app factory. Nothing is built at import: ``build_faust_app(settings)`` returns a fresh app.

Topology (see streams/topology.py and docs/architecture.md)::

    requests --prepare(take: parse, embed, retrieve, select)--> prepared
    prepared --serve(concurrency N: route, generate)----------> replies (+ log)
    log      --admit(take: admission, upsert into Milvus)
    log      --learn(join with feedback, update router/utility models)
    feedback --learn
"""

from __future__ import annotations

import faust

from infra.kafka import kafka_credentials
from infra.settings import Settings

from .codecs import ORJSON_CODEC, register_codecs
from .topology import Topics, declare_topics
from .transport import install_fetch_wait

__all__ = ["build_faust_app"]


def build_faust_app(settings: Settings) -> tuple[faust.App, Topics]:
    """A fresh faust app with our codecs, consumer fetch wait and topics; no agents, no adapters.

    The worker's composition root, ``echolm.app.build_app``, adds the adapters (``Resources``) and
    registers the agents: streams sits below agents and never imports them.
    """
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
        # exactly_once: a transactional producer per partition, offsets committed in the transaction,
        # read_committed consumers (real Kafka only: docs/reliability.md, "Transactions")
        processing_guarantee=k.processing_guarantee,
        loghandlers=[],
    )
    install_fetch_wait(app, k.fetch_max_wait_ms)
    return app, declare_topics(app, settings)
