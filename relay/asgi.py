"""ASGI plumbing shared by the endpoints: the server's own ``send``, and the socket subprotocol.

Nothing here knows about events, sessions or ComfyUI; the fan-out, the proxy and the
endpoints each import what they need from here instead of from one another.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["RAW_SEND", "SUBPROTOCOL", "TOKEN_SUBPROTOCOL", "RawSend", "choose_subprotocol"]

# The scope key under which RawSend keeps the server's send of a connection.
RAW_SEND = "relay.raw_send"

SUBPROTOCOL = "comfy-relay"
TOKEN_SUBPROTOCOL = "comfy-relay.token."  # noqa: S105 - a prefix, not a secret


def choose_subprotocol(offered: Iterable[str]) -> str | None:
    """The subprotocol to accept: ``comfy-relay`` when offered, else an offered token one.

    A browser that offered subprotocols fails the connection unless one of them is selected.
    """
    offered = list(offered)
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    return next((item for item in offered if item.startswith(TOKEN_SUBPROTOCOL)), None)


class RawSend:
    """Pure ASGI middleware: keeps the server's ``send`` of each connection in its scope.

    Installed outside the framework's exception layers, so the subscribers' writers can hand
    WebSocket frames straight to the server, and a streamed download its chunks, once its
    response has started through the framework (which then knows not to answer with an error).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND] = send
        await self.app(scope, receive, send)
