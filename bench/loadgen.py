"""Closed-loop load generator: N workers, each opening one stream after another.

Two targets, one report shape:

- ``grpc://host:port`` — ``ChatService.Complete`` on chatgate or a baseline relay. Each
  worker (up to ``--channels``) gets its own HTTP/2 connection. The default client
  (``--client raw``, bench/h2client.py) costs ~9 µs of CPU per message; grpcio's
  asyncio client (``--client grpcio``, a local subchannel pool so each channel has its
  own connection) costs ~38 µs, as much as the server, and would make the load
  generator the bottleneck. Messages are taken as raw bytes; only the first and last
  of each stream are parsed, to check ``started`` and ``finished``.
- ``http://host:port/v1`` — the upstream directly, over a hand-rolled keep-alive
  HTTP/1.1 client that only looks for the first ``data:`` and the last chunk: the
  cheapest possible client, so "direct" is the floor that chatgate's figures are
  compared with.

After ``--warmup`` seconds it measures for ``--duration`` seconds: streams and chunks
completed in the window, time to first event of streams started in the window, its
own CPU, and the CPU and RSS of the process trees named by ``--watch`` (the server)
and ``--watch-upstream``, sampled from /proc at the window's edges (RSS every 100 ms).
Then no new streams start; running ones get ``--drain`` seconds to end and are
cancelled after that. One JSON report goes to stdout.

``--read-delay-ms`` makes a slow consumer (a pause after each message; with the raw
client, flow-control credit goes back only as messages are taken); with
``--cancel-at-end`` the streams still open when the window closes are cancelled at
once instead of drained (a slow consumer of a long stream would never finish).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc

from bench import h2client, procstat
from chatgate.v1 import chat_pb2 as pb

COMPLETE = "/chatgate.v1.ChatService/Complete"


@dataclass(slots=True)
class Stats:
    """Counters shared by all workers; read at the window's edges."""

    streams: int = 0
    # Upstream chunks relayed by completed streams (or, for a slow consumer, messages
    # taken). chatgate may carry several chunks in one message when they arrive
    # together (CHATGATE_COALESCE_DELTAS), so chunks are counted from what the upstream
    # was asked to send, and the messages that carried them separately.
    chunks: int = 0
    messages: int = 0
    errors: int = 0
    open: int = 0
    peak_open: int = 0
    in_window: bool = False
    ttfe_ms: list[float] = field(default_factory=list)
    duration_ms: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


@dataclass(slots=True)
class Options:
    model: str
    chunks_per_stream: int
    read_delay_s: float
    stream_timeout_s: float
    # A fresh caller-supplied request_id on every call (chatgate then reserves it in
    # Postgres): measures what idempotency keys cost against generated ids.
    caller_ids: bool = False
    # The caller's bearer token, sent on every call (chatgate verifies it per call).
    token: str | None = None


# --- gRPC ---------------------------------------------------------------------------


def _grpc_request(opts: Options, worker: int) -> bytes:
    return pb.CompleteRequest(
        model=opts.model,
        user_id=f"bench-user-{worker % 50}",
        messages=[pb.Message(role=pb.ROLE_USER, text="Say something, one word per chunk.")],
    ).SerializeToString()


def _with_caller_id(request: bytes) -> bytes:
    # Serialized protobuf messages concatenate as a merge: the id's field appended to
    # the request serialized once costs a uuid, not a whole serialization per call.
    return request + pb.CompleteRequest(request_id=f"bench-{uuid.uuid4().hex}").SerializeToString()


async def grpc_worker(
    channel: grpc.aio.Channel, worker: int, opts: Options, stats: Stats, stop: asyncio.Event
) -> None:
    # No (de)serializers: messages stay bytes; only the first and last are parsed.
    complete: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        COMPLETE, request_serializer=None, response_deserializer=None
    )
    request = _grpc_request(opts, worker)
    delay = opts.read_delay_s
    clock = time.perf_counter
    while not stop.is_set():
        t0 = clock()
        counted = stats.in_window
        stats.open += 1
        stats.peak_open = max(stats.peak_open, stats.open)
        call = complete(
            _with_caller_id(request) if opts.caller_ids else request,
            timeout=opts.stream_timeout_s,
            metadata=(("authorization", f"Bearer {opts.token}"),) if opts.token else None,
        )
        last = b""
        messages = 0
        try:
            read = call.read
            first = await read()
            if not isinstance(first, bytes):  # grpc.aio.EOF
                raise _Bad("empty stream")
            if counted:
                stats.ttfe_ms.append((clock() - t0) * 1000.0)
            if pb.CompleteResponse.FromString(first).WhichOneof("event") != "started":
                raise _Bad("first event is not started")
            while True:
                if delay:
                    await asyncio.sleep(delay)
                msg = await read()
                if not isinstance(msg, bytes):  # grpc.aio.EOF
                    break
                messages += 1
                last = msg
            if pb.CompleteResponse.FromString(last).WhichOneof("event") != "finished":
                raise _Bad("last event is not finished")
            stats.streams += 1
            stats.messages += messages - 1  # the last message was `finished`
            stats.chunks += opts.chunks_per_stream
            if counted:
                stats.duration_ms.append((clock() - t0) * 1000.0)
        except grpc.aio.AioRpcError as exc:
            stats.error(exc.code().name)
        except _Bad as exc:
            stats.error(str(exc))
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            stats.open -= 1


