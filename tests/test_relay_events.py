"""The relay end to end: real relay, real emulator, real WebSocket clients.

Step events of a text-to-image run, cached and partly cached re-runs, failures and
interrupts, bad input, and ComfyUI's own frames passed through for clients written for it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.emulator import RunningEmulator
from relay.protocol import BinaryEvent, decode_binary_frame
from relay.server import RunningRelay
from tests.relay_client import Tab, open_tab
from tests.tracekit import load_trace, long_graph

TEXT2IMG = json.loads(resources.files("relay.emulator").joinpath("examples/text2img.json").read_text())
# What ComfyUI runs, in order, for the text-to-image graph: loaders, encoders, sampler, decode, save.
TEXT2IMG_ORDER = ["4", "5", "7", "6", "3", "8", "9"]
# The example graph has the nodes of workflows/text2img.json, so the relay names its steps from there.
TEXT2IMG_NAMES = json.loads((Path(__file__).parents[1] / "workflows" / "text2img.json").read_text())["steps"]


async def submit(http: httpx.AsyncClient, graph: dict[str, Any], client_id: str, **extra: Any) -> str:
    response = await http.post("/prompt", json={"prompt": graph, "client_id": client_id, **extra})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["client_id"] == client_id
    prompt_id: str = body["prompt_id"]
    return prompt_id


def stream(tab: Tab) -> list[dict[str, Any]]:
    """Events that are part of the sequenced stream (hello and errors are per connection)."""
    return [e for e in tab.events if e["type"] not in ("relay.hello", "relay.error", "relay.snapshot")]


async def test_text_to_image_run(relay: RunningRelay, relay_http: httpx.AsyncClient) -> None:
    """A text-to-image run gives queued, started, numbered steps, progress with percent, previews and done."""
    tab = await open_tab(relay.ws_url, "clientId=alice")
    hello = await tab.wait_type("relay.hello")
    assert (hello["client_id"], hello["resumed"], hello["assigned"]) == ("alice", False, False)
    assert hello["upstream"] in ("connecting", "connected", "down")
    prompt_id = await submit(relay_http, TEXT2IMG, "alice")
    done = await tab.wait_done(prompt_id)

    queued = tab.of("relay.queued", prompt_id)[0]
    assert queued["total"] == 7
    assert [s["node"] for s in queued["steps"]] == TEXT2IMG_ORDER
    assert queued["workflow"] == "text2img"
    assert queued["steps"][4] == {"node": "3", "class_type": "KSampler", "name": TEXT2IMG_NAMES["3"]["ko"]}
    started = tab.of("relay.started", prompt_id)[0]
    assert (started["total"], started["cached"], started["completed"]) == (7, [], 0)
    assert started["queued_for"] >= 0

    running = tab.started(prompt_id)
    finished = [e for e in tab.of("relay.step", prompt_id) if e["state"] == "done"]
    assert [(e["node"], e["index"], e["total"]) for e in running] == [
        (node, i, 7) for i, node in enumerate(TEXT2IMG_ORDER, start=1)
    ]
    assert [e["node"] for e in finished] == TEXT2IMG_ORDER
    assert all(e["duration"] >= 0 for e in finished)
    assert [e["name"] for e in running] == [TEXT2IMG_NAMES[node]["ko"] for node in TEXT2IMG_ORDER]

    progress = tab.of("relay.progress", prompt_id)
    assert [(p["value"], p["max"], p["node"], p["index"]) for p in progress] == [
        (i, 20, "3", 5) for i in range(1, 21)
    ]
    assert [p["percent"] for p in progress] == [round((4 + i / 20) / 7 * 100, 1) for i in range(1, 21)]
    elapsed = [p["elapsed"] for p in progress]
    assert elapsed == sorted(elapsed)
    assert elapsed[0] > 0

    previews = tab.of("relay.preview", prompt_id)
    assert len(previews) == 20
    assert [p["version"] for p in previews] == list(range(1, 21))
    picture = await relay_http.get(previews[-1]["url"])
    assert picture.status_code == 200
    assert picture.headers["content-type"] == "image/jpeg"
    assert picture.content[:3] == b"\xff\xd8\xff"

    output = tab.of("relay.output", prompt_id)[0]
    assert output["node"] == "9"
    file = output["files"][0]
    assert file["url"] == f"/view?filename={file['filename']}&subfolder=&type=output"
    saved = await relay_http.get(file["url"])  # the URL in the event works on the relay itself
    assert (saved.status_code, saved.headers["content-type"]) == (200, "image/png")
    assert (done["status"], done["total"], done["completed"], done["percent"]) == ("success", 7, 7, 100.0)
    assert done["outputs"]["9"] == output["output"]
    assert done["elapsed"] >= elapsed[-1]

    events = stream(tab)
    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[0]["seq"] + len(events)))
    for event in tab.events:
        assert event["client_id"] == "alice"
        assert isinstance(event["ts"], float)
    assert all(
        e["prompt_id"] == prompt_id for e in events if e["type"] not in ("relay.upstream", "relay.queue")
    )
    await tab.close()


async def test_cached_and_partly_cached_reruns(relay: RunningRelay, relay_http: httpx.AsyncClient) -> None:
    """A resubmit completes every step at start; changing the save prefix re-runs only the save step."""
    tab = await open_tab(relay.ws_url, "clientId=bob")
    first = await submit(relay_http, TEXT2IMG, "bob")
    await tab.wait_done(first)
    second = await submit(relay_http, TEXT2IMG, "bob")
    done = await tab.wait_done(second)
    started = tab.of("relay.started", second)[0]
    assert (sorted(started["cached"]), started["completed"]) == (sorted(TEXT2IMG_ORDER), 7)
    assert tab.of("relay.step", second) == []
    assert (done["status"], done["completed"], done["percent"]) == ("success", 7, 100.0)
    # Cached output nodes still report their files.
    assert tab.of("relay.output", second)[0]["node"] == "9"

    changed = copy.deepcopy(TEXT2IMG)
    changed["9"]["inputs"]["filename_prefix"] = "renamed"
    third = await submit(relay_http, changed, "bob")
    await tab.wait_done(third)
    started = tab.of("relay.started", third)[0]
    assert started["completed"] == 6
    steps = tab.of("relay.step", third)
    assert [(s["node"], s["index"], s["state"]) for s in steps] == [("9", 7, "running"), ("9", 7, "done")]
    await tab.close()


async def test_error_and_interrupt(
    relay: RunningRelay, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """A failing node ends in a step error and relay.done(error); an interrupt in done(interrupted)."""
    tab = await open_tab(relay.ws_url, "clientId=carol")
    failing = await submit(relay_http, load_trace("05").workflow(), "carol")
    done = await tab.wait_done(failing)
    assert done["status"] == "error"
    assert done["error"] == {
        "node": "2",
        "class_type": "FailAfter",
        "exception_type": "RuntimeError",
        "message": "deliberate failure from FailAfter (probe)",
    }
    failed_step = [s for s in tab.of("relay.step", failing) if s["state"] == "error"]
    assert [(s["node"], s["name"]) for s in failed_step] == [("2", "Fail After")]

    long_run = await submit(relay_http, long_graph(), "carol")
    await tab.wait_type("relay.progress", long_run)
    async with httpx.AsyncClient(base_url=emulator.url) as comfy:
        await comfy.post("/interrupt", json={"prompt_id": long_run})
    done = await tab.wait_done(long_run)
    assert done["status"] == "interrupted"
    assert done["error"]["node"] == "2"
    assert 0 < done["percent"] < 100
    await tab.close()


async def test_removed_from_the_queue_ends_cancelled(
    relay: RunningRelay, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """Deleting pending prompts through the relay (by id, or clear) ends each with relay.done cancelled."""
    tab = await open_tab(relay.ws_url, "clientId=dora")
    running = await submit(relay_http, long_graph(), "dora")
    pending = [await submit(relay_http, TEXT2IMG, "dora", prompt_id=str(uuid.uuid4())) for _ in range(3)]
    await tab.wait_type("relay.progress", running)
    assert (await relay_http.post("/queue", json={"delete": [pending[0]]})).status_code == 200
    done = await tab.wait_done(pending[0])
    assert done["status"] == "cancelled"
    assert done["error"]["message"] == "removed from ComfyUI's queue before it ran"
    assert (await relay_http.post("/api/queue", json={"clear": True})).status_code == 200
    assert [(await tab.wait_done(p))["status"] for p in pending[1:]] == ["cancelled", "cancelled"]
    assert tab.of("relay.done", running) == []  # the running prompt is not touched
    async with httpx.AsyncClient(base_url=emulator.url) as comfy:
        await comfy.post("/interrupt", json={"prompt_id": running})
    assert (await tab.wait_done(running))["status"] == "interrupted"
    assert [e["prompt_id"] for e in tab.of("relay.done")].count(pending[0]) == 1
    await tab.close()


async def test_bad_requests_get_clear_errors(relay: RunningRelay, relay_http: httpx.AsyncClient) -> None:
    """Malformed bodies get 400 JSON errors from the relay itself; bad socket parameters a 4400 close."""
    cases = [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b'{"client_id": "x"}', "no_prompt"),
        (b'{"prompt": "a string"}', "invalid_prompt"),
        (b'{"prompt": {"1": 5}}', "invalid_prompt"),
        (b'{"prompt": {}, "client_id": "has spaces"}', "bad_client_id"),
        # Fields ComfyUI itself answers with a bare 500 (found by tests/fuzz).
        (b'{"prompt": {}, "number": null}', "invalid_number"),
        (b'{"prompt": {}, "number": "first"}', "invalid_number"),
        (b'{"prompt": {}, "extra_data": [1]}', "invalid_extra_data"),
        (b'{"prompt": {}, "partial_execution_targets": 3}', "invalid_targets"),
        (b'{"prompt": {}, "partial_execution_targets": [1]}', "invalid_targets"),
    ]
    for body, kind in cases:
        response = await relay_http.post(
            "/prompt", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, body
        assert response.json()["error"]["type"] == kind
    # ComfyUI's own 400s come back unchanged.
    invalid = await relay_http.post(
        "/prompt", json={"prompt": {"1": {"class_type": "Nope", "inputs": {}}}, "client_id": "d"}
    )
    assert invalid.status_code == 400
    assert invalid.json()["error"]["type"] == "invalid_prompt"
    assert "node_errors" in invalid.json()
    # A link to a node the graph lacks (found by tests/fuzz: the relay's planning failed with 500).
    dangling = {
        "1": {"class_type": "KSampler", "inputs": {}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}},
    }
    refused = await relay_http.post("/prompt", json={"prompt": dangling, "client_id": "d"})
    assert refused.status_code == 400, refused.text
    # extra_data null means none, as it always did through the relay.
    accepted = await relay_http.post(
        "/prompt", json={"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}, "extra_data": None}
    )
    assert accepted.status_code != 500, accepted.text
    assert accepted.json().get("error", {}).get("type") != "invalid_extra_data"

    for query, code in (
        ("clientId=bad%20id", "bad_client_id"),
        ("events=everything", "bad_events"),
        ("since=-3", "bad_since"),
    ):
        tab = await open_tab(relay.ws_url, query)
        async with asyncio.timeout(5):
            await tab.closed.wait()
        assert tab.close_code == 4400
        assert tab.events[0]["type"] == "relay.error"
        assert tab.events[0]["code"] == code


async def test_client_id_from_header_or_assigned(relay: RunningRelay, relay_http: httpx.AsyncClient) -> None:
    """Without client_id in the body the header is used; without any, the relay assigns one and says so."""
    tab = await open_tab(relay.ws_url, "clientId=dave")
    graph = load_trace("01").workflow()
    response = await relay_http.post("/prompt", json={"prompt": graph}, headers={"X-Client-Id": "dave"})
    assert response.json()["client_id"] == "dave"
    await tab.wait_done(response.json()["prompt_id"])
    assigned = await relay_http.post("/prompt", json={"prompt": graph})
    assert assigned.status_code == 200
    assert len(assigned.json()["client_id"]) == 32
    late = await open_tab(relay.ws_url, f"clientId={assigned.json()['client_id']}&since=0")
    done = await late.wait_done(assigned.json()["prompt_id"])
    assert done["status"] == "success"
    await tab.close()
    await late.close()


async def test_comfyui_frames_pass_through(relay: RunningRelay, relay_http: httpx.AsyncClient) -> None:
    """events=comfy gives a ComfyUI client its own protocol: status with sid, messages, event-1 previews."""
    tab = await open_tab(relay.ws_url, "clientId=erin&events=comfy")
    prompt_id = await submit(relay_http, load_trace("02").workflow(), "erin")
    async with asyncio.timeout(20):
        while not any(
            isinstance(f, str) and '"node": null' in f.replace('"node":null', '"node": null') for f in tab.raw
        ):
            await asyncio.sleep(0.02)
    texts = [json.loads(f) for f in tab.raw if isinstance(f, str)]
    assert texts[0]["type"] == "status"
    assert texts[0]["data"]["sid"] == "erin"
    kinds = [m["type"] for m in texts]
    assert "execution_start" in kinds
    assert "execution_success" in kinds
    assert texts[-1] == {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}
    assert not any(k.startswith("relay.") for k in kinds)
    previews = [decode_binary_frame(f) for f in tab.raw if isinstance(f, bytes)]
    assert len(previews) == 8
    assert all(p.event is BinaryEvent.PREVIEW_IMAGE for p in previews)
    await tab.close()


@pytest.mark.parametrize("mode", ["all"])
async def test_all_mode_has_both(relay: RunningRelay, relay_http: httpx.AsyncClient, mode: str) -> None:
    """events=all interleaves relay events with ComfyUI's own frames on one socket."""
    tab = await open_tab(relay.ws_url, f"clientId=frank&events={mode}")
    prompt_id = await submit(relay_http, load_trace("01").workflow(), "frank")
    await tab.wait_done(prompt_id)
    texts = [json.loads(f) for f in tab.raw if isinstance(f, str)]
    assert texts[0]["type"] == "relay.hello"
    assert any(m["type"] == "execution_success" for m in texts)
    assert any(m["type"] == "relay.done" for m in texts)
    await tab.close()


