"""A minimal chat-completions server over a real socket that keeps what the simulator
deliberately does not: the credential headers and the full target (path and query).

For tests that must see which key reached which deployment, and the Azure URL form.
It answers every POST with a short, well-formed stream (one word, usage, [DONE]), or
with the bytes a test puts in ``stream`` (a recorded one).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: dict[str, object]


def _stream(model: str) -> bytes:
    chunks = [
        {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "model": model, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": None}]},
        {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "model": model, "choices": [
            {"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "model": model, "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
    ]  # fmt: skip
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


class RecordingUpstream:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        # Extra response headers, e.g. x-ratelimit-remaining-requests (tests change them).
        self.headers: dict[str, str] = {}
        # A recorded stream to answer with instead of the short one (tests set it).
        self.stream: bytes | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def root_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = orjson.loads(await reader.readexactly(int(headers.get("content-length", "0"))))
                self.seen.append(Seen(method, target, headers, body))
                payload = self.stream or _stream(str(body.get("model") or "azure-model"))
                extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    + extra
                    + f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
