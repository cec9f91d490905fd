"""The relay's one error tree, mapped to HTTP statuses and WebSocket close codes here only.

    RelayError
    ├── BadRequest           400  the client sent something unusable
    ├── PayloadTooLarge      413  a body over the configured limit
    ├── UpstreamUnavailable  502  ComfyUI could not be reached
    └── UpstreamTimeout      504  ComfyUI did not answer in time

Clients get ``{"error": {"type": ..., "message": ...}}``; the log gets the details.
"""

from __future__ import annotations

from typing import ClassVar

import orjson
from starlette.responses import Response

__all__ = [
    "CLOSE_BAD_REQUEST",
    "CLOSE_FORBIDDEN",
    "CLOSE_GOING_AWAY",
    "CLOSE_TOO_MANY",
    "CLOSE_TOO_SLOW",
    "CLOSE_UNAUTHORIZED",
    "BadRequest",
    "PayloadTooLarge",
    "RelayError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_response",
]

# WebSocket close codes the relay uses (documented in docs/events.md).
CLOSE_GOING_AWAY = 1001  # the relay is shutting down
CLOSE_TOO_SLOW = 1013  # the client fell too far behind; reconnect with ?since=
CLOSE_BAD_REQUEST = 4400  # bad query parameters (clientId, events, since)
CLOSE_UNAUTHORIZED = 4401  # no valid token (RELAY_TOKEN)
CLOSE_FORBIDDEN = 4403  # the page's origin is not allowed (RELAY_ALLOWED_ORIGINS)
CLOSE_TOO_MANY = 4429  # too many sockets, in total or for this client id; retry later


class RelayError(Exception):
    status: ClassVar[int] = 500
    kind: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RelayError):
    status = 400
    kind = "bad_request"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind  # type: ignore[misc]


class PayloadTooLarge(RelayError):
    status = 413
    kind = "payload_too_large"


class UpstreamUnavailable(RelayError):
    status = 502
    kind = "upstream_unavailable"


class UpstreamTimeout(RelayError):
    status = 504
    kind = "upstream_timeout"


def error_response(error: RelayError) -> Response:
    body = orjson.dumps({"error": {"type": error.kind, "message": error.message}})
    return Response(body, status_code=error.status, media_type="application/json")
