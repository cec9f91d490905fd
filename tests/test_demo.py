"""``comfy-relay demo`` (the README's first command) as a newcomer uses it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.relay_client import open_tab
from tests.test_emulator_cli import free_port


async def test_demo_prints_working_commands(tmp_path: Path) -> None:
    """The demo starts relay and emulator; the wscat URL and curl command it prints work as printed."""
    relay_port, comfy_port = free_port(), free_port()
    ports = ["--port", str(relay_port), "--comfyui-port", str(comfy_port)]
    command = [sys.executable, "-m", "relay", "demo", *ports, "--speed", "10"]
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}  # learned durations: not the user's own
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    assert process.stdout is not None
    try:
        banner: list[str] = []
        async with asyncio.timeout(20):
            while not banner or "Ctrl-C" not in banner[-1]:
                banner.append((await process.stdout.readline()).decode())
        text = "".join(banner)
        ws_url = next(line.split("'")[1] for line in banner if "wscat -c" in line)
        assert ws_url == f"ws://127.0.0.1:{relay_port}/ws?clientId=demo"
        curl = text[text.index("curl -s") : text.index("Ctrl-C")].replace("\\\n", " ").strip()
        tab = await open_tab(ws_url.split("?")[0], "clientId=demo")
        if shutil.which("curl") is None:
            pytest.fail("curl is needed to run the printed command")
        result = await asyncio.create_subprocess_shell(curl, stdout=subprocess.PIPE)
        output, _ = await result.communicate()
        answer = json.loads(output)
        assert answer["client_id"] == "demo"
        done = await tab.wait_done(answer["prompt_id"], timeout=60)
        assert done["status"] == "success"
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{relay_port}/healthz")
        assert health.json()["status"] == "ok"
        await tab.close()
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            await process.wait()
    assert process.returncode == 0
