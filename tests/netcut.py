"""A TCP forwarder on 127.0.0.1 whose connections a test can cut, to drop a client's socket.

``cut()`` resets both ends at once, as a failure both sides see. ``cut(hold=s)`` resets only
the client's end and keeps the server's end open for ``s`` seconds, swallowing what the server
sends, before resetting it too: a drop that the server, which sends no heartbeats, notices
late. ``cut(hold=s, blackhole=True)`` resets nothing at first: both ends stay open and whatever
either sends is lost, as behind a NAT that forgot the connection, until both are reset.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["Forwarder", "forwarder"]


class _Link:
    """One forwarded connection: the client's end and the server's end."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter, websocket: bool) -> None:
        self.client = client
        self.server = server
        self.websocket = websocket
        self.held = False
        self.blackholed = False
        self.released = asyncio.Event()

    def release(self) -> None:
        """End the hold: the server's end (and the client's, if still open) is reset now."""
        self.server.transport.abort()
        self.client.transport.abort()
        self.released.set()


class Forwarder:
    """Accepts on its own port and pipes each connection to ``target_port``; ``cut()`` drops them."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The first bytes say whether this is a WebSocket upgrade (a test may cut only those).
        first = b""
        with contextlib.suppress(ConnectionError, OSError):
            first = await reader.read(65536)
        if not first:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        head = first.split(b"\r\n\r\n", 1)[0].lower()
        link = _Link(writer, up_writer, websocket=b"upgrade: websocket" in head)
        self._links.add(link)
        up_writer.write(first)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer, link, to_client=False)),
            asyncio.create_task(self._pipe(up_reader, writer, link, to_client=True)),
        ]
        self._tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        if link.held:
            await link.released.wait()  # the server's end lives on until the hold ends
        for pipe in pipes:
            pipe.cancel()
        for end in (writer, up_writer):
            end.close()
        self._links.discard(link)
        self._tasks.difference_update(pipes)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, *, to_client: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if (to_client and link.held) or link.blackholed:
                    continue  # lost on the way
                writer.write(data)
                await writer.drain()

    def cut(
        self, *, hold: float | None = None, blackhole: bool = False, websockets_only: bool = False
    ) -> int:
        """Reset open connections (no close handshake), as a network failure would.

        With ``hold``, only the client's end is reset now and the server's end ``hold`` seconds
        later; with ``blackhole`` too, neither is reset before then, but nothing gets through.
        With ``websockets_only``, plain HTTP connections are left alone. Returns how many
        connections were cut.
        """
        self.cuts += 1
        links = [link for link in self._links if link.websocket or not websockets_only]
        loop = asyncio.get_running_loop()
        for link in links:
            if hold:
                link.held = True
                link.blackholed = blackhole
                if not blackhole:
                    link.client.transport.abort()
                timer = loop.call_later(hold, link.release)
                self._timers.add(timer)
            else:
                link.client.transport.abort()
                link.server.transport.abort()
        return len(links)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for timer in self._timers:
            timer.cancel()
        for link in list(self._links):
            link.release()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()


@contextlib.asynccontextmanager
async def forwarder(target_port: int) -> AsyncIterator[Forwarder]:
    running = Forwarder(target_port)
    await running.start()
    try:
        yield running
    finally:
        await running.close()
