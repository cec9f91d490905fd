"""One client's WebSocket to ComfyUI: open, read, reconnect with backoff, watch for silence.

The socket registers under a routing id (``relay.routing``): ComfyUI sends it the events of
the prompts submitted with that id. ComfyUI keeps one socket per id, and when a socket it still
holds closes, its cleanup unregisters the id even if another socket holds it by then
(PROTOCOL.md §2). So this class never has two sockets open at once, and it reuses a routing id
only when it knows ComfyUI has let go of the last socket under it:

* the last socket ended with a closing handshake: ComfyUI sent a close frame, or answered ours.
  Its handler has ended, so the id is free, and prompts still running under it keep streaming
  to the next socket (ComfyUI replays the running node to it);
* no socket was opened (the connection was refused, or ComfyUI answered the upgrade with an
  HTTP error): nothing was registered.

Otherwise (a reset, a timeout, a socket that went quiet and was given up) ComfyUI may still hold
the old socket open, for seconds or for as long as its TCP stack takes to notice. Registering
under the same id would be undone when that socket finally closes, with no sign of it on this
side. The next socket therefore takes a new routing id; prompts submitted under the old one can
no longer be followed live, and the client session settles them from ComfyUI's history.

What the frames mean is not this module's business: they go to an :class:`UpstreamHandler`
(the client session), which also reconciles prompts after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket as _socket
from typing import Literal, Protocol
from urllib.parse import quote

import orjson
import structlog
import websockets
from websockets.asyncio.client import ClientConnection

from relay.config import RelayConfig
from relay.routing import routing_id
from relay.tasks import stop

__all__ = ["State", "Upstream", "UpstreamHandler"]

log = structlog.get_logger("relay.upstream")

State = Literal["connecting", "connected", "down", "closed"]

# What the bundled ComfyUI frontend sends first; with it previews carry their prompt id.
_FEATURE_FLAGS = orjson.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}).decode()


class UpstreamHandler(Protocol):
    def on_frame(self, frame: str | bytes) -> None:
        """A frame from ComfyUI, in order. Must not block."""

    def on_state(self, state: State, attempt: int, reason: str | None) -> None:
        """The connection changed state."""

    async def on_connected(self, reconnected: bool) -> None:
        """The socket is open (again), under :attr:`Upstream.sid`: reconcile what may have been missed."""

    async def on_silence(self) -> bool:
        """No frame for a while although prompts are active; True asks for a fresh socket."""

    def needs_watch(self) -> bool:
        """Whether prompts are active (silence is then worth checking)."""


class Upstream:
    def __init__(
        self, client_id: str, handler: UpstreamHandler, config: RelayConfig, *, ws_url: str | None = None
    ) -> None:
        self.client_id = client_id
        # ComfyUI's /ws (with several backends, this socket's backend's).
        self.ws_url = ws_url or config.comfyui_ws_url
        self.handler = handler
        self.config = config
        # The routing id the current (or next) socket registers under.
        self.sid = routing_id(client_id)
        self.state: State = "down"
        self.attempt = 0
        self.reason: str | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._socket: ClientConnection | None = None
        self._closing = False
        self._ever_connected = False
        self._socket_sid = self.sid  # the routing id the open socket registered under

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Open the socket in the background if it is not already open or opening."""
        if self.running:
            return
        self._closing = False
        self._set_state("connecting", 0, None)
        self._task = asyncio.create_task(self._run(), name=f"upstream-{self.client_id}")

    async def wait_connected(self, limit: float) -> bool:
        """Start if needed and wait up to ``limit`` seconds for the socket to be open."""
        self.start()
        try:
            async with asyncio.timeout(limit):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    async def confirm(self, limit: float) -> bool:
        """Whether the open socket still reaches ComfyUI: a ping is answered within ``limit``
        seconds. A socket that fails is given up at once, so the loop opens the next one under a
        new routing id. A silent drop shows only this way: frames that arrived a moment ago prove
        nothing about the next one.
        """
        socket = self._socket
        if socket is None or self.state != "connected":
            return False
        try:
            pong = await socket.ping()
            async with asyncio.timeout(limit):
                await pong
        except TimeoutError:
            log.warning("upstream socket did not answer a ping; giving it up", client_id=self.client_id,
                        limit=limit)  # fmt: skip
            self._connected.clear()  # before the loop sees the loss: nothing may use it meanwhile
            socket.transport.abort()
            return False
        except websockets.ConnectionClosed:
            return False
        return True

    async def close(self) -> None:
        """Close the socket cleanly and stop reconnecting."""
        self._closing = True
        task, self._task = self._task, None
        if self._socket is not None:
            await self._close_socket(self._socket, self._socket_sid)
        await stop(task)
        self._set_state("closed", 0, "closed by the relay")

    async def reopen(self) -> None:
        """Close the current socket so the loop opens a fresh one (suspected orphaning)."""
        if self._socket is not None:
            await self._close_socket(self._socket, self._socket_sid)

    async def _close_socket(self, socket: ClientConnection, sid: str) -> None:
        """Close with a handshake; if ComfyUI does not answer it, the routing id is not reused."""
        with contextlib.suppress(Exception):
            await socket.close()
        self._settle(socket, sid)

    def _settle(self, socket: ClientConnection, sid: str) -> None:
        """After a socket under ``sid`` ended: keep the id only if ComfyUI has surely let go of it."""
        if socket.protocol.close_rcvd is None:
            self._retire(sid, "the socket ended without a closing handshake")

    def _retire(self, sid: str, why: str) -> None:
        """Take a new routing id for the next socket, unless that was done already."""
        if self.sid != sid:
            return
        self.sid = routing_id(self.client_id)
        log.warning("new ComfyUI client id for the next socket", client_id=self.client_id, why=why,
                    old_sid=sid, sid=self.sid)  # fmt: skip

    def _set_state(self, state: State, attempt: int, reason: str | None) -> None:
        if (state, attempt) == (self.state, self.attempt):
            return
        self.state, self.attempt, self.reason = state, attempt, reason
        if state == "connected":
            self._connected.set()
        else:
            self._connected.clear()
        self.handler.on_state(state, attempt, reason)

    def _backoff(self, attempt: int) -> float:
        base: float = min(
            self.config.reconnect_max, self.config.reconnect_initial * 2.0 ** max(0, attempt - 1)
        )
        jitter = base * self.config.reconnect_jitter
        return max(0.0, base + random.uniform(-jitter, jitter))

    async def _run(self) -> None:
        attempt = 0
        reason: str | None = None
        while not self._closing:
            self._set_state("connecting", attempt, reason if attempt else None)
            sid = self.sid
            try:
                reason = await self._session(sid, reconnected=self._ever_connected)
            except websockets.InvalidStatus as exc:
                # ComfyUI registers a socket only once it has accepted the upgrade.
                reason = f"ComfyUI refused the socket: HTTP {exc.response.status_code}"
            except (ConnectionRefusedError, _socket.gaierror) as exc:
                reason = f"{exc.__class__.__name__}: {exc}".strip()
            except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed) as exc:
                # Cut during the handshake: ComfyUI may have accepted, and registered, the socket.
                reason = f"{exc.__class__.__name__}: {exc}".strip()
                self._retire(sid, f"the handshake did not finish ({reason})")
            if self._closing:
                break
            attempt = 1 if self.state == "connected" else attempt + 1
            self._set_state("down", attempt, reason)
            log.warning("upstream socket down", client_id=self.client_id, url=self.ws_url, reason=reason,
                        attempt=attempt)  # fmt: skip
            await asyncio.sleep(self._backoff(attempt))

    async def _session(self, sid: str, *, reconnected: bool) -> str:
        """One connection under routing id ``sid``, from open to close; returns why it ended."""
        async with websockets.connect(
            f"{self.ws_url}?clientId={quote(sid)}",
            max_size=None,  # ComfyUI sends multi-megabyte preview frames
            compression=None,
            open_timeout=self.config.upstream_connect_timeout,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=5,
        ) as socket:
            self._socket, self._socket_sid = socket, sid
            try:
                await socket.send(_FEATURE_FLAGS)
                self._ever_connected = True
                self._set_state("connected", self.attempt, None)
                await self.handler.on_connected(reconnected)
                while True:
                    timeout = self.config.stall_check_interval if self.handler.needs_watch() else None
                    try:
                        async with asyncio.timeout(timeout):
                            frame = await socket.recv()
                    except TimeoutError:
                        if await self.handler.on_silence():
                            await self._close_socket(socket, sid)
                            return "reopened: the socket went silent while prompts were active"
                        continue
                    self.handler.on_frame(frame)
            except websockets.ConnectionClosed as closed:
                self._settle(socket, sid)
                if closed.rcvd is None:
                    return "lost without a close frame"
                return f"closed by ComfyUI ({closed.rcvd.code})"
            finally:
                self._socket = None
