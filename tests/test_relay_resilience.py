"""The relay under stress: shared upstreams, isolation, lost connections, resume, slow readers."""

from __future__ import annotations

import asyncio

import httpx

from relay.emulator import EmulatorConfig, RunningEmulator, run_emulator
from relay.emulator.config import ComfyVersion
from relay.emulator.sockets import SocketHub
from relay.errors import CLOSE_GOING_AWAY
from relay.server import RunningRelay, run_relay
from tests.conftest import relay_config
from tests.relay_client import Tab, open_tab
from tests.test_relay_events import TEXT2IMG, stream, submit
from tests.tracekit import load_trace


def open_sockets(hub: SocketHub, client_id: str) -> list[str]:
    """The routing ids of a client's sockets open at ComfyUI (relay.routing)."""
    return [c.sid for c in hub.live() if c.sid.startswith(client_id + ".")]


def registered(hub: SocketHub, client_id: str) -> bool:
    return any(sid.startswith(client_id + ".") for sid in hub.sockets)


def window(tab: Tab, prompt_id: str) -> list[dict[str, object]]:
    """The stream from a prompt's relay.queued to its relay.done."""
    events = stream(tab)
    first = next(e["seq"] for e in events if e["type"] == "relay.queued" and e["prompt_id"] == prompt_id)
    last = next(e["seq"] for e in events if e["type"] == "relay.done" and e["prompt_id"] == prompt_id)
    return [e for e in events if first <= e["seq"] <= last]


def long_graph(steps: int = 40, delay: float = 0.2) -> dict[str, object]:
    graph = load_trace("04").workflow()
    graph["2"]["inputs"].update(steps=steps, delay=delay)
    return graph


