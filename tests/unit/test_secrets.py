"""Credentials (Kafka SASL password, Milvus token, TGI tokens) are ``SecretStr`` settings and never
appear in ``repr``, in ``echolm config``'s output or its error message, or in any log record of the
worker's start-up path (the app built, adapters opened, a backend called)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import orjson
import pytest
from pydantic import SecretStr

from echolm.cli import main as echolm_main
from infra.kafka import kafka_client_kwargs, kafka_credentials
from infra.milvus import MilvusExampleStore
from infra.protocols import ChatMessage, GenerationParams
from infra.settings import Settings, child_env, load_settings, masked
from infra.tgi import TGIGenerator, TGIQueueProbe
from tests.fakes.backends import FakeGenerator, agent_harness, fake_factories
from tests.fakes.embedder import FakeEmbedder
from tests.fakes.vector_store import FakeVectorStore

KAFKA_PASSWORD = "kafka-pw-7f3a9c-S3CRET"
MILVUS_TOKEN = "root:milvus-tok-51d0e2-S3CRET"
TGI_TOKEN = "hf_tgi-tok-b88e41-S3CRET"
SECRETS = (KAFKA_PASSWORD, MILVUS_TOKEN, TGI_TOKEN)

BACKENDS = [
    {"name": "small-0", "url": "http://127.0.0.1:9", "tier": "small", "token": TGI_TOKEN},
    {"name": "large-0", "url": "http://127.0.0.1:9", "tier": "large", "token": TGI_TOKEN},
]


def _leaks(text: str) -> list[str]:
    """Secrets in ``text``, whole or in part (pydantic truncates long values to their two ends)."""
    return [s for s in SECRETS if s in text or "S3CRET" in text]


@pytest.fixture
def secret_settings() -> Settings:
    return load_settings(
        kafka={
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "echolm",
            "sasl_password": KAFKA_PASSWORD,
        },
        milvus={"token": MILVUS_TOKEN},
        tgi={"backends": BACKENDS},
    )


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The same secrets the way a deployment passes them: environment variables."""
    monkeypatch.chdir(tmp_path)  # no stray ./echolm.toml
    monkeypatch.delenv("ECHOLM_CONFIG", raising=False)
    monkeypatch.setenv("ECHOLM_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("ECHOLM_KAFKA__SASL_USERNAME", "echolm")
    monkeypatch.setenv("ECHOLM_KAFKA__SASL_PASSWORD", KAFKA_PASSWORD)
    monkeypatch.setenv("ECHOLM_MILVUS__TOKEN", MILVUS_TOKEN)
    monkeypatch.setenv("ECHOLM_TGI__BACKENDS", orjson.dumps(BACKENDS).decode())


def test_secrets_are_secret_types(secret_settings: Settings) -> None:
    assert isinstance(secret_settings.kafka.sasl_password, SecretStr)
    assert isinstance(secret_settings.milvus.token, SecretStr)
    assert all(isinstance(b.token, SecretStr) for b in secret_settings.tgi.backends)
    # ...and the code that needs them still gets the real values.
    assert kafka_client_kwargs(secret_settings)["sasl_plain_password"] == KAFKA_PASSWORD
    assert secret_settings.milvus.token is not None
    assert secret_settings.milvus.token.get_secret_value() == MILVUS_TOKEN


def test_no_secret_in_repr_str_or_dumps(secret_settings: Settings) -> None:
    for text in (
        repr(secret_settings),
        str(secret_settings),
        repr(secret_settings.kafka),
        repr(secret_settings.tgi.backends),
        secret_settings.model_dump_json(),
        str(secret_settings.model_dump()),
        orjson.dumps(masked(secret_settings)).decode(),
        repr(kafka_credentials(secret_settings.kafka)),
        repr(MilvusExampleStore(secret_settings.milvus)),
    ):
        assert not _leaks(text), text[:200]


def test_child_env_carries_secrets_only_to_the_child(secret_settings: Settings) -> None:
    """Workers started by `echolm up` get the settings as environment variables: the one place the
    values must be in clear (the child needs them); they never go through a log."""
    env = child_env(secret_settings)
    assert KAFKA_PASSWORD in env["ECHOLM_KAFKA"] and TGI_TOKEN in env["ECHOLM_TGI"]


def test_echolm_config_masks_secrets(secret_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert echolm_main(["config"]) == 0
    out, err = capsys.readouterr()
    assert not _leaks(out + err)
    config = orjson.loads(out)
    assert config["kafka"]["sasl_password"] == "**********"
    assert config["milvus"]["token"] == "**********"
    assert {b["token"] for b in config["tgi"]["backends"]} == {"**********"}


@pytest.mark.parametrize(
    "bad",
    [
        # a model-level validator rejects the whole section: pydantic used to echo it, tokens included
        {"ECHOLM_TGI__BACKENDS": orjson.dumps([BACKENDS[1], BACKENDS[1]]).decode()},
        {"ECHOLM_TGI__LARGE_TIER": "huge"},
        {"ECHOLM_KAFKA__SECURITY_PROTOCOL": "SASL_BOGUS"},
        {"ECHOLM_MILVUS__TIMEOUT_S": "-1"},
    ],
)
def test_invalid_configuration_error_does_not_echo_secrets(
    secret_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bad: dict[str, str]
) -> None:
    for key, value in bad.items():
        monkeypatch.setenv(key, value)
    assert echolm_main(["config"]) == 2
    out, err = capsys.readouterr()
    assert "invalid configuration" in err
    assert not _leaks(out + err), err


async def test_worker_start_up_logs_no_secret(
    secret_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up path a worker runs, at DEBUG: the app built with SASL credentials, Resources
    opening adapters (one of them failing, which logs a traceback), real TGI adapters with tokens
    calling a backend that fails, and the queue probe scraping it."""
    caplog.set_level(logging.DEBUG)
    factories = fake_factories(
        embedder=FakeEmbedder(),
        store=None,  # Milvus down at start: logged with a traceback, retried
        generators=[FakeGenerator("small-0"), FakeGenerator("large-0")],
    )
    async with agent_harness(secret_settings, factories, agents=("prepare", "serve")) as harness:
        assert harness.resources.store is None

    def failing(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions"):
            assert request.headers["authorization"] == f"Bearer {TGI_TOKEN}"  # sent, never logged
        return httpx.Response(500, json={"error": "boom"})

    backend = secret_settings.tgi.backends[0]
    generator = TGIGenerator.from_settings(
        backend, secret_settings.tgi, transport=httpx.MockTransport(failing)
    )
    async with generator:
        with pytest.raises(Exception) as caught:  # the type is checked below
            await generator.generate(
                [ChatMessage(role="user", content="hi")], GenerationParams(max_new_tokens=2)
            )
    assert caught.type.__name__ == "BackendUnavailable"
    probe = TGIQueueProbe.from_settings(secret_settings.tgi, transport=httpx.MockTransport(failing))
    async with probe:
        await probe.refresh()
    FakeVectorStore()  # constructed like the real store would be; nothing to log

    texts = [record.getMessage() for record in caplog.records]
    texts += [str(record.exc_info[1]) for record in caplog.records if record.exc_info]
    assert texts, "the start-up path logged nothing: the test would prove nothing"
    leaks = [t for t in texts if _leaks(t)]
    assert not leaks, leaks[:3]
    assert not _leaks(str(caught.value)) and not _leaks(repr(generator))
