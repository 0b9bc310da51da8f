"""A TCP proxy in front of Postgres that a test can cut: an outage without stopping the
machine's shared server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class PgProxy:
    """Forwards 127.0.0.1:<port> to Postgres (over TCP, or to its Unix socket).

    ``cut()``: every open connection is dropped and new ones are closed on arrival
    (Postgres "gone"); ``hang()``: connections stay open and new ones are accepted, but
    nothing is forwarded either way (a Postgres that accepts and never answers; what was
    sent meanwhile is delivered on restore); ``restore()``: forwarding again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.up = True
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def url_for(self, database_url: str) -> str:
        """``database_url`` (same database and user) through this proxy."""
        params = conninfo_to_dict(database_url)
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo(**params)  # type: ignore[arg-type]

    def cut(self) -> None:
        self.up = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def hang(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        self.up = True
        self._flowing.set()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        host, port = self._target
        try:
            if host.startswith("/"):
                # A socket directory (the embedded Postgres of ./scripts/test listens
                # only there): libpq's naming, <dir>/.s.PGSQL.<port>.
                up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.transport.abort()
            return
        if not self.up:  # cut while we were connecting
            up_writer.transport.abort()
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
            self._tasks.discard(task)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()


@contextlib.asynccontextmanager
async def running_proxy(database_url: str) -> AsyncIterator[PgProxy]:
    """A started proxy in front of the server of ``database_url``."""
    params = conninfo_to_dict(database_url)
    proxy = PgProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
