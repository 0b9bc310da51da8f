"""The README's demo: simulator (if no key), migrations, chatgate, one streamed completion.

Every process this starts is stopped before it exits, also on Ctrl-C, except the
embedded Postgres (started when DATABASE_URL is unset): it keeps the usage rows for
the next run, and the demo ends by saying so and how to stop it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PROMPT = sys.argv[1] if len(sys.argv) > 1 else "Write one sentence about gateways."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LOGS = ROOT / ".chatgate"


@contextlib.contextmanager
def running(cmd: list[str], env: dict[str, str], log_name: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` with its output in .chatgate/<log_name>, so the terminal shows the stream."""
    LOGS.mkdir(exist_ok=True)
    with (LOGS / log_name).open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def wait_serving(target: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                sys.exit("demo: chatgate did not become healthy in time")
            time.sleep(0.2)


def wait_http(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    sys.exit("demo: the simulator did not start")


def main() -> int:
    env = dict(os.environ)
    chatgate = [sys.executable, "-m", "chatgate_server"]
    embedded = not env.get("DATABASE_URL")
    if embedded:
        print("==> DATABASE_URL not set: using an embedded Postgres under .pgdata/")
        env["DATABASE_URL"] = subprocess.check_output(
            [sys.executable, str(ROOT / "scripts" / "embedded_pg.py"), "start"], text=True
        ).strip()
    with contextlib.ExitStack() as stack:
        model = env.get("CHATGATE_DEMO_MODEL", "gpt-4o-mini")
        if not env.get("OPENAI_API_KEY") and not env.get("OPENAI_API_KEY_FILE"):
            sim_port = free_port()
            print(f"==> no OPENAI_API_KEY set: starting the built-in OpenAI simulator on port {sim_port}")
            stack.enter_context(
                running(
                    [*chatgate, "simulator", "--port", str(sim_port), "--delay-ms", "40", "--chunks", "40"],
                    env,
                    "demo-simulator.log",
                )
            )
            wait_http(sim_port)
            env["OPENAI_API_KEY"] = "sk-simulator"
            env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{sim_port}/v1"
        else:
            print(f"==> using the upstream at {env.get('OPENAI_BASE_URL', 'https://api.openai.com/v1')}")
        print("==> applying migrations")
        subprocess.run([*chatgate, "migrate"], env=env, check=True)
        token = create_caller(chatgate, env)
        port = free_port()
        env["CHATGATE_LISTEN"] = f"127.0.0.1:{port}"
        print(f"==> starting chatgate on 127.0.0.1:{port} (its JSON logs: .chatgate/demo-chatgate.log)")
        stack.enter_context(running([*chatgate, "serve"], env, "demo-chatgate.log"))
        wait_serving(f"127.0.0.1:{port}")
        request_id = stream_completion(f"127.0.0.1:{port}", model, token)
        print_usage_row(env["DATABASE_URL"], request_id)
        print("==> stopping chatgate")
    if embedded:
        print(EMBEDDED_POSTGRES_NOTE)
    return 0


# The demo stops what it started, except the embedded Postgres: it holds the usage rows
# just printed, and the next demo or ./scripts/test reuses it. Say so.
EMBEDDED_POSTGRES_NOTE = (
    "==> the embedded Postgres under .pgdata/ keeps running (it holds the usage rows;\n"
    "    the next ./scripts/demo or ./scripts/test reuses it). Stop it with:\n"
    "    .venv/bin/python scripts/embedded_pg.py stop"
)


def create_caller(chatgate: list[str], env: dict[str, str]) -> str:
    """A caller of its own for this demo run (chatgate serves only callers with a token);
    its token is printed once by `chatgate callers create`, and only its hash is kept."""
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    print(f"==> creating the caller demo/{name}: chatgate callers create --tenant demo --name {name}")
    created = subprocess.run(
        [*chatgate, "callers", "create", "--tenant", "demo", "--name", name],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return created.stdout.strip()


def stream_completion(target: str, model: str, token: str) -> str:
    print(f"==> streaming a completion from {model}: {PROMPT!r}\n")
    request = pb.CompleteRequest(
        model=model,
        user_id="demo-user",
        messages=[pb.Message(role=pb.ROLE_USER, text=PROMPT)],
        tags={"feature": "readme-demo"},
    )
    request_id = ""
    with grpc.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for event in stub.Complete(request, timeout=60, metadata=(("authorization", f"Bearer {token}"),)):
            kind = event.WhichOneof("event")
            if kind == "started":
                request_id = event.started.request_id
            elif kind == "content":
                print(event.content.text, end="", flush=True)
            elif kind == "finished":
                u = event.finished.usage
                print(
                    f"\n\n==> finished: {pb.FinishReason.Name(event.finished.finish_reason)}; "
                    f"{u.input_tokens} input + {u.output_tokens} output tokens "
                    f"({pb.UsageSource.Name(u.source)})"
                )
    return request_id


def print_usage_row(database_url: str, request_id: str) -> None:
    # The ledger writes off the request path: give it a moment.
    deadline = time.monotonic() + 10
    with psycopg.connect(database_url) as conn:
        while True:
            cur = conn.execute("SELECT * FROM usage_records WHERE request_id = %s", (request_id,))
            row = cur.fetchone()
            if row is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if row is None:
            sys.exit(f"demo: no usage row for {request_id}")
        print(f"==> usage row for request {request_id}:")
        names = [d.name for d in cur.description or []]
        for name, value in zip(names, row, strict=True):
            print(f"    {name:22} {value}")


if __name__ == "__main__":
    raise SystemExit(main())
