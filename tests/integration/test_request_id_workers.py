"""One request id, two worker processes: the id is served once and keys one row.

Regression test for issue 13 item 5: with ``--workers 2`` the same caller-supplied
``request_id`` sent with different content on two connections was served by both
workers (each knew only its own calls, and the first row was still in the ledger's
linger), leaving two rows for one id.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.simulator import Simulator
from tests.integration.conftest import TEST_API_KEY
from tests.integration.test_workers import free_port, wait_serving

PAIRS = 200


def serve(database_url: str, base_url: str, port: int, log: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": base_url,
        "DATABASE_URL": database_url,
        "CHATGATE_AUTH": "off",  # these tests are about processes, not callers
        "CHATGATE_LISTEN": f"127.0.0.1:{port}",
        "CHATGATE_SHUTDOWN_GRACE_SECONDS": "1",
    }
    with log.open("w") as out:  # a file: nobody reads a pipe while the test runs
        return subprocess.Popen(
            [sys.executable, "-m", "chatgate_server", "serve", "--workers", "2"],
            env=env,
            stderr=out,
            text=True,
        )


def warnings(log: Path) -> list[str]:
    return [
        line
        for line in log.read_text().splitlines()
        if '"level":"warning"' in line or '"level":"error"' in line
    ][:20]


def request(request_id: str, text: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="gpt-4o-mini::chunks=3",
        user_id="pair-user",
        request_id=request_id,
        messages=[pb.Message(role=pb.ROLE_USER, text=text)],
    )


async def call(target: str, req: pb.CompleteRequest, after_s: float) -> str:
    """One call on a channel of its own (its own connection, so the kernel may hand it
    to either worker): "served", or the status code's name."""
    await asyncio.sleep(after_s)
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        try:
            events = [e async for e in stub.Complete(req, timeout=60)]
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    return "served"


@pytest.mark.parametrize("apart_s", [0.0, 0.005], ids=["concurrent", "5ms-apart"])
async def test_an_id_sent_twice_to_two_workers_is_served_once_and_keys_one_row(
    migrated_database_url: str, simulator: Simulator, apart_s: float, tmp_path: Path
) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = serve(migrated_database_url, simulator.base_url, port, log)
    prefix = f"pair-{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{i}" for i in range(PAIRS)]
    try:
        await asyncio.to_thread(wait_serving, proc, target, 2)
        results = await asyncio.gather(
            *(call(target, request(rid, "first question"), 0.0) for rid in ids),
            *(call(target, request(rid, "another question"), apart_s) for rid in ids),
        )
        # Stopping flushes every worker's ledger: all rows are in Postgres afterwards.
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    not_served_once = [rid for rid, a, b in zip(ids, results[:PAIRS], results[PAIRS:], strict=True) if a == b]
    pairs = collections.Counter(zip(results[:PAIRS], results[PAIRS:], strict=True))
    assert not_served_once == [], (pairs, warnings(log))
    assert sorted(set(results)) == ["ALREADY_EXISTS", "served"]
    with psycopg.connect(migrated_database_url) as db:
        rows: list[Any] = db.execute(
            "SELECT request_id, count(*) FROM usage_records WHERE request_id LIKE %s GROUP BY 1",
            [prefix + "%"],
        ).fetchall()
    assert {rid: n for rid, n in rows} == dict.fromkeys(ids, 1)
