"""Helpers shared by the benchmarks: free ports, child server processes, waiting for them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

__all__ = ["free_port", "server_process", "wait_until_up"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def server_process(
    *command: str, env: dict[str, str] | None = None, log: Path | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run a server for the duration of the block; terminate it (kill if it lingers) afterwards.
    Its output goes to ``log`` when given, else nowhere."""
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    process = await asyncio.create_subprocess_exec(*command, env=env, stdout=out, stderr=out)
    try:
        yield process
    finally:
        process.terminate()
        try:
            async with asyncio.timeout(15):
                await process.wait()
        except TimeoutError:
            process.kill()
        if log is not None and not isinstance(out, int):
            out.close()


async def wait_until_up(url: str) -> None:
    async with httpx.AsyncClient() as http, asyncio.timeout(30):
        while True:
            try:
                await http.get(url)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.05)
