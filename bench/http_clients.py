"""What one upstream request costs through each HTTP client, against the same simulator.

``python -m bench.http_clients [--requests 3000] [--chunks 20]`` starts the simulator
on one core and, on the other, makes sequential streaming requests through:

- ``chatgate`` — chatgate's own path: ``OpenAIUpstream`` (httpx transport, our pool
  and asyncio backend), events decoded as chatgate decodes them;
- ``httpcore`` — the same pool and backend called with an ``httpcore.Request``,
  skipping httpx's request and response models (bytes only, no decoding);
- ``httpx`` — ``httpx.AsyncClient.stream``, as the minimal relay uses it (bytes only);
- ``aiohttp`` — ``aiohttp.ClientSession`` (bytes only), when aiohttp is installed
  (it is not a dependency: ``pip install aiohttp`` to include it).

It prints CPU and wall time per request and time to response headers (p50), each
client measured twice, interleaved, in the same run. This is how the choice of the
upstream client is checked; see docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpcore
import httpx
import uvloop

from bench.procs import child_env, free_port, plan_pinning, start
from chatgate_server.config import Secret
from chatgate_server.deadline import Deadline
from chatgate_server.domain import ChatMessage, CompletionRequest
from chatgate_server.upstream.openai import OpenAIUpstream
from chatgate_server.upstream.pool import UpstreamPool
from chatgate_server.upstream.transport import AsyncioBackend

KEY = "sk-bench-not-a-real-key"
One = Callable[[], Awaitable[float]]  # one request; returns seconds to response headers


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _chatgate(base: str, model: str) -> tuple[One, Callable[[], Awaitable[None]]]:
    upstream = OpenAIUpstream(base, Secret(KEY))
    request = CompletionRequest(
        request_id="bench", model=model, messages=(ChatMessage(role="user", content="hi"),), user_id="u"
    )

    async def one() -> float:
        t0 = time.perf_counter()
        stream = await upstream.open(request, Deadline.start(None, 30))
        headers = time.perf_counter() - t0
        async for _ in stream.events():
            pass
        await stream.aclose()
        return headers

    return one, upstream.aclose


def _body(model: str) -> bytes:
    return b'{"model":"%s","stream":true,"messages":[{"role":"user","content":"hi"}]}' % model.encode()


async def _httpcore(base: str, model: str) -> tuple[One, Callable[[], Awaitable[None]]]:
    pool = UpstreamPool(
        ssl_context=None, max_connections=16, keepalive_expiry=30, network_backend=AsyncioBackend()
    )
    u = httpx.URL(base + "/chat/completions")
    url = httpcore.URL(scheme=u.raw_scheme, host=u.raw_host, port=u.port, target=u.raw_path)
    body = _body(model)
    headers = [
        (b"host", b"%s:%d" % (u.raw_host, u.port or 80)),
        (b"authorization", f"Bearer {KEY}".encode()),
        (b"content-type", b"application/json"),
        (b"accept", b"text/event-stream"),
        (b"content-length", str(len(body)).encode()),
    ]
    timeout = {"timeout": {"connect": 5.0, "read": 30.0, "write": 30.0, "pool": 30.0}}

    async def one() -> float:
        t0 = time.perf_counter()
        request = httpcore.Request(b"POST", url, headers=headers, content=body, extensions=timeout)
        response = await pool.handle_async_request(request)
        took = time.perf_counter() - t0
        async for _ in response.aiter_stream():
            pass
        await response.aclose()
        return took

    return one, pool.aclose


async def _httpx(base: str, model: str) -> tuple[One, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    body = _body(model)

    async def one() -> float:
        t0 = time.perf_counter()
        json_type = {"content-type": "application/json"}
        async with client.stream("POST", "/chat/completions", content=body, headers=json_type) as r:
            took = time.perf_counter() - t0
            async for _ in r.aiter_raw():
                pass
        return took

    return one, client.aclose


async def _aiohttp(base: str, model: str) -> tuple[One, Callable[[], Awaitable[None]]]:
    # Imported by name: aiohttp is optional, and the type checker must not need it.
    aiohttp: Any = importlib.import_module("aiohttp")
    session = aiohttp.ClientSession(skip_auto_headers=("User-Agent",))
    body = _body(model)
    url = base + "/chat/completions"
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}

    async def one() -> float:
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as r:
            took = time.perf_counter() - t0
            async for _ in r.content.iter_any():
                pass
        return took

    return one, session.close


CLIENTS: dict[str, Callable[[str, str], Awaitable[tuple[One, Callable[[], Awaitable[None]]]]]] = {
    "chatgate": _chatgate,
    "httpcore": _httpcore,
    "httpx": _httpx,
    "aiohttp": _aiohttp,
}


async def _measure(name: str, base: str, model: str, requests: int) -> dict[str, Any]:
    one, close = await CLIENTS[name](base, model)
    try:
        for _ in range(min(300, requests)):
            await one()
        c0, w0 = _cpu(), time.perf_counter()
        to_headers = [await one() for _ in range(requests)]
        c1, w1 = _cpu(), time.perf_counter()
    finally:
        await close()
    return {
        "cpu_us": (c1 - c0) * 1e6 / requests,
        "wall_us": (w1 - w0) * 1e6 / requests,
        "headers_p50_us": statistics.median(to_headers) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.http_clients", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    clients = [c for c in CLIENTS if c != "aiohttp" or importlib.util.find_spec("aiohttp")]
    pinning = plan_pinning(True)
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="chatgate-http-clients-"))
    sim = start(
        "simulator",
        ["-m", "chatgate_server.simulator", "--port", str(port), "--record-limit", "100"],
        cores=pinning.load,
        pinning=pinning,
        env=child_env(),
        log_dir=log_dir,
    )
    try:
        if pinning.server is not None:
            import os

            os.sched_setaffinity(0, {int(pinning.server)})
        base = f"http://127.0.0.1:{port}/v1"
        model = f"gpt-4o-mini::chunks={args.chunks}"
        results: dict[str, list[dict[str, Any]]] = {c: [] for c in clients}
        for _ in range(args.rounds):
            for name in clients:
                results[name].append(uvloop.run(_measure(name, base, model, args.requests)))
    finally:
        sim.stop()
    print(
        f"{args.requests} sequential streams of {args.chunks} chunks per client, "
        f"{args.rounds} rounds; {pinning.note}"
    )
    print(
        f"{'client':<10}{'CPU µs/req':>12}{'wall µs/req':>13}{'to headers p50 µs':>19}{'CPU vs chatgate':>17}"
    )
    base_cpu = statistics.median(r["cpu_us"] for r in results["chatgate"])
    for name, rounds in results.items():
        cpu = statistics.median(r["cpu_us"] for r in rounds)
        wall = statistics.median(r["wall_us"] for r in rounds)
        headers = statistics.median(r["headers_p50_us"] for r in rounds)
        print(f"{name:<10}{cpu:>12.0f}{wall:>13.0f}{headers:>19.0f}{cpu / base_cpu:>16.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
