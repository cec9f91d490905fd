"""What the real server does around every request (PROTOCOL.md §6, §8; traces 13, 15).

* Origin check (default): when ``Host`` is a loopback address and an ``Origin`` is sent, the
  two must name the same host:port, else 403 with an empty body. This applies to the
  WebSocket upgrade as well. A non-loopback ``Host`` is not checked.
* ``--enable-cors-header``: no Origin check; CORS headers on every response except 413;
  any OPTIONS request answers 200.
* Every request body is limited to ``--max-upload-size``: 413 ``text/plain``.
* ``--enable-compress-response-body``: JSON and text/plain bodies are deflated (or gzipped).
* An unexpected failure answers the aiohttp 500 page with ``Connection: close``.
"""

from __future__ import annotations

import gzip
import ipaddress
import logging
import zlib
from collections import deque
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.emulator.errors import ServerCrash

__all__ = ["SERVER_ERROR_BODY", "RequestLog", "ServerEdge", "origin_allowed"]

logger = logging.getLogger("relay.emulator.edge")

SERVER_ERROR_BODY = b"500 Internal Server Error\n\nServer got itself in trouble"
_CORS_METHODS = "POST, GET, DELETE, PUT, OPTIONS"
_CORS_HEADERS = "Content-Type, Authorization"
_COMPRESSIBLE = ("application/json", "text/plain")


class _BodyTooLarge(Exception):
    pass


def _is_loopback(host: str) -> bool:
    hostname = urlsplit(f"//{host}").hostname or ""
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def origin_allowed(headers: Headers) -> bool:
    """The server's default Origin rule."""
    host = headers.get("host")
    origin = headers.get("origin")
    if not host or not origin or not _is_loopback(host):
        return True
    return urlsplit(origin).netloc.lower() == host.lower()


class ServerEdge:
    def __init__(self, app: ASGIApp, *, cors_origin: str | None, max_body: int, compress: bool) -> None:
        self.app = app
        self.cors_origin = cors_origin
        self.max_body = max_body
        self.compress = compress

    def _cors(self) -> list[tuple[bytes, bytes]]:
        if self.cors_origin is None:
            return []
        return [
            (b"access-control-allow-origin", self.cors_origin.encode()),
            (b"access-control-allow-methods", _CORS_METHODS.encode()),
            (b"access-control-allow-headers", _CORS_HEADERS.encode()),
            (b"access-control-allow-credentials", b"true"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.cors_origin is None and not origin_allowed(headers):
            if scope["type"] == "websocket":
                # Closing before accepting makes the server answer the upgrade with 403.
                await send({"type": "websocket.close", "code": 1008})
            else:
                await _respond(send, 403, b"", [])
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            await _respond(send, 200, b"", self._cors())
            return
        await self._http(scope, receive, send, headers)

    async def _http(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        received = 0
        finished = False
        started = False
        declared = headers.get("content-length")

        async def limited_receive() -> Message:
            nonlocal received, finished
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                finished = not message.get("more_body", False)
                if received > self.max_body:
                    raise _BodyTooLarge
            return message

        accept_encoding = headers.get("accept-encoding", "")
        pending: list[Message] = []

        async def edge_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                response_headers = MutableHeaders(raw=list(message["headers"]))
                for name, value in self._cors():
                    response_headers.append(name.decode(), value.decode())
                message = {**message, "headers": response_headers.raw}
                if self.compress and _compressible(response_headers) and _coding(accept_encoding):
                    pending.append(message)
                    return
            elif pending:
                pending.append(message)
                if not message.get("more_body", False):
                    await _send_compressed(send, pending, _coding(accept_encoding))
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, edge_send)
        except _BodyTooLarge:
            if started:
                raise
            body = f"Maximum request body size {self.max_body} exceeded.".encode()
            await _respond(send, 413, body, [(b"content-type", b"text/plain; charset=utf-8")])
            if not finished:
                await _drain(receive)
        except Exception as exc:
            if not isinstance(exc, (ServerCrash, ClientDisconnect)):
                logger.exception("request failed")
            if started:
                raise
            await _respond(
                send,
                500,
                SERVER_ERROR_BODY,
                [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"), *self._cors()],
            )


def _compressible(headers: MutableHeaders) -> bool:
    content_type = headers.get("content-type", "").split(";")[0].strip()
    return content_type in _COMPRESSIBLE and "content-encoding" not in headers


def _coding(accept_encoding: str) -> str | None:
    offered = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",")}
    if "deflate" in offered:
        return "deflate"
    if "gzip" in offered:
        return "gzip"
    return None


async def _send_compressed(send: Send, messages: list[Message], coding: str | None) -> None:
    start, chunks = messages[0], messages[1:]
    body = b"".join(m.get("body", b"") for m in chunks)
    data = zlib.compress(body) if coding == "deflate" else gzip.compress(body)
    headers = MutableHeaders(raw=list(start["headers"]))
    headers["content-encoding"] = coding or "gzip"
    headers["content-length"] = str(len(data))
    await send({**start, "headers": headers.raw})
    await send({"type": "http.response.body", "body": data})


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    raw = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive) -> None:
    """Read and discard the rest of a refused body so the client can read the 413."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


class RequestLog:
    """Remembers the last requests the server received (method, path, query, headers), for tests."""

    def __init__(self, app: ASGIApp, *, log: deque[tuple[str, str, str, Headers]]) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            query = scope.get("query_string", b"").decode("latin-1")
            self.log.append((scope.get("method", "WS"), scope["path"], query, Headers(scope=scope)))
        await self.app(scope, receive, send)
