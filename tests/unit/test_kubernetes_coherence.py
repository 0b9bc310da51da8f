"""deploy/kubernetes agrees with the Dockerfile, docker-compose.yml, the service's
settings and docs/RUNBOOK.md.

The manifests run the image the Dockerfile builds (and compose tags), as the user that
owns its data directory, on its port, with settings the service really reads; the
Secrets the runbook tells operators to create hold the files the pods read.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from chatgate_server.config import Settings
from chatgate_server.workers import resolve_workers
from tests.conftest import REPO_ROOT
from tests.kubernetes import Rendered, environment, mount_of, rendered
from tests.unit.test_compose import RecordingEnv, commands_of, compose, dockerfile, image_env, image_user

RUNBOOK = REPO_ROOT / "docs" / "RUNBOOK.md"
# python:3.11-slim is Debian: nobody is uid 65534, nogroup gid 65534.
DEBIAN_IDS = {"nobody": 65534, "nogroup": 65534}
# Settings the manifests set for work being merged beside this (issue 17's server side,
# issue 16's chatgate.toml). Once the service reads them they are checked like the rest.
PENDING = {
    "CHATGATE_CONFIG",
    "CHATGATE_HEALTH_LISTEN",
    "CHATGATE_MAX_CONNECTION_AGE_SECONDS",
    "CHATGATE_MAX_CONNECTION_AGE_GRACE_SECONDS",
}
# libpq's own variables (the Postgres service file), read by psycopg, not by Settings.
LIBPQ = {"PGSERVICEFILE"}


@pytest.fixture(scope="module", params=["base", "example"])
def objects(request: pytest.FixtureRequest) -> Rendered:
    return rendered(request.param)


def version() -> str:
    return str(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"])


def image_labels() -> dict[str, str]:
    labels: dict[str, str] = {}
    for keyword, rest in dockerfile():
        if keyword == "LABEL":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                labels[name] = value
    return labels


def chatgate_containers(objects: Rendered) -> list[tuple[dict[str, object], dict[str, object]]]:
    found = []
    for workload, template in objects.pod_templates():
        if workload["metadata"]["labels"].get("app.kubernetes.io/name") == "chatgate":
            found += [(template, c) for c in template["spec"]["containers"]]
    return found


def test_manifests_compose_and_the_dockerfile_name_one_image() -> None:
    labels = image_labels()
    assert labels["org.opencontainers.image.version"] == version()
    image = f"{labels['org.opencontainers.image.title']}:{version()}"
    services = compose()["services"]
    assert services["chatgate"]["image"] == services["simulator"]["image"] == image
    assert {c["image"] for _, c in chatgate_containers(rendered("base"))} == {image}
    # An overlay may move it to a registry; the name and tag stay.
    for _, c in chatgate_containers(rendered("example")):
        assert str(c["image"]).rsplit("/", 1)[1] == image


def test_pods_run_as_the_images_user(objects: Rendered) -> None:
    user = image_user()
    chown_owner = next(
        words[-2] for keyword, rest in dockerfile() if keyword == "RUN"
        for words in commands_of(rest) if words[:1] == ["chown"]
    )  # fmt: skip
    owner_user, _, owner_group = chown_owner.partition(":")
    assert owner_user == user
    for workload, template in objects.pod_templates():
        if workload["metadata"]["labels"].get("app.kubernetes.io/name") != "chatgate":
            continue
        context = template["spec"]["securityContext"]
        assert context["runAsUser"] == DEBIAN_IDS[user], workload["metadata"]["name"]
        assert context["runAsGroup"] == context["fsGroup"] == DEBIAN_IDS[owner_group]


def test_the_spool_sits_in_the_images_data_directory(objects: Rendered) -> None:
    spool = image_env()["CHATGATE_SPOOL_DIR"]
    template, main = next((t, c) for t, c in chatgate_containers(objects) if c["name"] == "chatgate")
    env = environment(objects, main)
    assert env["CHATGATE_SPOOL_DIR"] == spool
    held = mount_of(template, main, spool)
    assert held is not None
    # The volume replaces the directory the image made for the user (a fresh emptyDir is
    # writable through fsGroup), so the mount is that directory, not something above it.
    chowned = [words for keyword, rest in dockerfile() if keyword == "RUN" for words in commands_of(rest)]
    made = {
        PurePosixPath(w) for words in chowned if words[:1] == ["chown"] for w in words[2:] if w[:1] == "/"
    }
    assert PurePosixPath(held[0]["mountPath"]) in made


def test_the_grpc_port_is_the_images(objects: Rendered) -> None:
    exposed = {int(rest.split("/")[0]) for keyword, rest in dockerfile() if keyword == "EXPOSE"}
    _, main = next((t, c) for t, c in chatgate_containers(objects) if c["name"] == "chatgate")
    listen = environment(objects, main)["CHATGATE_LISTEN"]
    assert int(listen.rsplit(":", 1)[1]) in exposed
    compose_listen = compose()["services"]["chatgate"]["environment"]["CHATGATE_LISTEN"]
    assert compose_listen.rsplit(":", 1)[1] == listen.rsplit(":", 1)[1]


def variables_the_service_reads() -> set[str]:
    env = RecordingEnv(
        {"OPENAI_API_KEY": "sk-x", "DATABASE_URL": "postgresql://h/db", "CHATGATE_WORKERS": "1"}
    )
    settings = Settings.from_env(env)
    resolve_workers(None, settings, env)
    return env.asked


def test_every_variable_set_is_one_the_service_reads(objects: Rendered) -> None:
    known = variables_the_service_reads() | PENDING | LIBPQ
    for _, c in chatgate_containers(objects):
        names = environment(objects, c)
        unknown = [n for n in names if n not in known and not n.startswith("OTEL_")]
        assert unknown == [], c["name"]


def test_settings_accept_what_the_manifests_set(objects: Rendered, tmp_path: Path) -> None:
    _, main = next((t, c) for t, c in chatgate_containers(objects) if c["name"] == "chatgate")
    env = environment(objects, main)
    # The files come from Secrets in a cluster; here, stand-ins with the same roles.
    key = tmp_path / "api-key"
    key.write_text("sk-test\n")
    env["OPENAI_API_KEY_FILE"] = str(key)
    for name in ("CHATGATE_TLS_CERT_FILE", "CHATGATE_TLS_KEY_FILE", "CHATGATE_TLS_CLIENT_CA_FILE"):
        env.pop(name, None)  # read at start-up by the TLS loader, tested in test_tls.py
    settings = Settings.from_env(env)
    assert settings.openai_api_key.value == "sk-test"
    assert settings.listen.port == 50051 and settings.shutdown_grace_s == settings.deadline_cap_s == 60
    assert str(settings.spool_dir) == env["CHATGATE_SPOOL_DIR"]
    assert resolve_workers(None, settings, env) == int(env["CHATGATE_WORKERS"])


def runbook_secrets() -> dict[str, set[str]]:
    """Secret name → the keys the runbook's ``kubectl … create secret generic`` commands give it."""
    secrets: dict[str, set[str]] = {}
    text = RUNBOOK.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if " create secret generic " not in line or not line.strip().startswith("kubectl "):
            continue
        words = shlex.split(line.split("|")[0])
        name = words[words.index("generic") + 1]
        keys = {w.split("=", 1)[1].split("=", 1)[0] for w in words if w.startswith("--from-file=")}
        secrets.setdefault(name, set()).update(keys)
    return secrets


