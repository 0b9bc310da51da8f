"""``chatgate prestop`` (SIGUSR1) during start-up: SIGUSR1's default action ends a
process, so one that arrives before serve's handler is in place must not kill a
starting server or a supervisor's starting worker. It is noted and applied once
serving: health NOT_SERVING, calls still served."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc

from chatgate_server.simulator import Simulator
from tests.integration.replicas import Replica, free_port, health_status
from tests.integration.test_health_port import NOT_SERVING, outcome


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


async def started_with_prestop(replica: Replica) -> None:
    """Start ``replica``, send SIGUSR1 the moment its first process catches it (the
    supervisor forwards it to workers that are still importing), then wait for health."""
    await replica.spawn()
    deadline = time.monotonic() + 20
    while not catches(replica.pid, signal.SIGUSR1):
        assert replica.proc is not None and replica.proc.returncode is None, replica.log_tail()
        assert time.monotonic() < deadline, "SIGUSR1 never caught"
        await asyncio.sleep(0.005)
    replica.signal(signal.SIGUSR1)
    while await health_status(replica.health_target) is None:
        assert replica.proc is not None and replica.proc.returncode is None, replica.log_tail()
        assert time.monotonic() < deadline + 20, replica.log_tail()
        await asyncio.sleep(0.1)


async def test_prestop_while_workers_start_is_applied_once_they_serve(
    migrated_database_url: str, simulator: Simulator, tmp_path: Path
) -> None:
    env = {"OPENAI_BASE_URL": simulator.base_url, "DATABASE_URL": migrated_database_url}
    for workers in (1, 2):
        env["CHATGATE_HEALTH_LISTEN"] = f"127.0.0.1:{free_port()}"
        replica = Replica(f"w{workers}", tmp_path, env, workers=workers)
        try:
            await started_with_prestop(replica)
            await asyncio.sleep(0.5)
            answers = [await health_status(t) for t in [replica.health_target, replica.target] * 3]
            assert answers == [NOT_SERVING] * 6, (workers, answers, replica.log_tail())
            async with grpc.aio.insecure_channel(replica.target) as channel:
                assert await outcome(channel, "u-prestop-early") == "OUTCOME_COMPLETED"
            replica.signal(signal.SIGTERM)
            assert await replica.exit_code() == 0, replica.log_tail()
        finally:
            await replica.stop()


async def test_a_reload_signal_while_workers_start_is_applied_once_they_serve(
    migrated_database_url: str, simulator: Simulator, tmp_path: Path
) -> None:
    """SIGHUP (reload) has the same default action: one forwarded to a worker still
    importing killed it, and the supervisor then stopped every worker."""
    env = {"OPENAI_BASE_URL": simulator.base_url, "DATABASE_URL": migrated_database_url}
    env["CHATGATE_HEALTH_LISTEN"] = f"127.0.0.1:{free_port()}"
    replica = Replica("hup", tmp_path, env, workers=2)
    try:
        await replica.spawn()
        deadline = time.monotonic() + 20
        while not catches(replica.pid, signal.SIGHUP):
            assert replica.proc is not None and replica.proc.returncode is None, replica.log_tail()
            assert time.monotonic() < deadline, "SIGHUP never caught"
            await asyncio.sleep(0.005)
        replica.signal(signal.SIGHUP)  # the workers are still starting
        while await health_status(replica.health_target) is None:
            assert replica.proc is not None and replica.proc.returncode is None, replica.log_tail()
            assert time.monotonic() < deadline + 20, replica.log_tail()
            await asyncio.sleep(0.1)
        async with grpc.aio.insecure_channel(replica.target) as channel:
            for n in range(4):  # both workers alive and serving
                assert await outcome(channel, f"u-hup-early-{n}") == "OUTCOME_COMPLETED"
        assert replica.proc is not None and replica.proc.returncode is None, replica.log_tail()
        replica.signal(signal.SIGTERM)
        assert await replica.exit_code() == 0, replica.log_tail()
    finally:
        await replica.stop()
