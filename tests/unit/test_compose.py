"""docker-compose.yml stays consistent with the service's real settings.

There is no Docker engine here, so the file is checked statically: every variable it
gives chatgate is one the service reads (no typos that silently do nothing), the
addresses point at the right services and ports, and every service has a health check.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from chatgate_server.config import Settings

ROOT = Path(__file__).resolve().parents[2]


class RecordingEnv(Mapping[str, str]):
    """An environment that answers every lookup and remembers the names asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self._values[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return self._values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def variables_the_service_reads() -> set[str]:
    env = RecordingEnv({"OPENAI_API_KEY": "sk-x", "DATABASE_URL": "postgresql://h/db"})
    Settings.from_env(env)
    return env.asked


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_recording_finds_the_known_variables() -> None:
    names = variables_the_service_reads()
    assert {"OPENAI_API_KEY", "OPENAI_BASE_URL", "DATABASE_URL", "CHATGATE_LISTEN"} <= names


def test_every_chatgate_variable_is_one_the_service_reads() -> None:
    chatgate = compose()["services"]["chatgate"]
    known = variables_the_service_reads()
    unknown = [name for name in chatgate["environment"] if name not in known and not name.startswith("OTEL_")]
    assert unknown == []
    # The entrypoint's fallback sets variables too.
    script = " ".join(chatgate["command"])
    assert "OPENAI_API_KEY=" in script and "OPENAI_BASE_URL=http://simulator:8000/v1" in script


def test_addresses_point_at_the_right_services() -> None:
    services = compose()["services"]
    env = services["chatgate"]["environment"]
    db = urlsplit(env["DATABASE_URL"])
    assert db.hostname == "postgres" and db.port == 5432
    assert db.username == services["postgres"]["environment"]["POSTGRES_USER"]
    assert db.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]
    otlp = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otlp.hostname == "jaeger" and otlp.port == 4317
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    listen_port = env["CHATGATE_LISTEN"].rsplit(":", 1)[1]
    assert f"{listen_port}:{listen_port}" in services["chatgate"]["ports"]
    assert "--port" in services["simulator"]["command"]
    sim_port = services["simulator"]["command"][services["simulator"]["command"].index("--port") + 1]
    assert sim_port == "8000"


def test_every_service_has_a_health_check_and_dependencies_exist() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert "healthcheck" in service, name
    for dependency, condition in services["chatgate"]["depends_on"].items():
        assert dependency in services
        assert condition == {"condition": "service_healthy"}
    assert services["chatgate"]["healthcheck"]["test"][:2] == ["CMD", "chatgate"]


def test_settings_accept_what_compose_sets() -> None:
    env = dict(compose()["services"]["chatgate"]["environment"])
    env["OPENAI_API_KEY"] = "sk-simulator"
    settings = Settings.from_env({k: str(v) for k, v in env.items()})
    assert settings.listen.port == 50051
    assert settings.migrate_on_start is True