class _Bad(Exception):
    """A stream that ended OK but does not have the contract's shape."""


async def raw_worker(
    conns: list[h2client.Connection], worker: int, opts: Options, stats: Stats, stop: asyncio.Event
) -> None:
    """Like grpc_worker, over the cheap client (bench/h2client.py)."""
    request = _grpc_request(opts, worker)
    clock = time.perf_counter
    conn = conns[worker % len(conns)]
    delay = opts.read_delay_s
    while not stop.is_set():
        t0 = clock()
        counted = stats.in_window
        stats.open += 1
        stats.peak_open = max(stats.peak_open, stats.open)
        stream = None
        try:
            stream = conn.call(_with_caller_id(request) if opts.caller_ids else request)
            async with asyncio.timeout(opts.stream_timeout_s):
                if delay:
                    await _read_slowly(stream, delay, stats)
                await stream.done
            if stream.first is None:
                raise _Bad("no message (an error status)")
            if counted:
                stats.ttfe_ms.append((stream.first_at - t0) * 1000.0)
                stats.duration_ms.append((clock() - t0) * 1000.0)
            if pb.CompleteResponse.FromString(stream.first).WhichOneof("event") != "started":
                raise _Bad("first event is not started")
            if pb.CompleteResponse.FromString(stream.last).WhichOneof("event") != "finished":
                raise _Bad("ended without finished (an error status)")
            if not delay:
                stats.messages += stream.messages - 2  # started and finished carry no text
                stats.chunks += opts.chunks_per_stream
            stats.streams += 1
        except (ConnectionError, TimeoutError) as exc:
            stats.error(f"{type(exc).__name__}: {exc}")
            if conn.closed:
                stop.set()  # the server went away: every stream on this connection is lost
        except _Bad as exc:
            stats.error(str(exc))
        except asyncio.CancelledError:
            if stream is not None:
                conn.cancel(stream)
            raise
        finally:
            stats.open -= 1


async def _read_slowly(stream: h2client.Stream, delay: float, stats: Stats) -> None:
    """A slow consumer: take one message, then sleep, and so on; count each one taken."""
    while await stream.next() is not None:
        stats.chunks += 1
        stats.messages += 1
        await asyncio.sleep(delay)


async def raw_connections(
    target: str, count: int, *, hold: bool, token: str | None = None
) -> list[h2client.Connection]:
    host, _, port = target.rpartition(":")
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(count):
        _, conn = await loop.create_connection(
            lambda: h2client.Connection(target, COMPLETE, hold=hold, token=token), host, int(port)
        )
        conns.append(conn)
    return conns


def grpc_channels(target: str, count: int) -> list[grpc.aio.Channel]:
    options = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]


# --- HTTP (direct to the upstream) --------------------------------------------------


class _SSEClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; counts events, notes the first, waits for the end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.first: asyncio.Future[float] | None = None
        self.done: asyncio.Future[int] | None = None
        self.events = 0
        self.tail = b""
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.first, self.done = loop.create_future(), loop.create_future()
        self.events, self.tail = 0, b""
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.first is None or self.done is None:
            return
        n = data.count(b"data: ")
        if n and not self.first.done():
            self.first.set_result(time.perf_counter())
        self.events += n
        # The response ends with the last chunk right after an event's blank line.
        self.tail = (self.tail + data)[-16:]
        if self.tail.endswith(b"\n\n\r\n0\r\n\r\n") and not self.done.done():
            self.done.set_result(self.events)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.first, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("upstream closed the connection"))
        if not self.lost.done():
            self.lost.set_result(None)


