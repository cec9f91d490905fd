"""The data path for downloads: GET/HEAD to ComfyUI with the body passed on as it arrives.

httpx is the relay's client for everything else, but on a large ``/view`` download its
layers (pool, anyio streams and a timeout scope per 64 KiB read) cost the relay more CPU per
byte than ComfyUI spends sending it (bench/proxy.py). Here each connection is an asyncio
protocol: h11 frames the answer, every chunk the event loop reads goes on to the browser
as it is, and reading from ComfyUI pauses while the browser is behind, so memory stays
bounded whatever the file size.

Connections are kept alive and reused (up to ``keepalive`` idle ones, for ``idle_expiry``
seconds); a request that finds a reused connection already closed by ComfyUI is sent again
once on a new one (GET and HEAD are safe to repeat). Failures map to the relay's errors:
:class:`UpstreamUnavailable` (502) and :class:`UpstreamTimeout` (504).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Iterable
from typing import cast
from urllib.parse import urlsplit

import h11

from relay.errors import UpstreamTimeout, UpstreamUnavailable

__all__ = ["BodyCutShort", "StreamedAnswer", "StreamingClient"]

# Bytes read from ComfyUI but not yet handed to the browser, before reading pauses.
_HIGH_WATER = 512 * 1024
_LOW_WATER = 128 * 1024


class BodyCutShort(Exception):
    """ComfyUI's answer ended before its body did (connection lost, malformed, or too slow)."""


