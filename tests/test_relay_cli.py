"""``comfy-relay serve`` as an operator runs it: configured from the environment, JSON logs, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx

from relay.config import ENV_NAMES, ENV_ONLY
from relay.emulator import RunningEmulator
from relay.errors import CLOSE_GOING_AWAY
from tests.relay_client import open_tab
from tests.test_emulator_cli import free_port
from tests.test_relay_events import TEXT2IMG, TEXT2IMG_NAMES, TEXT2IMG_ORDER


def test_help_documents_every_setting() -> None:
    """`serve --help` names every option with its environment variable."""
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--help"], capture_output=True, text=True, check=True
    )
    for field, env in ENV_NAMES.items():
        flag = f"--{field.replace('_', '-')}"
        if field in ENV_ONLY:  # secrets: the environment only, never a flag others can read
            assert flag not in result.stdout
            continue
        assert flag in result.stdout
        assert env in result.stdout


def test_bad_setting_is_refused_clearly() -> None:
    """A malformed environment value stops the relay with a message, not a traceback."""
    env = {**os.environ, "COMFYUI_URL": "ftp://nowhere"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 2
    assert "COMFYUI_URL must be an http(s) URL" in result.stderr
    assert "Traceback" not in result.stderr
    # A negative interval would make the collector's pass run without pause.
    for name in ("RELAY_GC_INTERVAL", "RELAY_SESSION_TTL"):
        env = {**os.environ, name: "-1"}
        result = subprocess.run(
            [sys.executable, "-m", "relay", "serve"], capture_output=True, text=True, env=env, check=False
        )
        assert result.returncode == 2, name
        assert "must not be negative" in result.stderr


async def test_serve_logs_steps_as_json_and_stops_on_sigterm(emulator: RunningEmulator) -> None:
    """A run through the relay process logs one JSON line per step in the [i/n] format; SIGTERM sends 1001."""
    port = free_port()
    env = {**os.environ, "COMFYUI_URL": emulator.url, "RELAY_PORT": str(port), "RELAY_LOG_FORMAT": "json",
           "RELAY_ETA_FILE": ""}  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    async with httpx.AsyncClient() as http:
                        if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                            break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        tab = await open_tab(f"ws://127.0.0.1:{port}/ws", "clientId=operator")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            response = await http.post("/prompt", json={"prompt": TEXT2IMG, "client_id": "operator"})
        prompt_id = response.json()["prompt_id"]
        await tab.wait_done(prompt_id, timeout=60)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await tab.closed.wait()
            _, stderr = await process.communicate()
        assert tab.close_code == CLOSE_GOING_AWAY
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    steps = [line for line in lines if line["event"].startswith("[")]
    assert [line["node"] for line in steps] == TEXT2IMG_ORDER
    assert steps[4]["event"].startswith(f"[5/7] {TEXT2IMG_NAMES['3']['ko']} (elapsed ")
    assert all(line["client_id"] == "operator" and line["prompt_id"] == prompt_id for line in steps)
    assert all({"timestamp", "level", "logger"} <= set(line) for line in lines)
    ended = next(line for line in lines if line["event"] == "prompt ended")
    assert (ended["status"], ended["recovered"]) == ("success", False)
    assert any(line["event"] == "relay stopped" for line in lines)
