"""A real redis-server for a test: started on a free port, in memory only, stopped after it.

The tests that need one skip, saying why, when redis-server is not installed (`make redis`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["RedisServer", "redis_server"]


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    folder: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Redis:
        return Redis.from_url(self.url, decode_responses=True)

    async def stop(self) -> None:
        """SIGTERM, and wait for it to be gone (no save: it keeps nothing)."""
        self.process.terminate()
        await asyncio.to_thread(self.process.wait, 15)

    async def start(self) -> None:
        """Start it (again) on the same port, empty, and wait until it answers."""
        self.process = _launch(self.port, self.folder)
        await _answering(self)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _launch(port: int, folder: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(folder), "--protected-mode", "yes"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _answering(server: RedisServer) -> None:
    client = server.client()
    try:
        async with asyncio.timeout(20):
            while True:
                assert server.process.poll() is None, "redis-server exited at start"
                with contextlib.suppress(OSError, RedisConnectionError):
                    if await client.ping():
                        return
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make redis)")
    port = _free_port()
    server = RedisServer(port, _launch(port, tmp_path), tmp_path)
    await _answering(server)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            await server.stop()
