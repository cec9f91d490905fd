"""Running the relay under uvicorn, standalone or inside a test's event loop.

uvicorn closes WebSockets with 1012 when it shuts down; the relay first closes its browser
sockets itself with 1001 (going away), which clients treat as a reason to reconnect later.
"""

from __future__ import annotations

import contextlib
import gc
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import uvicorn
from starlette.applications import Starlette

from relay.app import create_app
from relay.config import RelayConfig
from relay.serving import InLoopServer
from relay.state import RelayState

__all__ = ["RelayServer", "RunningRelay", "run_relay", "tune_gc", "uvicorn_config"]


def tune_gc() -> None:
    """Make the collector's full passes rare, for a long-running relay process.

    Fan-out allocates short-lived objects for every tab on every event (a send coroutine, a
    frame). With the default threshold a full pass, which walks every object of every open
    connection, came every few seconds under load and showed up as the p99 latency of whole
    events in bench/fanout.py. Objects alive at start-up are frozen out of collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def uvicorn_config(app: Starlette, config: RelayConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        lifespan="on",
        log_config=None,  # logging is configured by relay.logs
        access_log=False,
        # Browser sockets: no compression (cheap fan-out), small incoming frames.
        ws_per_message_deflate=False,
        ws_max_size=config.max_client_frame,
        ws_ping_interval=config.ws_ping_interval or None,
        ws_ping_timeout=config.ws_ping_interval or None,
        timeout_graceful_shutdown=config.shutdown_grace,
    )


class RelayServer(uvicorn.Server):
    """uvicorn, with the relay closing its clients with 1001 before uvicorn drops connections."""

    @property
    def relay_state(self) -> RelayState | None:
        """What the app's lifespan opened, while it runs."""
        lifespan = getattr(self, "lifespan", None)
        state = getattr(lifespan, "state", None) or {}
        relay: RelayState | None = state.get("relay")
        return relay if isinstance(relay, RelayState) else None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        state = self.relay_state
        if state is not None:
            await state.close_clients()
        await super().shutdown(sockets)


class RunningRelay(InLoopServer):
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        super().__init__(config.host, config.port, self._serve, name="relay-server")

    def _serve(self, port: int) -> tuple[Starlette, uvicorn.Server]:
        config = replace(self.config, port=port)
        app = create_app(config)
        self._relay_server = RelayServer(uvicorn_config(app, config))
        return app, self._relay_server

    @property
    def state(self) -> RelayState:
        """The running relay's resources (what its lifespan opened)."""
        server: RelayServer | None = getattr(self, "_relay_server", None)
        state = server.relay_state if server is not None else None
        assert state is not None, "the relay is not running"
        return state


@contextlib.asynccontextmanager
async def run_relay(config: RelayConfig) -> AsyncIterator[RunningRelay]:
    """Run a relay in this event loop for the duration of the block (port 0: any free port)."""
    relay = RunningRelay(config)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()
