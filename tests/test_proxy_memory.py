"""Memory does not grow with file size: a 500 MB download through a relay process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx

from relay.emulator import RunningEmulator
from tests.test_emulator_cli import free_port

PAGE = os.sysconf("SC_PAGE_SIZE")
SIZE = 500 * 1024 * 1024


def rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


async def test_streaming_500_mb_keeps_relay_memory_flat(emulator: RunningEmulator) -> None:
    """Relay RSS grows by less than 20 MB while a 500 MB /view download streams through it."""
    big = emulator.state.folders.output / "huge.bin"
    with big.open("wb") as handle:
        handle.truncate(SIZE)  # sparse: costs no disk, reads as zeros
    port = free_port()
    env = {**os.environ, "COMFYUI_URL": emulator.url, "RELAY_PORT": str(port), "RELAY_LOG_LEVEL": "warning"}
    relay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            async with asyncio.timeout(20):
                while True:
                    try:
                        if (await http.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
            # Warm up the path (client pools, buffers) before taking the baseline.
            await http.get("/view", params={"filename": "huge.bin"}, headers={"Range": "bytes=0-1048575"})
            baseline = peak = rss(relay.pid)
            received = 0
            params = {"filename": "huge.bin", "type": "output"}
            async with http.stream("GET", "/view", params=params) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    peak = max(peak, rss(relay.pid))
        assert received == SIZE
        growth = peak - baseline
        print(f"relay RSS growth while streaming 500 MB: {growth / 1e6:.1f} MB")
        assert growth < 20 * 1024 * 1024, f"relay RSS grew by {growth / 1e6:.1f} MB"
    finally:
        relay.terminate()
        await relay.wait()
        big.unlink(missing_ok=True)
