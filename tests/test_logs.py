"""JSON logs from a real `comfy-relay serve` process: every line parses, uvicorn's included, with context."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import websockets

from relay.emulator import RunningEmulator
from tests.relay_client import open_tab
from tests.test_emulator_cli import free_port

TOKEN = "log-test-token-0123456789abcdef"


async def until_ready(http: httpx.AsyncClient, process: asyncio.subprocess.Process) -> None:
    """Wait for a relay process to answer /readyz with 200."""
    async with asyncio.timeout(30):
        while True:
            assert process.returncode is None, "the relay stopped"
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


async def test_json_logs_parse_line_by_line_with_context(emulator: RunningEmulator) -> None:
    """RELAY_LOG_FORMAT=json: an object per line, uvicorn's records too, with ids bound and no token."""
    port = free_port()
    env = {**os.environ, "RELAY_LOG_FORMAT": "json", "RELAY_TOKEN": TOKEN, "RELAY_ETA_FILE": ""}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--comfyui-url", emulator.url, "--port", str(port),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            await until_ready(http, process)
            tab = await open_tab(f"ws://127.0.0.1:{port}/ws", f"clientId=logs&token={TOKEN}")
            await tab.wait_type("relay.hello")
            response = await http.post(
                "/workflows/text2img/prompt",
                params={"token": TOKEN},
                json={"client_id": "logs", "params": {}},
                headers={"X-Request-ID": "req-logs-1"},
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == "req-logs-1"
            prompt_id = response.json()["prompt_id"]
            assert (await tab.wait_done(prompt_id))["status"] == "success"
            generated = await http.get("/queue")  # no token: refused, with an id the relay made up
            assert generated.status_code == 401
            assert len(generated.headers["x-request-id"]) == 32
            await tab.close()
            # A text frame that is not UTF-8: closed with 1007, logged as one line, no traceback.
            bad = await websockets.connect(f"ws://127.0.0.1:{port}/ws?clientId=logs&token={TOKEN}")
            await bad.recv()
            await bad.send(b"\xff\xfe not text", text=True)
            with contextlib.suppress(websockets.ConnectionClosed):
                await bad.recv()
            assert bad.close_code == 1007
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    text = stderr.decode()
    assert TOKEN not in text
    lines: list[dict[str, Any]] = []
    for raw in text.splitlines():
        record = json.loads(raw)  # every line, or the test fails here
        assert isinstance(record, dict)
        assert {"event", "level", "timestamp", "logger"} <= set(record), record
        lines.append(record)

    def find(**fields: Any) -> list[dict[str, Any]]:
        return [line for line in lines if all(line.get(k) == v for k, v in fields.items())]

    # uvicorn's own records went through the same pipeline.
    uvicorn_lines = [line for line in lines if line["logger"].startswith("uvicorn")]
    assert any("Uvicorn running on" in line["event"] for line in uvicorn_lines)
    assert any("Shutting down" in line["event"] for line in uvicorn_lines)
    assert find(event="relay started")
    assert find(event="relay stopped")

    connected = find(event="client connected", client_id="logs")
    assert connected
    assert connected[0]["request_id"]
    steps = [line for line in lines if line["event"].startswith("[") and line.get("prompt_id") == prompt_id]
    assert len(steps) == 7, [line["event"] for line in steps]
    assert all(line["client_id"] == "logs" for line in steps)
    assert find(event="prompt ended", prompt_id=prompt_id, status="success", client_id="logs")

    submitted = find(event="request", request_id="req-logs-1")
    assert len(submitted) == 1
    assert submitted[0]["route"] == "/workflows/{name}/prompt"
    assert submitted[0]["status"] == 200
    assert submitted[0]["path"] == "/workflows/text2img/prompt"
    refusal = find(event="refused", reason="unauthorized", path="/queue")
    assert refusal
    assert refusal[0]["request_id"] == generated.headers["x-request-id"]
    invalid = [line for line in lines if "Invalid UTF-8" in line["event"]]
    assert len(invalid) == 1, invalid
    assert invalid[0]["level"] == "warning", invalid
    assert "exception" not in invalid[0]
    assert "Traceback" not in text
    # Probes are logged at debug level only: the default info level leaves them out.
    assert not find(event="request", path="/readyz")
