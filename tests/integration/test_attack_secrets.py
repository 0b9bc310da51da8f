"""A deployment's key (key_env, key_file) appears nowhere a routed run with failures
leaves traces: logs at DEBUG, spans and their events, metrics, usage rows (every column),
health names, ``config check`` output, a reload's logs, ``chatgate health --deployments``.

The run: an OpenAI deployment whose key the upstream refuses (401), an Azure deployment
that answers 500 then whose deployment name is missing, a 429 with retry-after, and a
healthy deployment that serves in the end; then a reload and a bad reload."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import grpc
import psycopg
import pytest

from chatgate_server.simulator.testing import keys_seen
from tests.integration.test_faults import call
from tests.integration.test_routing import (
    AZURE_KEY,
    CLASSIC,
    OPENAI_KEY,
    Sims,
    StartRouted,
    azure_part,
    deployment,
    key_file,
    openai_and_azure,
    route,
)
from tests.integration.test_tracing import Captured

pytest_plugins = ["tests.integration.test_routing"]  # its fixtures: sims, start_routed

WRONG_KEY = "sk-WRONG-key-THREE"  # sent to an upstream that refuses it
ENV_KEY = "sk-ENV-key-FOUR"  # by key_env


def config_check(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatgate_server", "config", "check", path],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "ATTACK_ENV_KEY": ENV_KEY},
    )


def exposed(text: str) -> list[str]:
    return [k for k in (OPENAI_KEY, AZURE_KEY, WRONG_KEY, ENV_KEY) if k in text]


async def test_no_key_in_logs_spans_rows_health_or_commands(
    sims: Sims,
    start_routed: StartRouted,
    caplog: pytest.LogCaptureFixture,
    migrated_database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level("DEBUG")
    monkeypatch.setenv("ATTACK_ENV_KEY", ENV_KEY)
    openai, azure = await openai_and_azure(sims)
    [env_keyed] = await sims(1, keys={"env": ENV_KEY})
    refused = deployment("refused", openai.base_url, {"m": "gpt-4o-mini"}, key_file=key_file(WRONG_KEY))
    by_env = deployment("by-env", env_keyed.base_url, {"m": "gpt-4o-mini::rate_limit,retry_after_ms=50"})
    by_env = by_env.replace(by_env.splitlines()[4], 'key_env = "ATTACK_ENV_KEY"')
    parts = (
        refused,
        azure_part(azure, CLASSIC, "chat::status=500", name="az-500"),
        azure_part(azure, CLASSIC, "no-such-deployment", name="az-missing"),
        by_env,
        deployment("good", openai.base_url, {"m": "gpt-4o-mini"}, key_file=key_file(OPENAI_KEY)),
        route("m", "refused", "az-500", "az-missing", "by-env", "good"),
    )
    captured = Captured()
    app, stub = await start_routed(*parts, telemetry=captured.telemetry, retry_max_attempts=6)
    results = [await call(stub, "m") for _ in range(3)]
    assert any(r.code == grpc.StatusCode.OK for r in results), [r.code for r in results]
    assert len(keys_seen(openai.requests)) == 2  # the wrong key went out, and the right one

    assert app.settings.config_file is not None
    config = app.settings.config_file
    await app.reload()
    config.write_text(config.read_text() + "\n[[deployments]]\nname = 'bad'\nkind = 'openai'\n")
    await app.reload()  # refused: no key for 'bad'

    assert app.deployment_health is not None
    await app.deployment_health.settled()
    health_names = list(app.deployment_health._latest)  # every name set on the health service
    assert "chatgate.deployment.refused" in health_names
    assert app.ledger is not None
    await app.ledger.flush()
    with psycopg.connect(migrated_database_url) as db:
        rows = [r[0] for r in db.execute("SELECT row_to_json(u)::text FROM usage_records u").fetchall()]
    assert rows
    spans = [
        json.dumps(
            {"name": s.name, "attributes": dict(s.attributes or {}), "events": [
                {"name": e.name, "attributes": dict(e.attributes or {})} for e in s.events
            ], "status": str(s.status.description)},
            default=str,
        )
        for s in captured.finished()
    ]  # fmt: skip
    metrics = captured.metrics.get_metrics_data()
    check = await asyncio.to_thread(config_check, str(config))
    assert check.returncode == 2  # the bad deployment
    config.write_text("\n".join(parts))
    check_ok = await asyncio.to_thread(config_check, str(config))
    assert check_ok.returncode == 0 and "key set" in check_ok.stdout, check_ok.stderr
    traces = {
        "logs": caplog.text,
        "spans": "\n".join(spans),
        "metrics": metrics.to_json() if metrics is not None else "",
        "rows": "\n".join(rows),
        "health names": "\n".join(health_names),
        "config check": check.stdout + check.stderr + check_ok.stdout + check_ok.stderr,
    }
    assert "refused" in traces["logs"] or "credentials" in traces["logs"]  # the failures were logged
    leaks = {where: exposed(text) for where, text in traces.items() if exposed(text)}
    assert leaks == {}
