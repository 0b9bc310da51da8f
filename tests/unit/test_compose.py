"""docker-compose.yml and the Dockerfile stay consistent with the service's real settings.

There is no Docker engine here, so both files are checked statically: every variable
they give chatgate is one the service reads (no typos that silently do nothing), the
addresses point at the right services and ports, every service has a health check and a
restart policy, and the image's user owns the spool directory, which sits on a volume.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
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


# --- the image (Dockerfile) ----------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def commands_of(run: str) -> list[list[str]]:
    """The words of each command a RUN line chains with ``&&``."""
    commands: list[list[str]] = [[]]
    for word in shlex.split(run):
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile():
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def image_user() -> str:
    users = [rest for keyword, rest in dockerfile() if keyword == "USER"]
    assert users, "the image must not run as root"
    return users[-1]


def spool_dir() -> PurePosixPath:
    """The spool directory of the composed chatgate: compose's setting, else the image's."""
    environment = compose()["services"]["chatgate"]["environment"]
    value = environment.get("CHATGATE_SPOOL_DIR") or image_env().get("CHATGATE_SPOOL_DIR")
    assert value, "without CHATGATE_SPOOL_DIR the spool lands in the read-only /app"
    return PurePosixPath(value)


def test_the_images_user_owns_the_spool_directory() -> None:
    user = image_user()
    assert user not in ("root", "0")
    spool = spool_dir()
    workdir = PurePosixPath([rest for keyword, rest in dockerfile() if keyword == "WORKDIR"][-1])
    # /app belongs to root: the user could not create .chatgate/spool there.
    assert not spool.is_relative_to(workdir)
    made: set[PurePosixPath] = set()
    owned: set[PurePosixPath] = set()
    for keyword, rest in dockerfile():
        if keyword != "RUN":
            continue
        for words in commands_of(rest):
            if words[:1] == ["mkdir"]:
                made |= {PurePosixPath(w) for w in words[1:] if not w.startswith("-")}
            if words[:1] == ["chown"]:
                args = [w for w in words[1:] if not w.startswith("-")]
                assert "-R" in words, words
                assert args[0].split(":")[0] == user, words
                owned |= {PurePosixPath(w) for w in args[1:]}
    assert spool in made, "the spool directory exists in the image (a new volume copies its owner)"
    assert any(spool.is_relative_to(directory) for directory in owned), (spool, owned)


def test_the_image_sets_only_real_settings() -> None:
    known = variables_the_service_reads()
    chatgate_names = [name for name in image_env() if name.startswith("CHATGATE_")]
    assert chatgate_names, "the image sets CHATGATE_SPOOL_DIR"
    assert [name for name in chatgate_names if name not in known] == []
    assert "CHATGATE_SPOOL_DIR" in chatgate_names


def test_the_spool_is_on_a_named_volume() -> None:
    data = compose()
    mounts = [str(m).split(":") for m in data["services"]["chatgate"].get("volumes", [])]
    mounted_at_spool = [source for source, target, *_ in mounts if PurePosixPath(target) == spool_dir()]
    assert len(mounted_at_spool) == 1, mounts
    assert mounted_at_spool[0] in (data.get("volumes") or {}), "a named volume, declared at the top level"


def test_restart_policies() -> None:
    for name, service in compose()["services"].items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name


def test_health_checks_cover_the_ledger() -> None:
    compose_check = compose()["services"]["chatgate"]["healthcheck"]["test"]
    assert compose_check[:3] == ["CMD", "chatgate", "health"] and "--ledger" in compose_check
    image_checks = [rest for keyword, rest in dockerfile() if keyword == "HEALTHCHECK"]
    assert len(image_checks) == 1
    assert '["chatgate", "health", "--ledger"]' in image_checks[0]


def test_the_image_installs_only_the_hashed_lock() -> None:
    installs = [rest for keyword, rest in dockerfile() if keyword == "RUN" and "pip install" in rest]
    assert installs
    first = shlex.split(installs[0])
    assert "--require-hashes" in first and first[first.index("-r") + 1].endswith("requirements.lock")
    for later in installs[1:]:
        # Our own packages: their dependencies came from the lock; nothing is fetched.
        assert "--no-deps" in later and "--no-index" in later, later