class _Connection(asyncio.Protocol):
    """One TCP connection to ComfyUI, carrying one request at a time."""

    def __init__(self, read_timeout: float) -> None:
        self.read_timeout = read_timeout
        self.h11 = h11.Connection(h11.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = False  # has carried a request before (a reused connection)
        self.answered = False  # bytes of an answer to the current request arrived
        self.idle_since = 0.0
        self._head: h11.Response | None = None
        self._method = b"GET"
        self._keep_alive = False  # ComfyUI's answer allows another request on this connection
        # Body bytes still to come, counted here once h11 has framed a Content-Length answer: the
        # chunks then go on as read, without a copy into and out of h11's buffer.
        self._remaining: int | None = None
        self._body_seen = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._ended = False  # the whole body arrived
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        remaining = self._remaining
        if remaining is not None:
            if len(data) >= remaining:
                if len(data) > remaining:  # more than the body: no reuse after this
                    self._keep_alive = False
                    data = data[:remaining]
                self._ended = True
            self._remaining = remaining - len(data)
            self._push(data)
            self._wake()
            return
        try:
            self.h11.receive_data(data)
            self._take_events()
        except h11.RemoteProtocolError as exc:
            self._fail(exc)
            self.close()

    def eof_received(self) -> bool:
        if self._remaining is not None:
            if not self._ended:
                self._fail(ConnectionResetError("ComfyUI closed the connection before the body ended"))
            return False
        try:
            self.h11.receive_data(b"")
            self._take_events()
        except h11.RemoteProtocolError as exc:
            self._fail(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self._ended:
            self._fail(exc or ConnectionResetError("ComfyUI closed the connection"))

    # reading -----------------------------------------------------------------------------
    def _take_events(self) -> None:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Data):
                self._body_seen += len(event.data)
                self._push(bytes(event.data))
            elif isinstance(event, h11.Response):
                self._head = event
                self._keep_alive = event.http_version == b"1.1" and not _has_token(
                    event.headers, b"connection", b"close"
                )
            elif isinstance(event, h11.EndOfMessage):
                self._ended = True
            elif isinstance(event, h11.ConnectionClosed):
                if not self._ended:
                    self._fail(ConnectionResetError("ComfyUI closed the connection"))
                break
        if self._head is not None and not self._ended and self.h11.their_state is h11.SEND_BODY:
            length = _content_length(self._head, self._method)
            if length is not None:
                self._remaining = length - self._body_seen
        self._wake()

    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Wait for something to happen on the connection; TimeoutError after the read timeout.

        A timer rather than ``asyncio.timeout``: it is only set up when there is nothing to read.
        """
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self.read_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def head(self) -> h11.Response:
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._head

    async def read(self) -> bytes:
        """The next piece of the body as it arrived, b"" at its end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _LOW_WATER and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self._ended:
                return b""
            if self._error is not None:
                raise BodyCutShort(repr(self._error)) from self._error
            try:
                await self._wait()
            except TimeoutError:
                raise BodyCutShort(f"no data from ComfyUI for {self.read_timeout:g} s") from None

    # writing and reuse -------------------------------------------------------------------
    def send_request(self, request: h11.Request) -> None:
        assert self.transport is not None
        self._method = request.method
        self.transport.write(self.h11.send(request) + (self.h11.send(h11.EndOfMessage()) or b""))

    def reusable(self) -> bool:
        idle = self._ended and not self._chunks and self._error is None
        return idle and self._keep_alive and not self.closed

    def next_cycle(self) -> None:
        self.h11 = h11.Connection(h11.CLIENT)
        self._head = None
        self._remaining = None
        self._body_seen = 0
        self._ended = False
        self._keep_alive = False
        self._error = None
        self.answered = False
        self.used = True
        self.idle_since = time.monotonic()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _has_token(headers: Iterable[tuple[bytes, bytes]], name: bytes, token: bytes) -> bool:
    return any(
        key == name and any(part.strip() == token for part in value.lower().split(b","))
        for key, value in headers
    )


def _content_length(head: h11.Response, method: bytes) -> int | None:
    """The body length of an answer h11 frames by Content-Length (None for chunked or no body)."""
    if method == b"HEAD" or head.status_code in (204, 304):
        return None
    for key, value in head.headers:
        if key == b"content-length":
            return int(value)
    return None


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class StreamedAnswer:
    """ComfyUI's status and headers, with the body still to read with :meth:`read`."""

    def __init__(self, client: StreamingClient, connection: _Connection, head: h11.Response) -> None:
        self.status: int = head.status_code
        self.headers: list[tuple[bytes, bytes]] = list(head.headers)
        self._client = client
        self._connection: _Connection | None = connection

    async def read(self) -> bytes:
        """The next piece of the body as ComfyUI sent it; b"" at the end (the answer is then closed).

        Raises:
            BodyCutShort: the body ended early; the answer is closed.
        """
        connection = self._connection
        if connection is None:
            return b""
        try:
            chunk = await connection.read()
        except BaseException:
            self.close()
            raise
        if not chunk:
            self.close()
        return chunk

    def close(self) -> None:
        """Give the connection back (its answer fully read) or close it (anything else)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._client._release(connection)


class StreamingClient:
    """A small HTTP/1.1 client for ComfyUI downloads, with its own keep-alive connections."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
        keepalive: int = 20,
        idle_expiry: float = 5.0,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        default_port = self.port == (443 if url.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = host if default_port else f"{host}:{self.port}"
        self._prefix = url.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._keepalive = keepalive
        self._idle_expiry = idle_expiry
        self._closed = False

    async def open(self, method: str, target: str, headers: list[tuple[str, str]]) -> StreamedAnswer:
        """Send ``method target`` (a path with its query) and wait for ComfyUI's status and headers.

        The caller reads the body with ``answer.read()`` until b"" or calls ``answer.close()``.
        """
        try:
            await asyncio.wait_for(self._slots.acquire(), self.connect_timeout)
        except TimeoutError:
            raise UpstreamTimeout("too many requests to ComfyUI waiting for a connection") from None
        try:
            return await self._open(method, target, headers)
        except BaseException:
            self._slots.release()
            raise

    async def _open(self, method: str, target: str, headers: list[tuple[str, str]]) -> StreamedAnswer:
        request = h11.Request(
            method=method,
            target=self._prefix + target,
            headers=[("host", self._host_header), *headers],
        )
        while True:
            connection = await self._connection()
            try:
                connection.send_request(request)
                head = await connection.head()
            except TimeoutError:
                connection.close()
                path = target.partition("?")[0]
                raise UpstreamTimeout(f"ComfyUI did not answer {method} {path} in time") from None
            except h11.ProtocolError as exc:
                connection.close()
                if connection.used and not connection.answered:
                    continue  # kept alive, but ComfyUI had closed it: once more on a new connection
                raise UpstreamUnavailable(f"ComfyUI sent a malformed answer: {exc}") from exc
            except OSError as exc:
                connection.close()
                if connection.used and not connection.answered:
                    continue
                raise UpstreamUnavailable(f"ComfyUI is unreachable: {exc.__class__.__name__}") from exc
            except BaseException:
                connection.close()
                raise
            return StreamedAnswer(self, connection, head)

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < self._idle_expiry:
                return connection
            connection.close()
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(self._new_connection, self.host, self.port, ssl=self._ssl),
                self.connect_timeout,
            )
        except TimeoutError:
            raise UpstreamTimeout("ComfyUI did not accept a connection in time") from None
        except OSError as exc:
            raise UpstreamUnavailable(f"ComfyUI is unreachable: {exc.__class__.__name__}") from exc
        return connection

    def _new_connection(self) -> _Connection:
        return _Connection(self.read_timeout)

    def _release(self, connection: _Connection) -> None:
        self._slots.release()
        if connection.reusable() and not self._closed and len(self._idle) < self._keepalive:
            connection.next_cycle()
            self._idle.append(connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        await asyncio.sleep(0)  # let the transports finish closing
