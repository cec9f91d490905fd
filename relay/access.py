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

import hmac
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode

import orjson
import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.config import RelayConfig
from relay.errors import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED
from relay.metrics import Metrics

__all__ = ["SUBPROTOCOL", "TOKEN_SUBPROTOCOL", "AccessControl", "choose_subprotocol", "refuse_socket"]

log = structlog.get_logger("relay.access")

SUBPROTOCOL = "comfy-relay"
TOKEN_SUBPROTOCOL = "comfy-relay.token."  # noqa: S105 - a prefix, not a secret

# Answer without a token and without counting against the request limit.
_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
# The page's shell and assets: nothing in them is private; the data they load is guarded.
_PAGE = ("/", "/static/")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def choose_subprotocol(offered: Iterable[str]) -> str | None:
    """The subprotocol to accept: ``comfy-relay`` when offered, else an offered token one.

    A browser that offered subprotocols fails the connection unless one of them is selected.
    """
    offered = list(offered)
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    return next((item for item in offered if item.startswith(TOKEN_SUBPROTOCOL)), None)


async def refuse_socket(
    receive: Receive, send: Send, scope: Scope, *, code: int, kind: str, message: str
) -> None:
    """Accept, say why in a ``relay.error`` frame, and close with ``code``."""
    if (await receive())["type"] != "websocket.connect":
        return
    offered = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": choose_subprotocol(offered) or None})
    error = {"type": "relay.error", "code": kind, "message": message}
    await send({"type": "websocket.send", "text": orjson.dumps(error).decode()})
    await send({"type": "websocket.close", "code": code, "reason": message[:120]})


async def _refuse_request(
    send: Send, status: int, kind: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = orjson.dumps({"error": {"type": kind, "message": message}})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw + (headers or [])})
    await send({"type": "http.response.body", "body": body})


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
                if scheme.lower() == "bearer" and self._matches(credentials.strip()):
                    found = True
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
        if not self.origin_allowed(scope):
            self._refused("origin", scope)
            await refuse_socket(
                receive, send, scope, code=CLOSE_FORBIDDEN, kind="origin_not_allowed",
                message="this page's origin may not open relay sockets (RELAY_ALLOWED_ORIGINS)",
            )  # fmt: skip
            return
        if self._token is not None and not self._take_token(scope, socket=True):
            self._refused("unauthorized", scope)
            await refuse_socket(
                receive, send, scope, code=CLOSE_UNAUTHORIZED, kind="unauthorized",
                message="a valid token is required (?token=, a bearer header or the token subprotocol)",
            )  # fmt: skip
            return
        await self.app(scope, receive, send)

    # Requests ----------------------------------------------------------------------------

    async def _request(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path in _PROBES:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in _SAFE_METHODS and not self.origin_allowed(scope):
            self._refused("origin", scope)
            await _refuse_request(
                send,
                403,
                "origin_not_allowed",
                "requests from this origin are not allowed (RELAY_ALLOWED_ORIGINS)",
            )
            return
        public = path == _PAGE[0] or path.startswith(_PAGE[1])
        if self._token is not None and not public and not self._take_token(scope, socket=False):
            self._refused("unauthorized", scope)
            await _refuse_request(
                send, 401, "unauthorized", "a valid token is required (Authorization: Bearer, or ?token=)",
                [(b"www-authenticate", b'Bearer realm="comfy-relay"')],
            )  # fmt: skip
            return
        if self.in_flight >= self._max_requests:
            self._refused("busy", scope)
            await _refuse_request(
                send, 429, "too_many_requests", "the relay is handling too many requests; retry shortly",
                [(b"retry-after", b"1")],
            )  # fmt: skip
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _refused(self, reason: str, scope: Scope) -> None:
        self._metrics.refused.labels(reason).inc()
        log.info("refused", reason=reason, path=scope["path"], origin=_header(scope, b"origin"))
