"""Real relay processes for the tests of several replicas: ``python -m relay serve`` on free
ports, sharing one Redis and one emulator, killed or restarted as a test says."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

__all__ = ["RelayProcess", "relay_processes"]

# Short timers, so takeovers and reconnects happen within a test's patience.
_SETTINGS = {
    "RELAY_LEASE_TTL": "1.0",
    "RELAY_UPSTREAM_GRACE": "0.5",
    "RELAY_RECONNECT_INITIAL": "0.05",
    "RELAY_RECONNECT_MAX": "0.5",
    "RELAY_UPSTREAM_CONNECT_TIMEOUT": "6",
    "RELAY_DETACHED_POLL_INTERVAL": "0.5",
    "RELAY_ETA_FILE": "",
    "RELAY_LOG_FORMAT": "json",
    "RELAY_SHUTDOWN_GRACE": "3",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RelayProcess:
    """One relay replica in a process of its own."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.env = env
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        """Start (again, on the same port) and wait until it answers /healthz."""
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                env=self.env, stdout=out, stderr=out,
            )  # fmt: skip
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as http, asyncio.timeout(30):
            while True:
                assert self.process.returncode is None, f"{self.name} exited at start: see {self.log}"
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no handover (a node lost, an OOM kill)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod in a rolling update, and wait for the exit."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await self.process.wait()
        except TimeoutError:
            self.process.send_signal(signal.SIGUSR1)  # its tasks' stacks into its log
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self.process.wait()
            raise AssertionError(f"{self.name} did not stop within 30 s of SIGTERM: see {self.log}") from None


@contextlib.asynccontextmanager
async def relay_processes(
    count: int, *, comfyui_url: str, redis_url: str, folder: Path, **settings: str
) -> AsyncIterator[list[RelayProcess]]:
    """``count`` relays in front of one ComfyUI, sharing one Redis; all stopped after the block."""
    env = {**os.environ, **_SETTINGS, "COMFYUI_URL": comfyui_url, "RELAY_REDIS_URL": redis_url, **settings}
    relays = [RelayProcess(f"relay-{n}", env, folder / f"relay-{n}.log") for n in range(count)]
    try:
        await asyncio.gather(*(relay.start() for relay in relays))
        yield relays
    finally:
        for relay in relays:
            if relay.process is not None and relay.process.returncode is None:
                relay.process.send_signal(signal.SIGKILL)
                await relay.process.wait()
