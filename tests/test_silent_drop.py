"""The relay's socket to ComfyUI drops silently while ComfyUI keeps its end open for a while.

ComfyUI sends no heartbeats, so it notices a dead socket late; when it does, its cleanup
unregisters whatever socket holds that clientId by then (PROTOCOL.md §2). A relay that has
reconnected under the same id is left open but deaf. Here the relay's end of the connection is
reset while the emulator keeps its end for 1, 3 or 8 seconds; prompts submitted before, during
and after the drop must each end with their true result on every tab.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import httpx
import pytest

from relay.emulator import EmulatorConfig, run_emulator
from relay.emulator.config import ComfyVersion
from relay.server import run_relay
from tests.conftest import relay_config
from tests.netcut import forwarder
from tests.relay_client import Tab, first_running, open_tab
from tests.test_relay_events import stream

pytestmark = pytest.mark.slow

CLIENT = "blip"
TABS = 2


async def submit_workflow(http: httpx.AsyncClient, seed: int) -> str:
    answer = await http.post(
        "/workflows/portrait_mode/prompt", json={"client_id": CLIENT, "params": {"seed": seed}}
    )
    assert answer.status_code == 200, answer.text
    prompt_id: str = answer.json()["prompt_id"]
    return prompt_id


def assert_whole_stream(tab: Tab, prompt_ids: list[str]) -> None:
    """No hole, no repeat: seq runs without a gap, and each prompt's events are each told once."""
    events = stream(tab)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    for prompt_id in prompt_ids:
        mine = [e for e in events if e.get("prompt_id") == prompt_id]
        assert [e["type"] for e in mine].count("relay.done") == 1
        assert mine[0]["type"] == "relay.queued"
        assert mine[-1]["type"] == "relay.done"
        # A running step may be announced again when its activity changes (current ComfyUI):
        # that is news, not a repeat; its start and its end are each told once.
        told = [e for e in mine if e["type"] == "relay.step"]
        activity = [(e["node"], e.get("activity")) for e in told if e["state"] == "running"]
        assert all(a != b for a, b in itertools.pairwise(activity)), activity
        steps = [(e["node"], e["state"]) for e in told if e["state"] != "running"]
        steps += [(e["node"], "running") for e in first_running(told)]
        assert len(steps) == len(set(steps)), f"a step was told twice: {steps}"


def assert_live_run(tab: Tab, prompt_id: str) -> None:
    """The prompt was followed live: each step not served from cache began and ended, in order."""
    events = [e for e in stream(tab) if e.get("prompt_id") == prompt_id]
    done = events[-1]
    assert done["recovered"] is False, done
    cached = len(next(e for e in events if e["type"] == "relay.started")["cached"])
    steps = [e for e in events if e["type"] == "relay.step"]
    assert [e["index"] for e in first_running(steps)] == list(range(cached + 1, done["total"] + 1))
    assert len([e for e in steps if e["state"] == "done"]) == done["total"] - cached


@pytest.mark.parametrize("hold", [1.0, 3.0, 8.0])
async def test_silent_drop_ends_every_prompt_with_its_true_result(
    hold: float, comfyui_version: ComfyVersion
) -> None:
    """Prompts submitted before, during and after a silent drop all end, live where they can be, on
    every tab, with no hole and no repeat; ComfyUI never holds two open sockets under one clientId."""
    async with (
        run_emulator(EmulatorConfig(port=0, speed=4, comfyui_version=comfyui_version)) as emulator,
        forwarder(emulator.port) as net,
        run_relay(relay_config(emulator, comfyui_url=net.url)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        hub = emulator.state.hub
        tabs = [await open_tab(relay.ws_url, f"clientId={CLIENT}") for _ in range(TABS)]
        await tabs[0].wait_for(lambda e: e["type"] == "relay.upstream" and e["state"] == "connected")

        before = await submit_workflow(http, seed=1)
        await tabs[0].wait_for(lambda e: e.get("prompt_id") == before and e.get("index") == 3)
        stale = set(hub.live())
        assert net.cut(hold=hold, websockets_only=True) == 1
        during = await submit_workflow(http, seed=2)
        # The emulator notices the dead socket only now, and cleans up after it as ComfyUI does.
        async with asyncio.timeout(hold + 30):
            await hub.until(lambda: not stale & set(hub.live()))
        after = await submit_workflow(http, seed=3)

        ends: dict[str, Any] = {}
        for tab in tabs:
            for prompt_id in (before, during, after):
                ends[prompt_id] = await tab.wait_done(prompt_id, timeout=60)
        assert {prompt_id: end["status"] for prompt_id, end in ends.items()} == dict.fromkeys(
            (before, during, after), "success"
        )
        overlaps = list(hub.overlaps)
        assert [stream(tab) for tab in tabs[1:]] == [stream(tabs[0])] * (TABS - 1)
        assert_whole_stream(tabs[0], [before, during, after])
        # Submitted once the stale socket was gone: followed live, step by step.
        assert_live_run(tabs[0], after)
        async with httpx.AsyncClient(base_url=emulator.url) as comfy:
            history = (await comfy.get("/history")).json()
        for prompt_id in (before, during, after):
            assert ends[prompt_id]["outputs"] == history[prompt_id]["outputs"]
        for tab in tabs:
            await tab.close()
        assert overlaps == []


async def test_a_blackholed_socket_is_found_out_before_a_prompt_is_sent_on_it(
    comfyui_version: ComfyVersion,
) -> None:
    """Nothing gets through any more but neither end knows: the next POST /prompt finds the socket
    dead (no answer to a ping), opens a new one under a new routing id and is followed live."""
    async with (
        run_emulator(EmulatorConfig(port=0, speed=4, comfyui_version=comfyui_version)) as emulator,
        forwarder(emulator.port) as net,
        run_relay(relay_config(emulator, comfyui_url=net.url, upstream_check_timeout=1.0)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        tab = await open_tab(relay.ws_url, f"clientId={CLIENT}")
        await tab.wait_for(lambda e: e["type"] == "relay.upstream" and e["state"] == "connected")
        before = await submit_workflow(http, seed=4)
        await tab.wait_for(lambda e: e.get("prompt_id") == before and e.get("index") == 3)
        assert net.cut(hold=20, blackhole=True, websockets_only=True) == 1
        during = await submit_workflow(http, seed=5)
        assert (await tab.wait_type("relay.detached", before))["prompt_id"] == before
        ends = {prompt_id: await tab.wait_done(prompt_id, timeout=60) for prompt_id in (before, during)}
        assert [ends[before]["status"], ends[before]["recovered"]] == ["success", True]
        assert_live_run(tab, during)
        assert_whole_stream(tab, [before, during])
        assert emulator.state.hub.overlaps == []
        await tab.close()
