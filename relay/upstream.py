"""One client's WebSocket to ComfyUI: open, read, reconnect with backoff, watch for silence.

The socket registers under the client's own id, so ComfyUI routes that client's prompts to
it. ComfyUI keeps one socket per id and a second one orphans both (PROTOCOL.md §2), so this
class never has two open at once: a socket is closed, and its closing handshake finished,
before the next one is opened.

What the frames mean is not this module's business: they go to an :class:`UpstreamHandler`
(the client session), which also reconciles prompts after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Literal, Protocol
from urllib.parse import quote

import orjson
import structlog
import websockets
from websockets.asyncio.client import ClientConnection

from relay.config import RelayConfig

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
        """The socket is open (again): reconcile what may have been missed."""

    async def on_silence(self) -> bool:
        """No frame for a while although prompts are active; True asks for a fresh socket."""

    def needs_watch(self) -> bool:
        """Whether prompts are active (silence is then worth checking)."""


class Upstream:
    def __init__(self, client_id: str, handler: UpstreamHandler, config: RelayConfig) -> None:
        self.client_id = client_id
        self.handler = handler
        self.config = config
        self.url = f"{config.comfyui_ws_url}?clientId={quote(client_id)}"
        self.state: State = "down"
        self.attempt = 0
        self.reason: str | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._socket: ClientConnection | None = None
        self._closing = False
        self._ever_connected = False

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

    async def close(self) -> None:
        """Close the socket cleanly and stop reconnecting."""
        self._closing = True
        task, self._task = self._task, None
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_state("closed", 0, "closed by the relay")

    async def reopen(self) -> None:
        """Close the current socket so the loop opens a fresh one (suspected orphaning)."""
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close()

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
            try:
                reason = await self._session(reconnected=self._ever_connected)
            except websockets.InvalidStatus as exc:
                reason = f"ComfyUI refused the socket: HTTP {exc.response.status_code}"
            except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed) as exc:
                reason = f"{exc.__class__.__name__}: {exc}".strip()
            if self._closing:
                break
            attempt = 1 if self.state == "connected" else attempt + 1
            self._set_state("down", attempt, reason)
            log.warning("upstream socket down", client_id=self.client_id, reason=reason, attempt=attempt)
            await asyncio.sleep(self._backoff(attempt))

    async def _session(self, *, reconnected: bool) -> str:
        """One connection, from open to close; returns why it ended."""
        async with websockets.connect(
            self.url,
            max_size=None,  # ComfyUI sends multi-megabyte preview frames
            compression=None,
            open_timeout=self.config.upstream_connect_timeout,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=5,
        ) as socket:
            self._socket = socket
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
                            await socket.close()
                            return "reopened: the socket went silent while prompts were active"
                        continue
                    self.handler.on_frame(frame)
            except websockets.ConnectionClosed as closed:
                return f"closed by ComfyUI ({closed.rcvd.code if closed.rcvd else 'no close frame'})"
            finally:
                self._socket = None
