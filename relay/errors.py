"""The relay's one error boundary: every refusal is a RelayError, mapped to an answer here only.

    RelayError                   HTTP  socket close
    ├── BadRequest               400   4400  the client sent something unusable
    ├── Unauthorized             401   4401  no valid token (RELAY_TOKEN)
    ├── OriginNotAllowed         403   4403  the page's origin is not allowed
    ├── NotFound                 404    -    no such workflow, preview, route
    ├── PayloadTooLarge          413    -    a body over the configured limit
    ├── TooManyRequests          429    -    too many HTTP requests open at once
    ├── TooManyConnections        -    4429  too many sockets, in total or for one client id
    ├── TooSlow                   -    1013  a socket fell too far behind; resume with ?since=
    ├── ShuttingDown              -    1001  the relay is going away
    ├── UpstreamUnavailable      502    -    ComfyUI could not be reached
    └── UpstreamTimeout          504    -    ComfyUI did not answer in time

HTTP clients get ``{"error": {"type": ..., "message": ...}}``. A refused socket is accepted,
told why in one ``relay.error`` frame and closed with the error's code: browsers see a
socket refused during the handshake only as a bare 1006. Starlette's own 404/405 and any
unexpected exception get the same JSON shape (never a traceback); the log gets the details.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar

import orjson
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from relay.asgi import choose_subprotocol

__all__ = [
    "CLOSE_BAD_REQUEST",
    "CLOSE_FORBIDDEN",
    "CLOSE_GOING_AWAY",
    "CLOSE_RESET",
    "CLOSE_TOO_MANY",
    "CLOSE_TOO_SLOW",
    "CLOSE_UNAUTHORIZED",
    "BadRequest",
    "Conflict",
    "NotFound",
    "OriginNotAllowed",
    "PayloadTooLarge",
    "RelayError",
    "ShuttingDown",
    "StreamReset",
    "TooManyConnections",
    "TooManyRequests",
    "TooSlow",
    "Unauthorized",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UpstreamUnreached",
    "error_frame",
    "error_response",
    "exception_handlers",
    "refuse_socket",
]

log = structlog.get_logger("relay.errors")

# WebSocket close codes the relay uses (documented in docs/events.md).
CLOSE_GOING_AWAY = 1001  # the relay is shutting down
CLOSE_POLICY = 1008  # a generic refusal, for errors that have no code of their own
CLOSE_RESET = 1012  # the client's event stream was cut (Redis lost events); reconnect with ?since=
CLOSE_TOO_SLOW = 1013  # the client fell too far behind; reconnect with ?since=
CLOSE_BAD_REQUEST = 4400  # bad query parameters (clientId, events, since)
CLOSE_UNAUTHORIZED = 4401  # no valid token (RELAY_TOKEN)
CLOSE_FORBIDDEN = 4403  # the page's origin is not allowed (RELAY_ALLOWED_ORIGINS)
CLOSE_TOO_MANY = 4429  # too many sockets, in total or for this client id; retry later

# Close reasons must fit a control frame (125 bytes); messages are cut to this many characters.
_REASON_CHARS = 120


class RelayError(Exception):
    status: ClassVar[int] = 500
    close_code: ClassVar[int] = CLOSE_POLICY
    kind: ClassVar[str] = "internal_error"
    # Extra response headers (Retry-After, WWW-Authenticate).
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind  # type: ignore[misc]


class BadRequest(RelayError):
    status = 400
    close_code = CLOSE_BAD_REQUEST
    kind = "bad_request"


class Unauthorized(RelayError):
    status = 401
    close_code = CLOSE_UNAUTHORIZED
    kind = "unauthorized"
    headers: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": 'Bearer realm="comfy-relay"'}


class OriginNotAllowed(RelayError):
    status = 403
    close_code = CLOSE_FORBIDDEN
    kind = "origin_not_allowed"


class NotFound(RelayError):
    status = 404
    kind = "not_found"


class PayloadTooLarge(RelayError):
    status = 413
    kind = "payload_too_large"


class TooManyRequests(RelayError):
    status = 429
    close_code = CLOSE_TOO_MANY
    kind = "too_many_requests"
    headers: ClassVar[Mapping[str, str]] = {"Retry-After": "1"}


class TooManyConnections(RelayError):
    status = 429
    close_code = CLOSE_TOO_MANY
    kind = "too_many_connections"


class TooSlow(RelayError):
    status = 503
    close_code = CLOSE_TOO_SLOW
    kind = "too_slow"


class StreamReset(RelayError):
    status = 503
    close_code = CLOSE_RESET
    kind = "stream_reset"


class ShuttingDown(RelayError):
    status = 503
    close_code = CLOSE_GOING_AWAY
    kind = "shutting_down"


class Conflict(RelayError):
    status = 409
    kind = "conflict"


class UpstreamUnavailable(RelayError):
    status = 502
    kind = "upstream_unavailable"


class UpstreamUnreached(UpstreamUnavailable):
    """No connection to ComfyUI could be made: the request never reached it (safe to send elsewhere)."""


class UpstreamTimeout(RelayError):
    status = 504
    kind = "upstream_timeout"


# HTTP ------------------------------------------------------------------------------------


def _json(kind: str, message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": {"type": kind, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(error: RelayError) -> Response:
    """The HTTP answer to ``error`` (a Response is an ASGI app: middleware can send it too)."""
    return _json(error.kind, error.message, error.status, error.headers or None)


async def _relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    if exc.status >= 500:
        log.warning("request failed", path=request.url.path, error=exc.message)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _json(kind, str(exc.detail), exc.status_code, exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error", path=request.url.path)
    return _json("internal_error", "the relay failed to handle this request", 500)


Handler = Callable[[Request, Exception], Coroutine[Any, Any, Response]]


def exception_handlers() -> dict[Any, Handler]:
    """The app's exception handlers: relay errors, the framework's 404/405, anything else (500)."""
    return {RelayError: _relay_error, HTTPException: _http_error, Exception: _unexpected}


# WebSocket -------------------------------------------------------------------------------


def error_frame(error: RelayError) -> str:
    """The ``relay.error`` frame that tells a client why (before a close, or on its own)."""
    return orjson.dumps({"type": "relay.error", "code": error.kind, "message": error.message}).decode()


async def refuse_socket(websocket: WebSocket[Any], error: RelayError) -> None:
    """Accept, say why in a ``relay.error`` frame, and close with the error's code."""
    await websocket.accept(subprotocol=choose_subprotocol(websocket.scope.get("subprotocols") or []))
    await websocket.send_text(error_frame(error))
    await websocket.close(error.close_code, error.message[:_REASON_CHARS])
