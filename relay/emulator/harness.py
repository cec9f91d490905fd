"""Run the emulator inside the current event loop, for tests and the demo.

    async with run_emulator(EmulatorConfig(speed=20)) as emulator:
        httpx.get(f"{emulator.url}/queue")

The server listens on 127.0.0.1 and an ephemeral port unless the config names one.
``restart()`` brings a fresh server process-equivalent up on the same port (an upstream
that went away and came back); ``drop_sockets()`` cuts every WebSocket while the queue
keeps running.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from relay.emulator.config import EmulatorConfig
from relay.emulator.server import EmulatorState, create_app
from relay.serving import InLoopServer

__all__ = ["INCOMING_FRAME_LIMIT", "RunningEmulator", "run_emulator", "uvicorn_config"]

# The real server closes a socket that sends a frame over 4 MiB with code 1009 (trace 13).
INCOMING_FRAME_LIMIT = 4 * 1024 * 1024


def uvicorn_config(app: Starlette, config: EmulatorConfig, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn settings that match the real server's WebSocket behaviour."""
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        lifespan="on",
        ws_max_size=INCOMING_FRAME_LIMIT,
        # The real server sends no pings of its own; it answers the client's.
        ws_ping_interval=None,
        ws_ping_timeout=None,
        access_log=False,
    )


class RunningEmulator(InLoopServer):
    def __init__(self, config: EmulatorConfig) -> None:
        # Folders outlive restarts, as a real server's disk does; unset ones go to a scratch dir.
        self._scratch: Path | None = None
        if config.output_dir is None or config.input_dir is None or config.temp_dir is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="comfy-emulator-"))
            config = replace(
                config,
                output_dir=config.output_dir or self._scratch / "output",
                input_dir=config.input_dir or self._scratch / "input",
                temp_dir=config.temp_dir or self._scratch / "temp",
            )
        self.config = config
        super().__init__(config.host, config.port, self._serve, name="emulator-server")

    def _serve(self, port: int) -> tuple[Starlette, uvicorn.Server]:
        config = replace(self.config, port=port)
        app = create_app(config)
        return app, uvicorn.Server(uvicorn_config(app, config))

    @property
    def state(self) -> EmulatorState:
        assert self.app is not None, "the emulator is not running"
        state: EmulatorState = self.app.state.emulator
        return state

    async def close(self) -> None:
        """Stop, and remove the scratch folders if this object made them."""
        await self.stop()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    async def restart(self) -> None:
        """Stop and start again on the same port, with empty queue, history and cache."""
        await self.stop()
        await self.start()

    async def drop_sockets(self) -> None:
        """Close every WebSocket from the server side, keeping the server and its queue."""
        await self.state.hub.close_all(1011)


@contextlib.asynccontextmanager
async def run_emulator(config: EmulatorConfig | None = None) -> AsyncIterator[RunningEmulator]:
    """Start an emulated server for the duration of the block."""
    emulator = RunningEmulator(config or EmulatorConfig(port=0))
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.close()
