"""Request ids, access log lines and HTTP metrics: the outermost middleware.

Every request and socket gets an id (the caller's ``X-Request-ID`` when it is a sane one,
else a new one), bound to the log context for everything logged while it is handled and sent
back as ``X-Request-ID``. Each HTTP request ends with one ``request`` log line (probes and
scrapes at debug level) and is counted by route template, method and status, with its body
bytes each way. Sockets pass through untouched but for the id: their frames are the fan-out
hot path.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

import structlog
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.metrics import Metrics

__all__ = ["Telemetry"]

log = structlog.get_logger("relay.http")

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})
_UNMATCHED = "unmatched"


def _route_labels(routes: Iterable[BaseRoute]) -> dict[Any, str]:
    """Endpoint → the first path template it is served at (``/prompt`` rather than ``/api/prompt``)."""
    labels: dict[Any, str] = {}
    for route in routes:
        if isinstance(route, (Route, WebSocketRoute)):
            labels.setdefault(route.endpoint, route.path)
        elif isinstance(route, Mount):
            labels.setdefault(route.app, route.path + "/*")
    return labels


class Telemetry:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self._metrics = metrics
        self._labels = _route_labels(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = self._request_id(scope)
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            if kind == "websocket":
                await self.app(scope, receive, send)
            else:
                await self._http(scope, receive, send, request_id)

    @staticmethod
    def _request_id(scope: Scope) -> str:
        for key, value in scope["headers"]:
            if key == b"x-request-id" and _REQUEST_ID.fullmatch(value):
                return str(value.decode())
        return uuid.uuid4().hex

    async def _http(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        started = time.perf_counter()
        status = 500
        sent = received = 0
        id_header = (b"x-request-id", request_id.encode())

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            elapsed = time.perf_counter() - started
            route = self._labels.get(scope.get("endpoint"), _UNMATCHED)
            method = scope["method"]
            metrics = self._metrics
            metrics.http_requests.labels(route, method, str(status)).inc()
            metrics.http_seconds.labels(route).observe(elapsed)
            if received:
                metrics.http_bytes.labels(route, "in").inc(received)
            if sent:
                metrics.http_bytes.labels(route, "out").inc(sent)
            path = scope["path"]
            line = log.debug if path in _QUIET else log.info
            line(
                "request", method=method, path=path, route=route, status=status, bytes_in=received,
                bytes_out=sent, duration_ms=round(elapsed * 1000, 1),
            )  # fmt: skip
