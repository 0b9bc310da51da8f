"""Memory of one chatgate process under a burst of large requests (issue 13, item 10).

    .venv/bin/python -m bench.request_memory [--calls 40] [--mb 3.9] [--budget-mb 64]

Starts the simulator and one chatgate process (``serve --workers 1``; DATABASE_URL,
migrated, from the environment), sends ``--calls`` concurrent Complete calls of ``--mb``
MB each (the upstream answers each in about five seconds, so they overlap even on a busy
machine), and prints the server's RSS before, at its peak (VmHWM) and three seconds
after, with how many calls were served and how many refused (RESOURCE_EXHAUSTED,
REQUEST_BYTES_LIMIT), as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _wait_serving(target: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(target) as channel:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "chatgate exited"
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError("chatgate did not start")


async def _burst(target: str, calls: int, size: int) -> dict[str, int]:
    text = "x" * (size - 200)
    options = [("grpc.max_send_message_length", -1), ("grpc.use_local_subchannel_pool", 1)]
    results: dict[str, int] = {}

    async def one(i: int) -> None:
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            req = pb.CompleteRequest(
                model="gpt-4o-mini::chunks=10,delay_ms=500",
                user_id=f"mem-{i}",
                messages=[pb.Message(role=pb.ROLE_USER, text=text)],
            )
            try:
                async for _ in chat_pb2_grpc.ChatServiceStub(channel).Complete(req, timeout=60):
                    pass
                key = "ok"
            except grpc.aio.AioRpcError as exc:
                key = exc.code().name
            results[key] = results.get(key, 0) + 1

    await asyncio.gather(*(one(i) for i in range(calls)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--mb", type=float, default=3.9)
    parser.add_argument("--budget-mb", type=int, default=None, help="CHATGATE_MAX_REQUEST_MB_IN_FLIGHT")
    args = parser.parse_args(argv)
    sim_port, port = _free_port(), _free_port()
    env = {
        **os.environ,
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
        "CHATGATE_LISTEN": f"127.0.0.1:{port}",
        "CHATGATE_LOG_LEVEL": "WARNING",
        "CHATGATE_SPOOL_DIR": tempfile.mkdtemp(prefix="chatgate-mem-"),
        "OTEL_SDK_DISABLED": "true",
        "CHATGATE_MIGRATE_ON_START": "true",
        "CHATGATE_AUTH": "off",  # memory held by request bytes, not who sends them
    }
    if args.budget_mb is not None:
        env["CHATGATE_MAX_REQUEST_MB_IN_FLIGHT"] = str(args.budget_mb)
    python = sys.executable
    sim = subprocess.Popen([python, "-m", "chatgate_server", "simulator", "--port", str(sim_port)], env=env)
    server = subprocess.Popen([python, "-m", "chatgate_server", "serve", "--workers", "1"], env=env)
    try:
        target = f"127.0.0.1:{port}"
        _wait_serving(target, server)
        before = _status_kb(server.pid, "VmRSS")
        results = asyncio.run(_burst(target, args.calls, int(args.mb * 1024 * 1024)))
        peak = _status_kb(server.pid, "VmHWM")
        time.sleep(3)
        after = _status_kb(server.pid, "VmRSS")
    finally:
        for proc in (server, sim):
            proc.terminate()
            proc.wait(30)
    report = {"calls": args.calls, "mb_each": args.mb, "budget_mb": args.budget_mb, "results": results}
    report |= {"rss_before_mb": before // 1024, "rss_peak_mb": peak // 1024, "rss_after_mb": after // 1024}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