async def test_oversized_client_frame_closes_with_1009(relay: RunningRelay) -> None:
    """A browser frame over the client limit closes that socket with 1009; the relay carries on."""
    tab = await open_tab(relay.ws_url, "clientId=big")
    await tab.wait_type("relay.hello")
    await tab.connection.send("x" * (relay.state.config.max_client_frame + 1))
    async with asyncio.timeout(5):
        await tab.closed.wait()
    assert tab.close_code == 1009
    other = await open_tab(relay.ws_url, "clientId=big")
    assert (await other.wait_type("relay.hello"))["client_id"] == "big"
    await other.close()


async def test_progress_text_and_uncompressed_sockets(
    relay: RunningRelay, relay_http: httpx.AsyncClient
) -> None:
    """Progress text becomes relay.text for our running prompt; browser sockets never use compression."""
    tab = await open_tab(relay.ws_url, "clientId=texty")  # the client offers permessage-deflate
    assert "Sec-WebSocket-Extensions" not in tab.connection.response.headers
    prompt_id = await submit(relay_http, load_trace("02c").workflow(), "texty")
    await tab.wait_done(prompt_id)
    texts = [(e["node"], e["text"]) for e in tab.of("relay.text", prompt_id)]
    assert texts == [
        ("2", "step 1/3"),
        ("2", "step 2/3"),
        ("2", "step 3/3"),
        ("5", "width: 96, height: 64\n batch size: 1"),
    ]
    await tab.close()


async def test_client_chosen_prompt_id_is_kept_and_checked(
    relay: RunningRelay, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """A prompt_id chosen by the client is used as is; one that is not a canonical UUID (current
    ComfyUI refuses those, and ids are matched exactly) gets the relay's own 400, and ComfyUI
    never hears of it."""
    tab = await open_tab(relay.ws_url, "clientId=chooser")
    chosen = str(uuid.uuid4())
    graph = load_trace("01").workflow()
    response = await relay_http.post(
        "/prompt", json={"prompt": graph, "client_id": "chooser", "prompt_id": chosen}
    )
    assert response.json()["prompt_id"] == chosen
    assert (await tab.wait_done(chosen))["status"] == "success"
    posts_before = sum(1 for r in emulator.state.requests if r[:2] == ("POST", "/prompt"))
    for odd in ("../queue?x=1", chosen.upper(), chosen.replace("-", ""), 42):
        refused = await relay_http.post(
            "/prompt", json={"prompt": graph, "client_id": "chooser", "prompt_id": odd}
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["type"] == "invalid_prompt_id"
    assert sum(1 for r in emulator.state.requests if r[:2] == ("POST", "/prompt")) == posts_before
    await tab.close()
