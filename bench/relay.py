"""The baselines chatgate is measured against, serving the same ``ChatService.Complete``.

``--mode relay`` (the "minimal relay"): a bare grpc.aio → httpx relay with no
features — no validation beyond what it needs, no deadline, retries, breaker, ledger,
tracing or logging. It reads the upstream's SSE with a plain split on blank lines,
decodes each chunk with orjson and writes one message per content delta, bracketed by
``started`` and ``finished`` like chatgate, so the load generator sees the same shape.

``--mode ceiling`` (the raw grpc.aio ceiling): no upstream at all; it writes
``started``, N content messages (N from the model's ``::chunks=N`` suffix) and
``finished``. What gRPC alone costs on this machine.

Run: ``python -m bench.relay --port P --upstream http://127.0.0.1:8000/v1 [--mode ceiling]``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
import httpx
import orjson

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc

Context = grpc.aio.ServicerContext[pb.CompleteRequest, pb.CompleteResponse]


class MinimalRelay(chat_pb2_grpc.ChatServiceServicer):
    """Relays one upstream stream per call; everything else left out on purpose."""

    def __init__(self, upstream: str, max_connections: int) -> None:
        self._url = upstream.rstrip("/") + "/chat/completions"
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(60.0),
            trust_env=False,
        )
        self._headers = {"authorization": "Bearer bench", "content-type": "application/json"}

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> None:  # type: ignore[override]
        body = orjson.dumps(
            {
                "model": request.model,
                "messages": [{"role": "user", "content": m.text} for m in request.messages],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        write = context.write
        started = False
        usage = None
        buf = b""
        async with self._client.stream("POST", self._url, content=body, headers=self._headers) as response:
            async for raw in response.aiter_raw():
                buf += raw
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    payload = event[6:]  # b"data: "
                    if payload == b"[DONE]":
                        continue
                    chunk = orjson.loads(payload)
                    if not started:
                        started = True
                        await write(
                            pb.CompleteResponse(
                                started=pb.Started(request_id=request.request_id, model=chunk["model"])
                            )
                        )
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk["choices"]:
                        text = choice["delta"].get("content")
                        if text:
                            await write(pb.CompleteResponse(content=pb.ContentDelta(text=text)))
        finished = pb.Finished(finish_reason=pb.FINISH_REASON_STOP, outcome=pb.OUTCOME_COMPLETED)
        if usage:
            finished.usage.input_tokens = usage["prompt_tokens"]
            finished.usage.output_tokens = usage["completion_tokens"]
        await write(pb.CompleteResponse(finished=finished))

    async def aclose(self) -> None:
        await self._client.aclose()


class Ceiling(chat_pb2_grpc.ChatServiceServicer):
    """No upstream: what writing the same messages costs grpc.aio alone."""

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> None:  # type: ignore[override]
        n = 20
        for item in request.model.partition("::")[2].split(","):
            key, _, value = item.partition("=")
            if key == "chunks":
                n = int(value)
        write = context.write
        await write(pb.CompleteResponse(started=pb.Started(request_id=request.request_id, model="ceiling")))
        for i in range(n):
            await write(pb.CompleteResponse(content=pb.ContentDelta(text=" word" if i else "Word")))
        await write(
            pb.CompleteResponse(
                finished=pb.Finished(finish_reason=pb.FINISH_REASON_STOP, outcome=pb.OUTCOME_COMPLETED)
            )
        )

    async def aclose(self) -> None:
        return None


async def serve(args: argparse.Namespace) -> None:
    servicer: MinimalRelay | Ceiling = (
        Ceiling() if args.mode == "ceiling" else MinimalRelay(args.upstream, args.max_connections)
    )
    server = grpc.aio.server(maximum_concurrent_rpcs=args.max_connections)
    chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"bench relay ({args.mode}) listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    await servicer.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", default="http://127.0.0.1:8000/v1", help="OpenAI-style base URL")
    parser.add_argument("--mode", choices=("relay", "ceiling"), default="relay")
    parser.add_argument("--max-connections", type=int, default=4096)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        # Same event loop as chatgate, so the comparison is about the code, not the loop.
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
