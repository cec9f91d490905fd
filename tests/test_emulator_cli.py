"""``comfy-relay emulator`` as a user runs it: a separate process, a plain client, a real graph."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources

import httpx
import pytest
import websockets
from PIL import Image

from relay.protocol import BinaryEvent, decode_binary_frame


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def standalone(tmp_path: os.PathLike[str]) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "relay", "emulator", "--port", str(port), "--speed", "10",
               "--output-dir", str(tmp_path), "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
            except OSError:
                if process.poll() is not None:
                    raise AssertionError(
                        process.stdout.read() if process.stdout else "emulator exited"
                    ) from None
                asyncio.run(asyncio.sleep(0.05))
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=10)
        assert process.returncode == 0, output
        assert f"ComfyUI emulator on http://127.0.0.1:{port}" in output


async def test_standalone_text_to_image_run(standalone: str) -> None:
    """A plain websockets client sees a believable KSampler run whose saved file /view serves."""
    graph = json.loads(resources.files("relay.emulator").joinpath("examples/text2img.json").read_text())
    async with websockets.connect(f"ws://{standalone}/ws?clientId=cli-test", max_size=None) as ws:
        first = json.loads(await ws.recv())
        assert first == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "cli-test"},
        }
        async with httpx.AsyncClient(base_url=f"http://{standalone}") as http:
            response = await http.post("/prompt", json={"prompt": graph, "client_id": "cli-test"})
            assert response.status_code == 200
            prompt_id = response.json()["prompt_id"]
            messages: list[dict[str, object]] = []
            previews = []
            async with asyncio.timeout(60):
                while True:
                    frame = await ws.recv()
                    if isinstance(frame, bytes):
                        previews.append(decode_binary_frame(frame))
                        continue
                    message = json.loads(frame)
                    messages.append(message)
                    if message["type"] == "executing" and message["data"] == {
                        "node": None,
                        "prompt_id": prompt_id,
                    }:
                        break
            types = [m["type"] for m in messages]
            executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
            assert executing == ["4", "5", "7", "6", "3", "8", "9", None]
            progress = [m["data"] for m in messages if m["type"] == "progress"]
            assert [(p["value"], p["max"], p["node"]) for p in progress] == [
                (i, 20, "3") for i in range(1, 21)
            ]
            assert len(previews) == 20
            assert all(p.event is BinaryEvent.PREVIEW_IMAGE and p.mime == "image/jpeg" for p in previews)
            with Image.open(io.BytesIO(previews[-1].image)) as picture:
                assert picture.size == (512, 512)
            assert types[-3:] == ["execution_success", "status", "executing"]
            saved = next(m["data"] for m in messages if m["type"] == "executed")
            image = saved["output"]["images"][0]
            view = await http.get("/view", params={"filename": image["filename"], "type": "output"})
            assert view.status_code == 200
            with Image.open(io.BytesIO(view.content)) as picture:
                assert (picture.format, picture.size) == ("PNG", (1024, 1024))
                assert json.loads(picture.info["prompt"]) == graph
