"""The download data path (relay/streaming.py) against a ComfyUI that misbehaves on purpose.

The emulator answers like ComfyUI does; these faults (connections dropped between or during
answers, chunked and close-delimited bodies, stalls) come from a scripted HTTP server on
127.0.0.1 whose every connection and request the tests can see.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from relay.emulator import RunningEmulator
from relay.server import RunningRelay, run_relay
from tests.conftest import relay_config

Reply = Callable[["Exchange"], Awaitable[bool]]  # returns whether to keep the connection open


@dataclass
class Exchange:
    """One request as the scripted server saw it, and the connection to answer on."""

    connection: int  # 1 for the server's first connection, 2 for the second, ...
    number: int  # requests on this connection so far, this one included
    head: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class Scripted:
    port: int
    reply: Reply
    exchanges: list[Exchange] = field(default_factory=list)
    connections: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a connection ended
    written: int = 0  # body bytes written by trickle()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def scripted(reply: Reply) -> AsyncIterator[Scripted]:
    state = Scripted(0, reply)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        connection, number = state.connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                number += 1
                exchange = Exchange(connection, number, head, reader, writer)
                state.exchanges.append(exchange)
                if not await state.reply(exchange):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            state.closed.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)


def answer(body: bytes, *extra: str) -> bytes:
    lines = [
        "HTTP/1.1 200 OK",
        "Content-Type: application/octet-stream",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


BODY = os.urandom(300_000)


@contextlib.asynccontextmanager
async def relay_in_front(
    emulator: RunningEmulator, upstream: Scripted, **overrides: object
) -> AsyncIterator[tuple[RunningRelay, httpx.AsyncClient]]:
    config = relay_config(emulator, comfyui_url=upstream.url, **overrides)
    async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        yield relay, http


async def view(http: httpx.AsyncClient, name: str = "a.bin") -> httpx.Response:
    return await http.get("/view", params={"filename": name, "type": "output"})


async def test_connections_are_kept_alive_and_a_stale_one_is_replaced(emulator: RunningEmulator) -> None:
    """Downloads share one connection; when ComfyUI has dropped it, the request goes again on a new one."""

    async def reply(exchange: Exchange) -> bool:
        if exchange.connection == 1 and exchange.number == 4:
            return False  # the kept-alive connection was closed by ComfyUI: no answer on it
        exchange.writer.write(answer(BODY))
        await exchange.writer.drain()
        return True

    async with scripted(reply) as upstream, relay_in_front(emulator, upstream) as (_, http):
        for _ in range(3):
            response = await view(http)
            assert (response.status_code, response.content) == (200, BODY)
        assert upstream.connections == 1
        retried = await view(http)
        assert (retried.status_code, retried.content) == (200, BODY)
        assert upstream.connections == 2
        assert [e.connection for e in upstream.exchanges] == [1, 1, 1, 1, 2]
        # What reached ComfyUI: the relay's own request line and Host, not the browser's.
        first = upstream.exchanges[0].head.decode()
        assert first.startswith("GET /view?filename=a.bin&type=output HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{upstream.port}" in first.lower()


async def test_a_fresh_connection_that_fails_is_a_502(emulator: RunningEmulator) -> None:
    async def reply(exchange: Exchange) -> bool:
        return False  # closes without a word

    async with scripted(reply) as upstream, relay_in_front(emulator, upstream) as (_, http):
        response = await view(http)
        assert response.status_code == 502
        assert response.json()["error"]["type"] == "upstream_unavailable"
        assert upstream.connections == 1  # not retried: the connection was new


async def test_chunked_close_delimited_and_connection_close_answers(emulator: RunningEmulator) -> None:
    """Whatever framing ComfyUI uses, the browser gets the whole body; 'close' answers are not reused."""

    async def reply(exchange: Exchange) -> bool:
        writer = exchange.writer
        if b"chunked" in exchange.head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for start in range(0, len(BODY), 70_000):
                piece = BODY[start : start + 70_000]
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if b"until-close" in exchange.head:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n" + BODY)
            await writer.drain()
            return False
        writer.write(answer(BODY, "Connection: close"))
        await writer.drain()
        return False

    async with scripted(reply) as upstream, relay_in_front(emulator, upstream) as (_, http):
        chunked = await view(http, "chunked.bin")
        assert (chunked.status_code, chunked.content) == (200, BODY)
        until_close = await view(http, "until-close.png")
        assert (until_close.status_code, until_close.content) == (200, BODY)
        assert until_close.headers["content-type"] == "image/png"
        for _ in range(2):
            closing = await view(http, "closing.bin")
            assert (closing.status_code, closing.content) == (200, BODY)
        # The chunked answer kept its connection; the close-delimited and "close" ones did not.
        assert [e.connection for e in upstream.exchanges] == [1, 1, 2, 3]


async def test_a_body_cut_short_is_a_short_download_not_a_whole_file(emulator: RunningEmulator) -> None:
    """ComfyUI dies or stalls mid-body: the browser's download ends early (its client sees the
    Content-Length unmet), the relay logs it and goes on serving."""

    async def reply(exchange: Exchange) -> bool:
        writer = exchange.writer
        if b"dies" in exchange.head or b"stalls" in exchange.head:
            whole = answer(BODY)
            writer.write(whole[: len(whole) // 2])
            await writer.drain()
            if b"stalls" in exchange.head:
                await exchange.reader.read()  # until the relay gives up and closes
            return False
        writer.write(answer(BODY))
        await writer.drain()
        return True

    async with (
        scripted(reply) as upstream,
        relay_in_front(emulator, upstream, http_read_timeout=0.5) as (_, http),
    ):
        for name in ("dies.bin", "stalls.bin"):
            with pytest.raises(httpx.RemoteProtocolError):
                await view(http, name)
        whole = await view(http, "fine.bin")
        assert (whole.status_code, whole.content) == (200, BODY)
        assert (await http.get("/healthz")).status_code == 200


async def test_a_browser_that_goes_away_stops_the_download_from_comfyui(emulator: RunningEmulator) -> None:
    """Reading from ComfyUI follows the browser: it pauses while the browser is behind (memory stays
    bounded) and the connection to ComfyUI closes when the browser leaves."""
    size = 1 << 30

    async def reply(exchange: Exchange) -> bool:
        writer = exchange.writer
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        block = bytes(256 * 1024)
        with contextlib.suppress(ConnectionError):
            while upstream.written < size:
                writer.write(block)
                await writer.drain()
                upstream.written += len(block)
        return False

    async with scripted(reply) as upstream, relay_in_front(emulator, upstream) as (relay, _):
        # A raw client, to stop reading without closing (an HTTP client would close its socket).
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"GET /view?filename=huge.bin HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        await reader.readexactly(100_000)
        await asyncio.sleep(0.5)  # the browser reads no more: neither must the relay
        paused_at = upstream.written
        await asyncio.sleep(0.5)
        assert upstream.written == paused_at
        assert paused_at < 64 * 1024 * 1024  # socket buffers and the relay's bounded queue
        assert not upstream.closed.is_set()
        writer.close()  # the browser leaves
        await asyncio.wait_for(upstream.closed.wait(), 5)
        assert upstream.written < size


async def test_download_connections_are_limited(emulator: RunningEmulator) -> None:
    """Over RELAY_HTTP_MAX_CONNECTIONS downloads at once, the next one waits, then gets a 504."""
    release = asyncio.Event()

    async def reply(exchange: Exchange) -> bool:
        await release.wait()
        exchange.writer.write(answer(BODY))
        await exchange.writer.drain()
        return True

    overrides = {"http_max_connections": 1, "http_connect_timeout": 0.3}
    async with scripted(reply) as upstream, relay_in_front(emulator, upstream, **overrides) as (_, http):
        first = asyncio.create_task(view(http))
        await asyncio.sleep(0.1)
        second = await view(http)
        assert second.status_code == 504
        assert second.json()["error"]["type"] == "upstream_timeout"
        release.set()
        assert (await first).content == BODY
        assert upstream.connections == 1