async def http_worker(base: str, worker: int, opts: Options, stats: Stats, stop: asyncio.Event) -> None:
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = json.dumps(
        {
            "model": opts.model,
            "messages": [{"role": "user", "content": "Say something, one word per chunk."}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    request = (
        f"POST {parts.path.rstrip('/')}/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
        f"authorization: Bearer bench\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    conn: _SSEClient | None = None
    while not stop.is_set():
        if conn is None or conn.lost.done():
            _, conn = await loop.create_connection(_SSEClient, host, port)
        t0 = clock()
        counted = stats.in_window
        stats.open += 1
        stats.peak_open = max(stats.peak_open, stats.open)
        try:
            conn.send(request)
            assert conn.first is not None and conn.done is not None
            async with asyncio.timeout(opts.stream_timeout_s):
                first_at = await conn.first
                if counted:
                    stats.ttfe_ms.append((first_at - t0) * 1000.0)
                events = await conn.done
            # Role chunk, finish chunk, usage chunk and [DONE] are not content.
            stats.chunks += max(events - 4, 0)
            stats.messages += max(events - 4, 0)
            stats.streams += 1
            if counted:
                stats.duration_ms.append((clock() - t0) * 1000.0)
        except (ConnectionError, TimeoutError) as exc:
            stats.error(type(exc).__name__)
            if conn.transport is not None:
                conn.transport.abort()
            conn = None
        finally:
            stats.open -= 1
    if conn is not None and conn.transport is not None:
        conn.transport.close()


# --- the run --------------------------------------------------------------------------


def chunks_per_stream(model: str) -> int:
    """The content chunks the simulator sends for ``model`` (its ``chunks=N`` key)."""
    for item in model.partition("::")[2].split(","):
        key, _, value = item.partition("=")
        if key.strip() == "chunks":
            return int(value)
    raise SystemExit(f"loadgen: the model {model!r} does not say how many chunks (chunks=N)")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of ``values``, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    opts = Options(
        model=args.model,
        chunks_per_stream=chunks_per_stream(args.model),
        read_delay_s=args.read_delay_ms / 1000.0,
        stream_timeout_s=args.stream_timeout,
        caller_ids=args.caller_request_ids,
        token=args.token,
    )
    stats = Stats()
    stop = asyncio.Event()
    channels: list[grpc.aio.Channel] = []
    conns: list[h2client.Connection] = []
    target = args.target
    if target.startswith("grpc://") and args.client == "raw":
        conns = await raw_connections(
            target.removeprefix("grpc://"),
            min(args.channels, args.concurrency),
            hold=opts.read_delay_s > 0,
            token=opts.token,
        )
        workers = [raw_worker(conns, i, opts, stats, stop) for i in range(args.concurrency)]
    elif target.startswith("grpc://"):
        channels = grpc_channels(target.removeprefix("grpc://"), min(args.channels, args.concurrency))
        workers = [
            grpc_worker(channels[i % len(channels)], i, opts, stats, stop) for i in range(args.concurrency)
        ]
    elif target.startswith("http://"):
        workers = [http_worker(target, i, opts, stats, stop) for i in range(args.concurrency)]
    else:
        raise SystemExit(f"loadgen: target must be grpc://host:port or http://host:port/v1, got {target}")
    tasks = []
    for i, worker in enumerate(workers):
        tasks.append(asyncio.create_task(worker))
        if args.ramp and i % 50 == 49:
            # Spread many slow streams' starts a little instead of one thundering herd.
            await asyncio.sleep(args.ramp / max(args.concurrency / 50, 1))
    await asyncio.sleep(args.warmup)

    watch, upstream = args.watch or [], args.watch_upstream or []
    base = _snapshot(stats, watch, upstream)
    stats.in_window = True
    peak_rss = base["server_rss_kb"]
    open_samples: list[int] = []
    end = time.monotonic() + args.duration
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(0.1, left))
        if watch:
            peak_rss = max(peak_rss, procstat.sample(watch).rss_kb)
        open_samples.append(stats.open)
    stats.in_window = False
    final = _snapshot(stats, watch, upstream)

    stop.set()
    if args.cancel_at_end:
        for task in tasks:
            task.cancel()
    _, pending = await asyncio.wait(tasks, timeout=args.drain)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    for conn in conns:
        conn.close()
    return _report(args, stats, base, final, peak_rss, open_samples)


def _snapshot(stats: Stats, watch: list[int], upstream: list[int]) -> dict[str, Any]:
    server = procstat.sample(watch) if watch else None
    up = procstat.sample(upstream) if upstream else None
    return {
        "t": time.monotonic(),
        "streams": stats.streams,
        "chunks": stats.chunks,
        "messages": stats.messages,
        "errors": stats.errors,
        "client_cpu_s": procstat.self_cpu_seconds(),
        "server_cpu_s": server.cpu_s if server else None,
        "server_rss_kb": server.rss_kb if server else 0,
        "server_hwm_kb": server.hwm_kb if server else 0,
        "server_processes": server.processes if server else 0,
        "upstream_cpu_s": up.cpu_s if up else None,
        "machine_busy_s": procstat.machine_busy_seconds(),
    }


def _report(
    args: argparse.Namespace,
    stats: Stats,
    base: dict[str, Any],
    final: dict[str, Any],
    peak_rss: int,
    open_samples: list[int],
) -> dict[str, Any]:
    wall = final["t"] - base["t"]
    streams = final["streams"] - base["streams"]
    chunks = final["chunks"] - base["chunks"]

    def used(key: str) -> float | None:
        return None if final[key] is None else final[key] - base[key]

    server_cpu, upstream_cpu = used("server_cpu_s"), used("upstream_cpu_s")
    client_cpu = final["client_cpu_s"] - base["client_cpu_s"]
    # Everything else that ran meanwhile: Postgres (the ledger), and any neighbour whose
    # load makes this window's figures suspect.
    other = (
        (final["machine_busy_s"] - base["machine_busy_s"])
        - client_cpu
        - (server_cpu or 0)
        - (upstream_cpu or 0)
    )
    return {
        "target": args.target,
        "model": args.model,
        "concurrency": args.concurrency,
        "window_s": wall,
        "streams": streams,
        "chunks": chunks,
        "messages": final["messages"] - base["messages"],
        "errors": final["errors"] - base["errors"],
        "errors_total": stats.errors,
        "error_kinds": stats.error_kinds,
        "streams_per_s": streams / wall,
        "chunks_per_s": chunks / wall,
        "ttfe_ms": {
            "p50": percentile(stats.ttfe_ms, 50),
            "p90": percentile(stats.ttfe_ms, 90),
            "p99": percentile(stats.ttfe_ms, 99),
            "n": len(stats.ttfe_ms),
        },
        "stream_ms": {"p50": percentile(stats.duration_ms, 50), "p99": percentile(stats.duration_ms, 99)},
        "open_streams": {
            "peak": stats.peak_open,
            "mean": sum(open_samples) / len(open_samples) if open_samples else 0,
            "min": min(open_samples) if open_samples else 0,
        },
        "client_cpu_util": client_cpu / wall,
        "upstream_cpu_util": None if upstream_cpu is None else upstream_cpu / wall,
        "other_cpu_util": max(other, 0.0) / wall,
        "server": None
        if server_cpu is None
        else {
            "cpu_s": server_cpu,
            "cpu_util": server_cpu / wall,
            "cpu_ms_per_stream": server_cpu * 1000 / streams if streams else None,
            "cpu_ms_per_1k_chunks": server_cpu * 1e6 / chunks if chunks else None,
            "rss_kb_start": base["server_rss_kb"],
            "rss_kb_peak": peak_rss,
            "hwm_kb": final["server_hwm_kb"],
            "processes": final["server_processes"],
        },
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="grpc://host:port or http://host:port/v1")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--channels", type=int, default=4096, help="most gRPC channels (workers share beyond)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--drain", type=float, default=30.0, help="seconds running streams get after the window")
    p.add_argument("--model", default="gpt-4o-mini::chunks=20,delay_ms=0")
    p.add_argument("--read-delay-ms", type=float, default=0.0, help="pause after each message")
    p.add_argument("--caller-request-ids", action="store_true", help="send a fresh request_id on every call")
    p.add_argument("--token", help="a chatgate caller's token, sent as authorization on every call")
    p.add_argument("--cancel-at-end", action="store_true", help="cancel open streams when the window ends")
    p.add_argument("--stream-timeout", type=float, default=60.0)
    p.add_argument("--ramp", type=float, default=0.0, help="seconds over which workers start")
    p.add_argument("--watch", type=int, action="append", help="server pid (its tree is measured)")
    p.add_argument("--watch-upstream", type=int, action="append", help="upstream pid")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument(
        "--client",
        choices=("raw", "grpcio"),
        default="raw",
        help="gRPC client: the cheap one (bench/h2client.py) or grpcio's asyncio client",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    del soft
    if args.loop == "uvloop":
        import uvloop

        report = uvloop.run(run(args))
    else:
        report = asyncio.run(run(args))
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
