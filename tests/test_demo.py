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

        # The printed submit command, run as printed: portrait_mode's 16 named steps, then its output.
        submit = next(line.strip() for line in banner if " submit portrait_mode --watch" in line)
        watch = await asyncio.create_subprocess_shell(submit, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        async with asyncio.timeout(90):
            watched, errors = await watch.communicate()
        assert watch.returncode == 0, errors.decode()
        lines = watched.decode().splitlines()
        portrait = json.loads((Path(__file__).parents[1] / "workflows" / "portrait_mode.json").read_text())
        names = {texts["ko"] for texts in portrait["steps"].values()}
        steps = [line for line in lines if line.startswith("[") and "/16] " in line]
        assert [line[1:3].strip() for line in steps] == [str(i) for i in range(1, 17)]
        assert {line[8 : line.index(" (elapsed")] for line in steps} == names
        assert lines[-1].startswith(f"output: http://127.0.0.1:{relay_port}/view?filename=portrait_")
        async with httpx.AsyncClient() as http:
            image = await http.get(lines[-1].removeprefix("output: "))
        assert image.content.startswith(b"\x89PNG")
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            await process.wait()
    assert process.returncode == 0
