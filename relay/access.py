"""Who may use the relay: the shared token, browser origins, and the limit on open requests.

A pure ASGI middleware in front of every route:

- **Token** (``RELAY_TOKEN``, off by default). HTTP requests carry it as
  ``Authorization: Bearer <token>`` or ``?token=``; sockets, which browsers cannot give
  headers, also as the subprotocol ``comfy-relay.token.<token>`` (offered beside
  ``comfy-relay``, which the relay then selects). A token found is taken out of the request
  before it goes further, so it never reaches ComfyUI or a log line. Probes, ``/metrics`` and
  the page's own files need none.
- **Origin.** A browser's ``Origin`` must be the relay's own (its ``Host``, or the
  ``X-Forwarded-Host`` an ingress passes on) or one listed in ``RELAY_ALLOWED_ORIGINS``: for
  every socket, and for every request that can change something (not GET/HEAD/OPTIONS).
  Clients that send no ``Origin`` (wscat, curl, back ends) are not browsers and pass.
- **Open requests** above ``RELAY_MAX_HTTP_REQUESTS`` are answered 429 at once.

Refused requests get the relay's JSON error; refused sockets are accepted and closed at once
with a ``relay.error`` frame and a close code a browser can read (4401, 4403), since a socket
refused during the handshake reaches page scripts only as a bare 1006.
"""

from __future__ import annotations

import contextlib
import hmac
from urllib.parse import parse_qsl, urlencode

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from relay.asgi import TOKEN_SUBPROTOCOL
from relay.config import RelayConfig
from relay.errors import (
    BadRequest,
    OriginNotAllowed,
    RelayError,
    TooManyRequests,
    Unauthorized,
    error_response,
    refuse_socket,
)
from relay.metrics import Metrics

__all__ = ["AccessControl"]

log = structlog.get_logger("relay.access")

# Answer without a token and without counting against the request limit.
_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
# The page's shell and assets: nothing in them is private; the data they load is guarded.
_PAGE = ("/", "/static/")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Headers the origin rule reads: a request that carries one of them twice is refused, since
# the two copies could be read differently here and by whatever stands in front.
_SINGLE = (b"origin", b"host", b"x-forwarded-host")


def _repeated(scope: Scope) -> BadRequest | None:
    seen = [key for key, _ in scope["headers"] if key in _SINGLE]
    for name in _SINGLE:
        if seen.count(name) > 1:
            return BadRequest(f"the request carries more than one {name.decode()} header", "duplicate_header")
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class AccessControl:
    def __init__(self, app: ASGIApp, *, config: RelayConfig, metrics: Metrics) -> None:
        self.app = app
        self._token = config.token.encode() if config.token else None
        self._origins = frozenset(config.origins)
        self._any_origin = "*" in self._origins
        self._max_requests = config.max_http_requests
        self._metrics = metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._socket(scope, receive, send)
        elif kind == "http":
            await self._request(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # Rules -------------------------------------------------------------------------------

    def origin_allowed(self, scope: Scope) -> bool:
        origin = _header(scope, b"origin")
        if origin is None or self._any_origin:
            return True
        origin = origin.rstrip("/").lower()
        if origin in self._origins:
            return True
        _, _, authority = origin.partition("://")
        hosts = {_header(scope, b"host"), (_header(scope, b"x-forwarded-host") or "").split(",")[0].strip()}
        return authority in {host.lower() for host in hosts if host}

    def _matches(self, candidate: str) -> bool:
        assert self._token is not None
        return hmac.compare_digest(candidate.encode(), self._token)

    def _take_token(self, scope: Scope, *, socket: bool) -> bool:
        """Whether the request carries the token; the token is removed from it either way."""
        found = False
        headers = []
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":  # the relay's to check; no guess goes on to ComfyUI
                    found = self._matches(credentials.strip()) or found
                    continue
            headers.append((key, value))
        scope["headers"] = headers
        query = scope.get("query_string", b"")
        if b"token=" in query:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            found = any(self._matches(value) for key, value in pairs if key == "token") or found
            scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "token"]).encode("latin-1")
        if socket:
            for offered in scope.get("subprotocols") or []:
                if offered.startswith(TOKEN_SUBPROTOCOL) and self._matches(offered[len(TOKEN_SUBPROTOCOL) :]):
                    found = True
        return found

    # Sockets -----------------------------------------------------------------------------

    async def _socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        repeated = _repeated(scope)
        if repeated is not None:
            error: RelayError = repeated
            reason = "bad_headers"
        elif not self.origin_allowed(scope):
            error = OriginNotAllowed("this page's origin may not open relay sockets (RELAY_ALLOWED_ORIGINS)")
            reason = "origin"
        elif self._token is not None and not self._take_token(scope, socket=True):
            error = Unauthorized(
                "a valid token is required (?token=, a bearer header or the token subprotocol)"
            )
            reason = "unauthorized"
        else:
            await self.app(scope, receive, send)
            return
        self._refused(reason, scope)
        # A client that left before the handshake leaves nothing to refuse.
        with contextlib.suppress(RuntimeError, OSError):
            await refuse_socket(WebSocket(scope, receive, send), error)

    # Requests ----------------------------------------------------------------------------

    async def _request(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path in _PROBES:
            await self.app(scope, receive, send)
            return
        public = path == _PAGE[0] or path.startswith(_PAGE[1])
        repeated = _repeated(scope)
        if repeated is not None:
            error: RelayError = repeated
            reason = "bad_headers"
        elif scope["method"] not in _SAFE_METHODS and not self.origin_allowed(scope):
            error = OriginNotAllowed("requests from this origin are not allowed (RELAY_ALLOWED_ORIGINS)")
            reason = "origin"
        elif self._token is not None and not public and not self._take_token(scope, socket=False):
            error = Unauthorized("a valid token is required (Authorization: Bearer, or ?token=)")
            reason = "unauthorized"
        elif self.in_flight >= self._max_requests:
            error = TooManyRequests("the relay is handling too many requests; retry shortly")
            reason = "busy"
        else:
            self.in_flight += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.in_flight -= 1
            return
        self._refused(reason, scope)
        await error_response(error)(scope, receive, send)

    def _refused(self, reason: str, scope: Scope) -> None:
        self._metrics.refused.labels(reason).inc()
        log.info("refused", reason=reason, path=scope["path"], origin=_header(scope, b"origin"))
