"""Who receives what (PROTOCOL.md §2).

The server keeps one dict ``sid -> socket``. A message for client X goes to ``sockets[X]``
if present, a broadcast to every registered socket. A second socket with the same clientId
replaces the first in the dict without closing it; when the replaced socket later closes,
its cleanup removes the *replacement's* entry and leaves it orphaned. This module keeps that
behaviour by default because a relay has to survive it.

All sends go through one queue and one publisher task that awaits each socket in turn, as
the real server does; a slow socket therefore delays everybody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from relay.protocol import encode_message

__all__ = ["Connection", "SocketHub"]

logger = logging.getLogger("relay.emulator.sockets")

# Bounds the publisher's backlog; the executor waits when it is full.
_QUEUE_LIMIT = 10_000


@dataclass(eq=False, slots=True)
class Connection:
    websocket: WebSocket
    sid: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, payload: str | bytes) -> None:
        async with self.lock:
            if self.websocket.application_state is not WebSocketState.CONNECTED:
                return
            if isinstance(payload, bytes):
                await self.websocket.send_bytes(payload)
            else:
                await self.websocket.send_text(payload)


class SocketHub:
    def __init__(self, *, duplicate_client_quirk: bool = True) -> None:
        self.sockets: dict[str, Connection] = {}
        self.feature_flags: dict[str, dict[str, Any]] = {}
        # Sids that registered while another socket of the same sid was still open here: the
        # start of the orphaning hazard. Not the server's state; kept for tests to check.
        self.overlaps: list[str] = []
        # The most sockets open at once per client (the part of a sid before its first dot, as
        # the relay names its routing ids): more than one for a client means two relays held it.
        self.peak: dict[str, int] = {}
        self._quirk = duplicate_client_quirk
        self._queue: asyncio.Queue[tuple[str | bytes, str | None]] = asyncio.Queue(_QUEUE_LIMIT)
        self._every_connection: set[Connection] = set()
        self._changed = asyncio.Event()  # set, and replaced, at every open or close

    def live(self) -> list[Connection]:
        """Every socket still open on this side, registered or orphaned."""
        return list(self._every_connection)

    def register(self, connection: Connection) -> None:
        if any(other.sid == connection.sid for other in self._every_connection):
            self.overlaps.append(connection.sid)
        self.sockets[connection.sid] = connection
        self.feature_flags[connection.sid] = {}
        self._every_connection.add(connection)
        client = connection.sid.split(".")[0]
        open_now = sum(1 for other in self._every_connection if other.sid.split(".")[0] == client)
        self.peak[client] = max(self.peak.get(client, 0), open_now)
        self._notify()

    def unregister(self, connection: Connection) -> None:
        self._every_connection.discard(connection)
        if self._quirk or self.sockets.get(connection.sid) is connection:
            # With the quirk, whatever is registered under this sid goes, even a replacement.
            self.sockets.pop(connection.sid, None)
            self.feature_flags.pop(connection.sid, None)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, checked at every socket opened or closed."""
        while not predicate():
            await self._changed.wait()

    def supports_preview_metadata(self, sid: str | None) -> bool:
        if sid is None:
            return False
        return bool(self.feature_flags.get(sid, {}).get("supports_preview_metadata"))

    async def send_json(self, message_type: str, data: Any, sid: str | None) -> None:
        """Queue a JSON message for ``sid`` (None: every socket)."""
        await self._queue.put((encode_message(message_type, data), sid))

    async def send_bytes(self, frame: bytes, sid: str | None) -> None:
        await self._queue.put((frame, sid))

    def send_json_nowait(self, message_type: str, data: Any, sid: str | None) -> None:
        """Queue from synchronous code (queue-change status broadcasts)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait((encode_message(message_type, data), sid))

    async def publish_forever(self) -> None:
        while True:
            payload, sid = await self._queue.get()
            if sid is None:
                targets = list(self.sockets.values())
            else:
                target = self.sockets.get(sid)
                targets = [target] if target is not None else []
            for connection in targets:
                await _deliver(connection, payload)

    async def close_all(self, code: int = 1001) -> None:
        """Close every socket, registered or orphaned (server shutdown, or a simulated drop)."""
        for connection in list(self._every_connection):
            with contextlib.suppress(Exception):
                await connection.websocket.close(code)


async def _deliver(connection: Connection, payload: str | bytes) -> None:
    try:
        await connection.send(payload)
    except Exception as exc:  # a socket that went away must not stop the publisher
        logger.debug("send to %s failed: %r", connection.sid, exc)
