"""The Node client's own tests (``node --test`` in clients/node) against a real chatgate.

This is how the Node tests join the project's test command: the fixtures start the
simulator and chatgate, the Node dependencies are installed from the committed lockfile
when they are missing, and ``node --test`` runs with ``CHATGATE_ADDR`` (and the
simulator's URL, whose stats tell the tests that a cancelled call reached upstream).
Missing node or npm is a failure, not a skip: the Node client would go untested.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool

from chatgate_server.auth.store import CallerStore, NewCaller
from chatgate_server.simulator import Simulator
from tests.certs import Authority
from tests.conftest import REPO_ROOT
from tests.integration.conftest import AppFactory
from tests.integration.scripted_limits import ScriptedLimits

NODE_CLIENT = REPO_ROOT / "clients" / "node"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: the Node client needs Node 20+ and npm")
    return path


async def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{' '.join(args)} did not finish within {timeout} s")
    return proc.returncode or 0, out.decode(errors="replace")


def dependencies_current() -> bool:
    # npm writes node_modules/.package-lock.json on every install: when it is older than
    # the committed lockfile, the lockfile changed since and node_modules is stale.
    installed = NODE_CLIENT / "node_modules" / ".package-lock.json"
    return (
        installed.exists()
        and installed.stat().st_mtime >= (NODE_CLIENT / "package-lock.json").stat().st_mtime
    )


async def ensure_node_dependencies() -> None:
    npm = tool("npm")  # checked even when installed: a clean clone needs it
    if dependencies_current():
        return
    # `npm ci`: exactly the lockfile's versions; the registry is the only network used.
    code, out = await run(
        npm, "ci", "--no-audit", "--no-fund", "--prefer-offline", cwd=NODE_CLIENT, timeout=300
    )
    assert code == 0, f"npm ci failed in {NODE_CLIENT}:\n{out}"


async def callers(database_url: str, certificate_identity: str) -> str:
    """A token caller (its token returned) and a caller proved by ``certificate_identity``."""
    tenant = f"node-{time.monotonic_ns()}"
    async with AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False) as pool:
        await pool.open(wait=True, timeout=10)
        store = CallerStore(pool)
        token = await store.create(NewCaller(tenant, "node-token"))
        await store.create(NewCaller(tenant, "node-cert", cert_identity=certificate_identity))
    assert token is not None
    return str(token)


@pytest.mark.timeout(420)
async def test_node_client_suite(
    start_app: AppFactory, simulator: Simulator, migrated_database_url: str, tmp_path: Path
) -> None:
    node = tool("node")
    code, version = await run(node, "--version", cwd=NODE_CLIENT, timeout=30)
    assert code == 0 and int(version.strip().lstrip("v").split(".")[0]) >= 20, f"need Node 20+, got {version}"
    await ensure_node_dependencies()
    # As deployed: authentication on, over mTLS, with a token and a client certificate.
    ca = Authority()
    server_cert, server_key = ca.issue("chatgate", server=True).write(tmp_path, "server")
    identity = "spiffe://node.example/client"
    client_cert, client_key = ca.issue("node-client", uri=identity).write(tmp_path, "client")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    (tmp_path / "token").write_text(await callers(migrated_database_url, identity) + "\n")
    app = await start_app(
        # Scripted allowances and refusals for test/limits.test.mjs (by end user id).
        extra_policies=(ScriptedLimits(),),
        auth="tokens",
        tls_cert_file=server_cert,
        tls_key_file=server_key,
        tls_client_ca_file=tmp_path / "ca.crt",
    )
    env = {
        **os.environ,
        "CHATGATE_ADDR": f"127.0.0.1:{app.port}",
        "CHATGATE_TOKEN_FILE": str(tmp_path / "token"),
        "CHATGATE_CA_FILE": str(tmp_path / "ca.crt"),
        "CHATGATE_CLIENT_CERT_FILE": str(client_cert),
        "CHATGATE_CLIENT_KEY_FILE": str(client_key),
        "SIMULATOR_URL": simulator.root_url,
        # A user's NODE_OPTIONS (e.g. a debugger hook) must not change the run.
        "NODE_OPTIONS": "",
    }
    code, out = await run(node, "--test", "--test-reporter=tap", cwd=NODE_CLIENT, env=env, timeout=300)
    assert code == 0, f"node --test failed:\n{out}"
    # Guard against a run that found no test files and passed vacuously.
    assert "# pass 0" not in out, out
    assert "# fail 0" in out, out
