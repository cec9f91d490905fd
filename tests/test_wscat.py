"""The real wscat (npm) against the relay and the emulator, as docs/wscat.md tells operators to use it."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.emulator import RunningEmulator
from relay.server import RunningRelay, run_relay
from tests.conftest import relay_config
from tests.relay_client import first_running

WSCAT = Path(__file__).parents[1] / "build" / "tools" / "node_modules" / ".bin" / "wscat"

pytestmark = pytest.mark.skipif(
    not WSCAT.exists(), reason="wscat is not installed (make tools: scripts/install-wscat.sh)"
)


class Wscat:
    """A wscat process with its stdin held open, as in a terminal; its output read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def connect(cls, url: str, *args: str) -> Wscat:
        process = await asyncio.create_subprocess_exec(
            str(WSCAT), "--no-color", "-c", url, *args,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        return cls(process)

    async def until(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        """Read until a JSON event matching ``predicate`` arrives."""
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise AssertionError(f"wscat ended; it printed: {self.lines}")
                line = raw.decode(errors="replace").strip()
                self.lines.append(line)
                event = as_event(line)
                if event is not None and predicate(event):
                    return event

    async def finish(self, timeout: float = 10) -> str:
        """wscat's remaining output once it exits by itself."""
        out, _ = await asyncio.wait_for(self.process.communicate(), timeout)
        return out.decode()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()

    def events(self) -> list[dict[str, Any]]:
        return [event for event in map(as_event, self.lines) if event is not None]


def as_event(line: str) -> dict[str, Any] | None:
    """A JSON text frame as wscat prints it; None for anything else (binary previews print as bytes)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


async def test_wscat_watches_a_run(relay: RunningRelay) -> None:
    """wscat on /ws?clientId= sees the hello, every relay.step of a run in order, and relay.done."""
    watcher = await Wscat.connect(f"{relay.ws_url}?clientId=ops")
    try:
        await watcher.until(lambda e: e["type"] == "relay.hello")
        async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
            response = await http.post("/workflows/text2img/prompt", json={"client_id": "ops"})
            assert response.status_code == 200, response.text
            prompt_id = response.json()["prompt_id"]
        done = await watcher.until(lambda e: e["type"] == "relay.done" and e["prompt_id"] == prompt_id)
        assert done["status"] == "success"
        steps = [e for e in watcher.events() if e["type"] == "relay.step" and e["prompt_id"] == prompt_id]
        running = [e["index"] for e in first_running(steps)]
        assert running == list(range(1, 8))
        assert [e for e in steps if e["state"] == "done"][-1]["percent"] == 100.0
        assert all(e["name"] for e in steps)
        last_seq = done["seq"]
        epoch = watcher.events()[0]["epoch"]
    finally:
        await watcher.stop()

    # Resuming from a seq replays what came after it, then waits for more.
    resumed = await Wscat.connect(f"{relay.ws_url}?clientId=ops&since={last_seq - 2}&epoch={epoch}")
    try:
        hello = await resumed.until(lambda e: e["type"] == "relay.hello")
        assert hello["resumed"] is True
        assert hello["missed"] >= 2  # the last two and whatever followed the end (queue updates)
        again = await resumed.until(lambda e: e["type"] == "relay.done")
        assert again["seq"] == last_seq
    finally:
        await resumed.stop()


async def test_wscat_raw_mode_shows_comfyui_frames(relay: RunningRelay) -> None:
    """With events=comfy wscat shows ComfyUI's own messages for the client, as ComfyUI would send them."""
    watcher = await Wscat.connect(f"{relay.ws_url}?clientId=raw&events=comfy")
    try:
        await watcher.until(lambda e: e["type"] == "status")
        async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
            response = await http.post("/workflows/text2img/prompt", json={"client_id": "raw"})
            prompt_id = response.json()["prompt_id"]
        await watcher.until(
            lambda e: e["type"] == "execution_success" and e["data"]["prompt_id"] == prompt_id
        )
        kinds = {e["type"] for e in watcher.events()}
        assert {"execution_start", "executing", "executed"} <= kinds
        assert not any(kind.startswith("relay.") for kind in kinds)
    finally:
        await watcher.stop()


async def test_wscat_with_a_token(emulator: RunningEmulator) -> None:
    """Against a relay with a token: told why and closed without it; served with -H or the subprotocol."""
    token = "wscat-token-0123456789abcdef"
    async with run_relay(relay_config(emulator, token=token)) as relay:
        refused = await Wscat.connect(f"{relay.ws_url}?clientId=t")
        # The relay closes the socket itself (4401, see test_access): wscat ends on its own.
        output = await refused.finish()
        error = as_event(output.strip().splitlines()[0])
        assert error is not None
        assert error["type"] == "relay.error"
        assert error["code"] == "unauthorized"
        for args in (
            ("-H", f"Authorization: Bearer {token}"),
            ("-s", "comfy-relay", "-s", f"comfy-relay.token.{token}"),
        ):
            served = await Wscat.connect(f"{relay.ws_url}?clientId=t", *args)
            try:
                hello = await served.until(lambda e: e["type"] == "relay.hello")
                assert hello["client_id"] == "t"
            finally:
                await served.stop()
