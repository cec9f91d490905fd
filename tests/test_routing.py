"""Routing ids: under which clientId the relay's ComfyUI sockets register, and what clients see."""

from __future__ import annotations

import asyncio

import httpx

from relay.emulator import RunningEmulator
from relay.routing import CLIENT_KEY, restore_client_ids, routed_prompt, routing_id
from relay.server import RunningRelay
from relay.sessions import ClientSession
from tests.relay_client import Tab, open_tab
from tests.test_relay_events import TEXT2IMG, stream, submit
from tests.test_relay_resilience import long_graph


def test_routing_ids_are_new_each_time_and_name_their_client() -> None:
    """Each routing id is the client's id, a dot and a random part, and never the same twice."""
    ids = {routing_id("alice") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(sid.startswith("alice.") and len(sid) > len("alice.") for sid in ids)


def test_a_routed_prompt_keeps_the_client_id_beside_the_routing_id() -> None:
    """ComfyUI gets the routing id as client_id; the client's own id and its extra_data stay with it."""
    body = {"prompt": {}, "client_id": "alice", "extra_data": {"workflow": "text2img"}}
    routed = routed_prompt(body, "alice", "alice.00ff")
    assert routed["client_id"] == "alice.00ff"
    assert routed["extra_data"] == {"workflow": "text2img", CLIENT_KEY: "alice"}
    assert body["extra_data"] == {"workflow": "text2img"}  # the caller's body is not changed


def test_answers_get_the_client_ids_back_and_foreign_prompts_are_left_alone() -> None:
    """/queue and /history items routed by the relay show the client's id; others stay as they are."""
    ours = [3, "p1", {}, {"client_id": "alice.00ff", CLIENT_KEY: "alice"}, ["9"]]
    theirs = [4, "p2", {}, {"client_id": "bob.frontend"}, ["9"]]
    queue = restore_client_ids({"queue_running": [ours], "queue_pending": [theirs]}, shape="queue")
    assert queue["queue_running"][0][3] == {"client_id": "alice"}
    assert queue["queue_pending"][0][3] == {"client_id": "bob.frontend"}
    history = restore_client_ids(
        {"p1": {"prompt": [3, "p1", {}, {"client_id": "alice.00ff", CLIENT_KEY: "alice"}, []]}},
        shape="history",
    )
    assert history["p1"]["prompt"][3] == {"client_id": "alice"}
    # Whatever else ComfyUI may answer passes untouched.
    assert restore_client_ids({"p1": "odd"}, shape="history") == {"p1": "odd"}
    assert restore_client_ids([], shape="queue") == []


async def test_queue_and_history_through_the_relay_show_the_clients_own_id(
    relay: RunningRelay, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """A running and a waiting prompt in /queue, and the finished ones in /history, carry the id their
    client used; ComfyUI itself holds the routing id of the relay's socket."""
    tab = await open_tab(relay.ws_url, "clientId=carol")
    first = await submit(relay_http, long_graph(steps=20, delay=0.1), "carol")
    await tab.wait_for(lambda e: e["type"] == "relay.progress" and e["prompt_id"] == first)
    second = await submit(relay_http, TEXT2IMG, "carol")
    queue = (await relay_http.get("/queue")).json()
    assert [(item[1], item[3]["client_id"]) for item in queue["queue_running"] + queue["queue_pending"]] == [
        (first, "carol"),
        (second, "carol"),
    ]
    await relay_http.post("/interrupt", json={"prompt_id": first})
    await tab.wait_done(second)
    for path in ("/history", f"/history/{second}", "/api/history?max_items=5"):
        entries = (await relay_http.get(path)).json()
        assert {entries[p]["prompt"][3]["client_id"] for p in entries} == {"carol"}, path
    async with httpx.AsyncClient(base_url=emulator.url) as comfy:
        raw = (await comfy.get(f"/history/{second}")).json()[second]["prompt"][3]
    session = relay.state.sessions.find("carol")
    assert session is not None
    assert raw["client_id"] == session.upstream.sid
    assert raw[CLIENT_KEY] == "carol"
    await tab.close()


async def sampling(
    relay: RunningRelay, http: httpx.AsyncClient, client_id: str, steps: int
) -> tuple[Tab, str, ClientSession]:
    """A tab of ``client_id`` and a long prompt of its, once the prompt's sampler is under way."""
    tab = await open_tab(relay.ws_url, f"clientId={client_id}")
    prompt_id = await submit(http, long_graph(steps=steps, delay=0.2), client_id)
    await tab.wait_for(lambda e: e["type"] == "relay.progress" and e["prompt_id"] == prompt_id)
    session = relay.state.sessions.find(client_id)
    assert session is not None
    return tab, prompt_id, session


async def test_a_clean_drop_keeps_the_routing_id_and_the_run_live(
    relay: RunningRelay, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """ComfyUI closes the socket with a close frame: the relay reconnects under the same routing id,
    so the running prompt goes on step by step, nothing is detached, and no two sockets overlap."""
    tab, prompt_id, session = await sampling(relay, relay_http, "dora", steps=30)
    sid = session.upstream.sid
    await emulator.drop_sockets()
    await tab.wait_for(lambda e: e["type"] == "relay.upstream" and e["state"] == "down")
    reconnected = await tab.wait_for(
        lambda e: e["type"] == "relay.upstream" and e["state"] == "connected", count=2
    )
    progress_after = await tab.wait_for(
        lambda e: (
            e["type"] == "relay.progress" and e["seq"] > reconnected["seq"] and e["prompt_id"] == prompt_id
        )
    )
    assert progress_after["value"] > 1
    done = await tab.wait_done(prompt_id, timeout=30)
    assert (done["status"], done["recovered"]) == ("success", False)
    assert session.upstream.sid == sid
    assert [e for e in stream(tab) if e["type"] == "relay.detached"] == []
    assert emulator.state.hub.overlaps == []
    await tab.close()


async def test_a_lost_socket_takes_a_new_routing_id_and_detaches_the_running_prompt(
    relay: RunningRelay, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """The relay gives up a socket without a closing handshake: the next one registers under a new
    routing id, the running prompt is announced detached and still ends with its true result."""
    tab, prompt_id, session = await sampling(relay, relay_http, "eve", steps=10)
    sid = session.upstream.sid
    socket = session.upstream._socket
    assert socket is not None
    socket.transport.abort()  # as a reset on the way would: no close frame either way
    detached = await tab.wait_type("relay.detached", prompt_id)
    assert "without a clean close" in detached["reason"]
    assert session.upstream.sid not in (sid, None)
    done = await tab.wait_done(prompt_id, timeout=30)
    assert (done["status"], done["recovered"]) == ("success", True)
    async with httpx.AsyncClient(base_url=emulator.url) as comfy:
        entry = (await comfy.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert done["outputs"] == entry["outputs"]
    # The next prompt goes out under the new routing id and is followed live again.
    after = await submit(relay_http, TEXT2IMG, "eve")
    assert (await tab.wait_done(after))["recovered"] is False
    async with asyncio.timeout(10):
        await emulator.state.hub.until(lambda: all(c.sid != sid for c in emulator.state.hub.live()))
    assert emulator.state.hub.overlaps == []
    await tab.close()