def test_the_runbook_creates_the_secrets_the_pods_read(objects: Rendered) -> None:
    created = runbook_secrets()
    template, main = next((t, c) for t, c in chatgate_containers(objects) if c["name"] == "chatgate")
    env = environment(objects, main)
    for variable in [n for n in env if n.endswith("_FILE")] + ["PGSERVICEFILE"]:
        held = mount_of(template, main, env[variable])
        assert held is not None, variable
        mount, volume = held
        if "secret" not in volume:
            continue
        secret = volume["secret"]["secretName"]
        key = str(PurePosixPath(env[variable]).relative_to(mount["mountPath"]))
        assert key in created.get(secret, set()), f"docs/RUNBOOK.md never puts {key} into Secret {secret}"
    # chatgate.toml's key files are in the Secrets too.
    config = objects.config_map("chatgate-config")["data"]["chatgate.toml"]
    for path in re.findall(r'^key_file = "([^"]+)"', config, re.MULTILINE):
        held = mount_of(template, main, path)
        assert held is not None and "secret" in held[1], path
        key = str(PurePosixPath(path).relative_to(held[0]["mountPath"]))
        assert key in created.get(held[1]["secret"]["secretName"], set()), path


def test_the_runbook_renders_what_exists() -> None:
    text = RUNBOOK.read_text()
    for path in set(re.findall(r"\b(deploy/kubernetes/[\w./-]+\w)", text)):
        assert (REPO_ROOT / path).exists(), path
    assert "](RUNBOOK.md)" in (REPO_ROOT / "README.md").read_text().replace("docs/RUNBOOK.md", "RUNBOOK.md")