async def test_tabs_share_one_upstream(
    relay: RunningRelay, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """Three tabs of one client: one socket at ComfyUI, the same events in each, closing one deafens none."""
    tabs = [await open_tab(relay.ws_url, "clientId=shared") for _ in range(3)]
    prompt_id = await submit(relay_http, load_trace("02").workflow(), "shared")
    for tab in tabs:
        await tab.wait_done(prompt_id)
    hub = emulator.state.hub
    assert len(open_sockets(hub, "shared")) == 1
    assert registered(hub, "shared")
    first = window(tabs[0], prompt_id)
    assert first[0]["type"] == "relay.queued"
    assert first[-1]["type"] == "relay.done"
    for tab in tabs[1:]:
        assert window(tab, prompt_id) == first  # identical payloads, seqs included
    await tabs[0].close()
    second = await submit(relay_http, load_trace("01").workflow(), "shared")
    for tab in tabs[1:]:
        assert (await tab.wait_done(second))["status"] == "success"
    assert len(open_sockets(hub, "shared")) == 1
    for tab in tabs[1:]:
        await tab.close()


async def test_no_events_cross_clients(
    relay: RunningRelay, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """One client's prompt, and another's submitted straight to ComfyUI, never reach a second client."""
    alice = await open_tab(relay.ws_url, "clientId=alice")
    bob = await open_tab(relay.ws_url, "clientId=bob")
    bob_raw = await open_tab(relay.ws_url, "clientId=bob&events=comfy")
    await bob.wait_type("relay.upstream", timeout=5)
    prompt_id = await submit(relay_http, load_trace("02c").workflow(), "alice")
    await alice.wait_done(prompt_id)
    # A client-less prompt straight to ComfyUI: its progress and previews go to every socket there.
    async with httpx.AsyncClient(base_url=emulator.url) as comfy:
        response = await comfy.post("/prompt", json={"prompt": load_trace("09").workflow()})
        foreign = response.json()["prompt_id"]
        async with asyncio.timeout(20):
            while not (await comfy.get(f"/history/{foreign}")).json():
                await asyncio.sleep(0.02)  # polling ComfyUI until the foreign prompt ended
    # Each client's own next prompt runs after the foreign one (ComfyUI's queue is in order), and
    # its frames come on that client's socket after any of the foreign one's: once both are done,
    # no frame of the foreign prompt can still be on its way.
    after_alice = await submit(relay_http, load_trace("01").workflow(), "alice")
    after_bob = await submit(relay_http, load_trace("01").workflow(), "bob")
    await alice.wait_done(after_alice)
    await bob.wait_done(after_bob)
    await bob_raw.wait_raw(lambda f: isinstance(f, str) and "execution_success" in f and after_bob in f)
    assert {e.get("prompt_id") for e in bob.events} <= {None, after_bob}
    assert {e.get("prompt_id") for e in alice.events} <= {None, prompt_id, after_alice}
    # Bob's own prompt has no previews: any binary frame, or any other prompt's id, is a leak.
    leaked = [f for f in bob_raw.raw if isinstance(f, bytes) or ('"prompt_id"' in f and after_bob not in f)]
    assert leaked == []
    assert foreign not in {e.get("prompt_id") for e in alice.events + bob.events}
    for tab in (alice, bob, bob_raw):
        await tab.close()


async def test_comfyui_restart_mid_run_ends_every_prompt(comfyui_version: ComfyVersion) -> None:
    """ComfyUI restarts with two prompts in flight: the relay reconnects and reports both as lost."""
    async with (
        run_emulator(EmulatorConfig(port=0, speed=5, comfyui_version=comfyui_version)) as emulator,
        run_relay(relay_config(emulator)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        tab = await open_tab(relay.ws_url, "clientId=restart")
        running = await submit(http, long_graph(), "restart")
        waiting = await submit(http, long_graph(), "restart")
        await tab.wait_type("relay.progress", running)
        await emulator.restart()
        for prompt_id in (running, waiting):
            done = await tab.wait_done(prompt_id)
            assert (done["status"], done["recovered"]) == ("error", True)
            assert done["error"]["exception_type"] == "PromptLost"
        states = [e["state"] for e in tab.of("relay.upstream")]
        assert states[-3:] == ["down", "connecting", "connected"]
        # The relay keeps working against the new process.
        after = await submit(http, load_trace("01").workflow(), "restart")
        assert (await tab.wait_done(after))["status"] == "success"
        await tab.close()


async def test_dropped_socket_recovers_finished_and_running_prompts(comfyui_version: ComfyVersion) -> None:
    """The socket drops while ComfyUI keeps working: a prompt that ended meanwhile is recovered from
    history, the one still running continues live."""
    async with run_emulator(EmulatorConfig(port=0, speed=5, comfyui_version=comfyui_version)) as emulator:
        config = relay_config(emulator, reconnect_initial=1.0, reconnect_max=1.0, reconnect_jitter=0.0)
        async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
            tab = await open_tab(relay.ws_url, "clientId=drop")
            short = await submit(http, long_graph(steps=10, delay=0.2), "drop")  # about 0.4 s at x5
            long = await submit(http, long_graph(steps=60, delay=0.2), "drop")
            await tab.wait_type("relay.progress", short)
            await emulator.drop_sockets()
            short_done = await tab.wait_done(short)
            assert (short_done["status"], short_done["recovered"]) == ("success", True)
            long_done = await tab.wait_done(long)
            assert (long_done["status"], long_done["recovered"]) == ("success", False)
            # Progress of the long prompt went on after the reconnect.
            reconnected = max(e["seq"] for e in tab.of("relay.upstream") if e["state"] == "connected")
            assert [e for e in tab.of("relay.progress", long) if e["seq"] > reconnected]
            # How the short one's end was read: the jobs API where ComfyUI has it, else history.
            asked = {path for method, path, _, _ in emulator.state.requests if method == "GET"}
            assert (f"/api/jobs/{short}" in asked) is (comfyui_version == "current")
            assert (f"/history/{short}" in asked) is (comfyui_version == "0.3.64")
            await tab.close()


async def test_resume_with_since(relay: RunningRelay, relay_http: httpx.AsyncClient) -> None:
    """A tab that reconnects with ?since= gets exactly the events it missed, in order."""
    watcher = await open_tab(relay.ws_url, "clientId=resume")
    leaver = await open_tab(relay.ws_url, "clientId=resume")
    prompt_id = await submit(relay_http, TEXT2IMG, "resume")
    await leaver.wait_type("relay.progress", prompt_id, count=3)
    await leaver.close()
    last_seen = stream(leaver)[-1]["seq"]
    await watcher.wait_type("relay.progress", prompt_id, count=12)
    back = await open_tab(relay.ws_url, f"clientId=resume&since={last_seen}")
    await back.wait_done(prompt_id)
    await watcher.wait_done(prompt_id)
    hello = back.events[0]
    assert (hello["type"], hello["resumed"]) == ("relay.hello", True)
    assert hello["missed"] > 0
    # Together, before and after the gap, exactly what a tab that never left saw: no hole, no repeat.
    joined = stream(leaver) + stream(back)
    seqs = [e["seq"] for e in joined]
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    assert joined == [e for e in stream(watcher) if seqs[0] <= e["seq"] <= seqs[-1]]
    await watcher.close()
    await back.close()


async def test_resume_larger_than_the_subscriber_queue(emulator: RunningEmulator) -> None:
    """A resume that replays more events than a tab's live queue holds gets them all: the
    replay is what the tab asked for, not a sign that it is too slow (found by tests/faults:
    such a tab was closed with 1013 at once, and again on every retry)."""
    async with (
        run_relay(relay_config(emulator, subscriber_queue=8)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        watcher = await open_tab(relay.ws_url, "clientId=big-resume")
        leaver = await open_tab(relay.ws_url, "clientId=big-resume")
        hello = await leaver.wait_type("relay.hello")
        await leaver.close()
        prompt_id = await submit(http, TEXT2IMG, "big-resume")
        await watcher.wait_done(prompt_id)
        back = await open_tab(
            relay.ws_url, f"clientId=big-resume&since={hello['seq']}&epoch={hello['epoch']}"
        )
        await back.wait_done(prompt_id)
        assert back.events[0]["resumed"] is True
        assert back.events[0]["missed"] > 8
        assert stream(back) == stream(watcher)
        assert not back.closed.is_set()
        await watcher.close()
        await back.close()


async def test_restarted_relay_follows_prompts_comfyui_still_has(comfyui_version: ComfyVersion) -> None:
    """Without Redis a restarted relay remembers nothing, but ComfyUI's queue names each
    prompt's client: the client's first socket after the restart gets them announced, marked
    detached, and ended from ComfyUI's history, once each (found by tests/faults)."""
    async with run_emulator(EmulatorConfig(port=0, speed=5, comfyui_version=comfyui_version)) as emulator:
        async with (
            run_relay(relay_config(emulator)) as before,
            httpx.AsyncClient(base_url=before.url) as http,
        ):
            tab = await open_tab(before.ws_url, "clientId=orphans")
            hello = await tab.wait_type("relay.hello")
            running = await submit(http, long_graph(steps=60), "orphans")
            waiting = await submit(http, long_graph(steps=60), "orphans")
            await tab.wait_type("relay.progress", running)
            await tab.close()
        async with run_relay(relay_config(emulator)) as after:
            back = await open_tab(
                after.ws_url, f"clientId=orphans&since={hello['seq']}&epoch={hello['epoch']}"
            )
            for prompt_id in (running, waiting):
                done = await back.wait_done(prompt_id, timeout=60)
                assert (done["status"], done["recovered"]) == ("success", True)
                assert len(back.of("relay.queued", prompt_id)) == 1
                assert len(back.of("relay.detached", prompt_id)) == 1
                assert len(back.of("relay.done", prompt_id)) == 1
            assert back.events[0]["resumed"] is False
            await back.close()


async def test_resume_gap_sends_snapshots(emulator: RunningEmulator) -> None:
    """When the buffer no longer covers the gap, the relay says so and sends each active prompt's state."""
    async with (
        run_relay(relay_config(emulator, ring_size=4)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        watcher = await open_tab(relay.ws_url, "clientId=gap")
        prompt_id = await submit(http, long_graph(steps=30, delay=0.2), "gap")
        await watcher.wait_type("relay.progress", prompt_id, count=10)
        late = await open_tab(relay.ws_url, "clientId=gap&since=1")
        snapshot = await late.wait_type("relay.snapshot", prompt_id)
        hello = late.events[0]
        assert (hello["type"], hello["resumed"], hello["missed"]) == ("relay.hello", False, None)
        assert snapshot["phase"] == "running"
        assert snapshot["current"] == "2"
        assert 0 < snapshot["percent"] < 100
        assert [s["state"] for s in snapshot["steps"]] == ["done", "running", "pending"]
        await late.wait_done(prompt_id)
        # A stale epoch (a restarted relay) is not resumed either.
        other = await open_tab(
            relay.ws_url, f"clientId=gap&since={stream(watcher)[-1]['seq']}&epoch=deadbeef"
        )
        assert (await other.wait_type("relay.hello"))["resumed"] is False
        for tab in (watcher, late, other):
            await tab.close()


async def test_slow_subscriber_does_not_hold_back_others(emulator: RunningEmulator) -> None:
    """A tab that stops reading fills only its own queue and is closed; the other tab gets everything."""
    async with (
        run_relay(relay_config(emulator, subscriber_queue=16)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        fast = await open_tab(relay.ws_url, "clientId=slowfast")
        # Never reads and buffers almost nothing itself: TCP backpressure reaches the relay.
        slow = await open_tab(
            relay.ws_url, "clientId=slowfast&events=all", read=False, max_queue=1, close_timeout=0.5
        )
        graph = load_trace("14").workflow()
        graph["1"]["inputs"].update(width=2048, height=2048)  # about 12 MB of noise per frame
        prompt_ids = []
        for i in range(3):
            graph["1"]["inputs"]["color"] = i  # nothing cached: every run sends its frame
            prompt_ids.append(await submit(http, graph, "slowfast"))
        for prompt_id in prompt_ids:
            assert (await fast.wait_done(prompt_id, timeout=60))["status"] == "success"
        session = relay.state.sessions.find("slowfast")
        assert session is not None
        async with asyncio.timeout(20):
            while any(s.mode == "all" and not s.closed for s in session.channel.subscribers):
                await asyncio.sleep(0.05)
        assert [e["status"] for e in fast.of("relay.done")] == ["success"] * 3
        await slow.connection.close()
        await fast.close()


async def test_upstream_opens_on_demand_and_closes_after_grace(
    relay: RunningRelay, emulator: RunningEmulator
) -> None:
    """No tab and no prompt: no socket at ComfyUI; a tab opens one; it closes after the grace period."""
    assert not registered(emulator.state.hub, "lazy")
    tab = await open_tab(relay.ws_url, "clientId=lazy")
    await tab.wait_for(lambda e: e["type"] == "relay.upstream" and e["state"] == "connected")
    assert registered(emulator.state.hub, "lazy")
    await tab.close()
    async with asyncio.timeout(10):
        while registered(emulator.state.hub, "lazy"):
            await asyncio.sleep(0.05)


async def test_comfyui_down_gives_502(emulator: RunningEmulator) -> None:
    """POST /prompt while ComfyUI is unreachable answers 502 with a JSON error, and the relay keeps going."""
    async with run_relay(relay_config(emulator, upstream_connect_timeout=0.5)) as relay:
        await emulator.stop()
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
            response = await http.post(
                "/prompt", json={"prompt": load_trace("01").workflow(), "client_id": "down"}
            )
            assert response.status_code == 502
            assert response.json()["error"]["type"] == "upstream_unavailable"
            await emulator.start()
            await asyncio.sleep(1.0)
            response = await http.post(
                "/prompt", json={"prompt": load_trace("01").workflow(), "client_id": "down"}
            )
            assert response.status_code == 200


async def test_shutdown_closes_clients_with_1001_and_leaves_no_task(emulator: RunningEmulator) -> None:
    """Stopping the relay closes browser sockets with 1001 and upstream sockets cleanly; no task remains."""
    before = asyncio.all_tasks()
    relay_cm = run_relay(relay_config(emulator))
    relay = await relay_cm.__aenter__()
    tabs = [await open_tab(relay.ws_url, f"clientId=bye{i}") for i in range(3)]
    for tab in tabs:
        await tab.wait_for(lambda e: e["type"] == "relay.upstream" and e["state"] == "connected")
    await relay_cm.__aexit__(None, None, None)
    for tab in tabs:
        async with asyncio.timeout(5):
            await tab.closed.wait()
        assert tab.close_code == CLOSE_GOING_AWAY
    async with asyncio.timeout(5):
        while any(registered(emulator.state.hub, f"bye{i}") for i in range(3)):
            await asyncio.sleep(0.02)
    leftover = [
        t for t in asyncio.all_tasks() - before if not t.done() and "reader" not in repr(t.get_coro())
    ]
    assert leftover == [t for t in leftover if t is asyncio.current_task()]
