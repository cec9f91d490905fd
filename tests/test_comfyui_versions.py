"""Each ComfyUI the relay supports: what changed in current releases, and how the relay adapts.

Emulator facts are checked on the profile they belong to (``current`` is ComfyUI 0.38; the
0.3.64 profile is held to the recordings by the contract tests). Relay behaviour runs on both.
"""

from __future__ import annotations

import json
import re
import uuid
from importlib import resources
from typing import Any

import httpx
import pytest
import websockets

from relay.emulator import EmulatorConfig, RunningEmulator, run_emulator
from relay.emulator.config import CURRENT_VERSION, ComfyVersion
from relay.server import RunningRelay
from tests.conftest import TEST_SPEED
from tests.relay_client import open_tab
from tests.test_operations import scrape, value
from tests.tracekit import TRACES, long_graph

TEXT2IMG = json.loads(resources.files("relay.emulator").joinpath("examples/text2img.json").read_text())
PNG = (TRACES / "07-upload.probe_upload.png").read_bytes()


def sent(emulator: RunningEmulator, method: str, pattern: str) -> list[str]:
    """The paths of the requests that reached the emulator."""
    return [
        path for seen, path, _, _ in emulator.state.requests if seen == method and re.fullmatch(pattern, path)
    ]


async def wait_ended(http: httpx.AsyncClient, prompt_id: str) -> None:
    """Until ComfyUI's history has the prompt (it is over)."""
    async with websockets.connect(str(http.base_url).rstrip("/").replace("http", "ws", 1) + "/ws") as socket:
        while not (await http.get(f"/history/{prompt_id}")).json():
            await socket.recv()  # every end is announced by a status message


# The emulator, as each version ------------------------------------------------------------


@pytest.fixture
async def current() -> Any:
    async with (
        run_emulator(EmulatorConfig(port=0, speed=TEST_SPEED, comfyui_version="current")) as emulator,
        httpx.AsyncClient(base_url=emulator.url, timeout=10) as http,
    ):
        yield emulator, http


async def test_current_refuses_prompt_ids_that_are_not_canonical_uuids(current: Any) -> None:
    """0.38: a chosen prompt_id must be a lowercase hyphenated UUID (400 invalid_prompt_id); none
    or null gets a new one; the queue item's extra_data carries create_time, not secrets."""
    _, http = current
    for odd in ("my-id", str(uuid.uuid4()).upper(), uuid.uuid4().hex):
        refused = await http.post("/prompt", json={"prompt": TEXT2IMG, "prompt_id": odd})
        assert refused.status_code == 400
        assert refused.json()["error"]["type"] == "invalid_prompt_id"
        assert refused.json()["node_errors"] == {}
    made = (await http.post("/prompt", json={"prompt": TEXT2IMG, "prompt_id": None})).json()["prompt_id"]
    assert str(uuid.UUID(made)) == made
    chosen = str(uuid.uuid4())
    extra = {"api_key_comfy_org": "secret", "mine": 1}
    body = {"prompt": TEXT2IMG, "prompt_id": chosen, "extra_data": extra}
    assert (await http.post("/prompt", json=body)).json()["prompt_id"] == chosen
    queue = (await http.get("/queue")).json()
    item = next(i for i in queue["queue_running"] + queue["queue_pending"] if i[1] == chosen)
    assert len(item) == 5
    assert item[3]["mine"] == 1
    assert "api_key_comfy_org" not in item[3]
    assert isinstance(item[3]["create_time"], int)


async def test_0364_takes_any_prompt_id() -> None:
    """0.3.64 used a client's prompt_id as it came, and had no jobs API."""
    async with (
        run_emulator(EmulatorConfig(port=0, speed=TEST_SPEED, comfyui_version="0.3.64")) as emulator,
        httpx.AsyncClient(base_url=emulator.url, timeout=10) as http,
    ):
        answer = await http.post("/prompt", json={"prompt": TEXT2IMG, "prompt_id": "my-id"})
        assert answer.json()["prompt_id"] == "my-id"
        assert (await http.get("/api/jobs")).status_code == 404
        assert (await http.get("/system_stats")).json()["system"]["comfyui_version"] == "0.3.64"
        assert "assets" not in (await http.get("/features")).json()


async def test_current_jobs_api(current: Any) -> None:
    """0.38: /api/jobs lists jobs with status and paging, one job has its outputs, and cancel
    dequeues a pending job, says false for an ended one and checks a batch's ids first."""
    _, http = current
    first = (await http.post("/prompt", json={"prompt": TEXT2IMG})).json()["prompt_id"]
    await wait_ended(http, first)
    long_run = (await http.post("/prompt", json={"prompt": long_graph()})).json()["prompt_id"]
    waiting = (await http.post("/prompt", json={"prompt": TEXT2IMG})).json()["prompt_id"]
    listed = (await http.get("/api/jobs", params={"status": "pending,in_progress"})).json()
    assert {job["id"]: job["status"] for job in listed["jobs"]}[waiting] == "pending"
    assert (await http.get("/api/jobs", params={"status": "bogus"})).status_code == 400
    assert (await http.post(f"/api/jobs/{waiting}/cancel")).json() == {"cancelled": True}
    assert (await http.get(f"/api/jobs/{waiting}")).status_code == 404  # dequeued: never ran
    assert (await http.post("/api/jobs/cancel", json={"job_ids": [long_run]})).json() == {"cancelled": True}
    await wait_ended(http, long_run)
    assert (await http.get(f"/api/jobs/{long_run}")).json()["status"] == "cancelled"
    job = (await http.get(f"/api/jobs/{first}")).json()
    assert job["status"] == "completed"
    assert job["outputs"]["9"]["images"]
    assert job["execution_status"]["status_str"] == "success"
    assert (await http.post(f"/api/jobs/{first}/cancel")).json() == {"cancelled": False}
    page = (await http.get("/api/jobs", params={"limit": 1})).json()
    assert page["pagination"]["limit"] == 1
    assert page["pagination"]["has_more"] is (page["pagination"]["total"] > 1)
    assert (await http.get(f"/api/jobs/{uuid.uuid4()}")).status_code == 404
    bad = await http.post("/api/jobs/cancel", json={"job_ids": ["nope"]})
    assert (bad.status_code, bad.json()["invalid_ids"]) == (400, ["nope"])


async def test_current_flags_stats_and_assets(current: Any) -> None:
    """0.38: more feature flags, the version in /system_stats, uploads registered as assets and
    served by hash, and the asset scan announced to every socket in message types of its own."""
    emulator, http = current
    features = (await http.get("/features")).json()
    assert features["assets"] is True
    assert features["supports_preview_metadata"] is True
    assert (await http.get("/system_stats")).json()["system"]["comfyui_version"] == CURRENT_VERSION
    uploaded = (await http.post("/upload/image", files={"image": ("a.png", PNG, "image/png")})).json()
    asset = uploaded["asset"]
    assert (await http.get("/view", params={"filename": asset["asset_hash"]})).content == PNG
    assert (await http.get(f"/api/assets/{asset['id']}/content")).content == PNG
    assert asset["id"] in {a["id"] for a in (await http.get("/api/assets")).json()["assets"]}
    async with websockets.connect(emulator.url.replace("http", "ws") + "/ws?clientId=watcher") as socket:
        await socket.recv()  # status
        await http.get("/object_info")
        seen = {json.loads(await socket.recv())["type"] for _ in range(2)}
    assert seen == {"assets.seed.started", "assets.seed.completed"}


# The relay on each version ----------------------------------------------------------------


async def test_relay_reports_which_comfyui_it_found(
    relay: RunningRelay, relay_http: httpx.AsyncClient, comfyui_version: ComfyVersion
) -> None:
    """/readyz names ComfyUI's version and whether its jobs API is used."""
    comfyui = (await relay_http.get("/readyz")).json()["comfyui"]
    if comfyui_version == "current":
        assert (comfyui["version"], comfyui["jobs_api"], comfyui["assets"]) == (CURRENT_VERSION, True, True)
    else:
        assert (comfyui["version"], comfyui["jobs_api"], comfyui["assets"]) == ("0.3.64", False, False)


async def test_activity_reaches_the_step_event(
    relay: RunningRelay, relay_http: httpx.AsyncClient, comfyui_version: ComfyVersion
) -> None:
    """On current ComfyUI a loader's step is announced again with activity "loading", then
    without; its index and the step count do not change. 0.3.64 says nothing of activity."""
    tab = await open_tab(relay.ws_url, "clientId=activity")
    prompt_id = (await relay_http.post("/prompt", json={"prompt": TEXT2IMG, "client_id": "activity"})).json()[
        "prompt_id"
    ]
    await tab.wait_done(prompt_id)
    loader = [e for e in tab.of("relay.step", prompt_id) if e["node"] == "4"]
    if comfyui_version == "current":
        assert [(e["state"], e.get("activity")) for e in loader] == [
            ("running", None), ("running", "loading"), ("running", None), ("done", None),
        ]  # fmt: skip
        assert {e["index"] for e in loader} == {1}
    else:
        assert [e["state"] for e in loader] == ["running", "done"]
    assert [e["index"] for e in tab.started(prompt_id)] == list(range(1, 8))
    assert not [e for e in tab.events if "activity" in e and e["type"] != "relay.step"]
    await tab.close()


async def test_unknown_message_types_pass_to_raw_subscribers_and_change_nothing(
    relay: RunningRelay, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """A message type the relay has never seen reaches events=comfy|all sockets (when it is
    nobody's or ours), is counted, and leaves the relay events of a run whole."""
    tab = await open_tab(relay.ws_url, "clientId=novel&events=all")
    before = await scrape(relay_http)
    prompt_id = (await relay_http.post("/prompt", json={"prompt": TEXT2IMG, "client_id": "novel"})).json()[
        "prompt_id"
    ]
    await tab.wait_type("relay.progress", prompt_id)
    hub = emulator.state.hub
    hub.send_json_nowait("brand.new.news", {"detail": [1, 2, 3]}, None)
    hub.send_json_nowait("brand.new.news", {"prompt_id": str(uuid.uuid4()), "secret": "theirs"}, None)
    hub.send_json_nowait("brand.new.news", {"prompt_id": prompt_id, "mine": True}, None)
    await tab.wait_done(prompt_id)
    raw = [json.loads(f) for f in tab.raw if isinstance(f, str)]
    novel = [m["data"] for m in raw if m.get("type") == "brand.new.news"]
    assert novel == [{"detail": [1, 2, 3]}, {"prompt_id": prompt_id, "mine": True}]
    progress = [(p["value"], p["max"]) for p in tab.of("relay.progress", prompt_id)]
    assert progress == [(i, 20) for i in range(1, 21)]
    assert [e["index"] for e in tab.started(prompt_id)] == list(range(1, 8))
    after = await scrape(relay_http)
    counted = value(after, "relay_comfyui_unknown_messages_total") - value(
        before, "relay_comfyui_unknown_messages_total"
    )
    assert counted >= 3
    await tab.close()


async def test_cancel_through_the_relay(
    relay: RunningRelay,
    relay_http: httpx.AsyncClient,
    emulator: RunningEmulator,
    comfyui_version: ComfyVersion,
) -> None:
    """POST /prompt/{id}/cancel dequeues a waiting prompt (relay.done cancelled) and interrupts a
    running one, in ComfyUI's one atomic request where it has it; an ended one is not cancelled."""
    tab = await open_tab(relay.ws_url, "clientId=canceller")
    long_run = (
        await relay_http.post("/prompt", json={"prompt": long_graph(), "client_id": "canceller"})
    ).json()["prompt_id"]
    waiting = (await relay_http.post("/prompt", json={"prompt": TEXT2IMG, "client_id": "canceller"})).json()[
        "prompt_id"
    ]
    await tab.wait_type("relay.progress", long_run)
    assert (await relay_http.post(f"/prompt/{waiting}/cancel")).json() == {
        "prompt_id": waiting,
        "cancelled": True,
    }
    assert (await tab.wait_done(waiting))["status"] == "cancelled"
    assert (await relay_http.post(f"/prompt/{long_run}/cancel")).json()["cancelled"] is True
    assert (await tab.wait_done(long_run))["status"] == "interrupted"
    assert (await relay_http.post(f"/prompt/{long_run}/cancel")).json()["cancelled"] is False
    refused = await relay_http.post("/prompt/not-an-id/cancel")
    assert (refused.status_code, refused.json()["error"]["type"]) == (400, "invalid_prompt_id")
    jobs_cancels = sent(emulator, "POST", r"/api/jobs/[0-9a-f-]+/cancel")
    if comfyui_version == "current":
        assert len(jobs_cancels) == 3
    else:
        assert jobs_cancels == []
        assert sent(emulator, "POST", "/queue")
        assert sent(emulator, "POST", "/interrupt")
    await tab.close()


async def test_proxy_checks_job_ids_and_restores_client_ids(
    relay: RunningRelay,
    relay_http: httpx.AsyncClient,
    emulator: RunningEmulator,
    comfyui_version: ComfyVersion,
) -> None:
    """/api/jobs through the relay: a malformed id is refused before ComfyUI is asked; a job's
    extra_data shows the client's own id; a server without the jobs API answers its own 404."""
    tab = await open_tab(relay.ws_url, "clientId=jobber")
    prompt_id = (await relay_http.post("/prompt", json={"prompt": TEXT2IMG, "client_id": "jobber"})).json()[
        "prompt_id"
    ]
    await tab.wait_done(prompt_id)
    asked = len(emulator.state.requests)
    for path in ("/api/jobs/..%5Cqueue", "/api/jobs/NOT-A-UUID", f"/api/jobs/{prompt_id.upper()}"):
        refused = await relay_http.get(path)
        assert (refused.status_code, refused.json()["error"]["type"]) == (400, "invalid_job_id"), path
    bad_batch = await relay_http.post("/api/jobs/cancel", json={"job_ids": [prompt_id, "../x"]})
    assert (bad_batch.status_code, bad_batch.json()["error"]["type"]) == (400, "invalid_job_id")
    assert len(emulator.state.requests) == asked  # none of them reached ComfyUI
    job = await relay_http.get(f"/api/jobs/{prompt_id}")
    if comfyui_version == "current":
        assert job.json()["workflow"]["extra_data"]["client_id"] == "jobber"
        listed = (await relay_http.get("/api/jobs", params={"limit": 5})).json()
        assert prompt_id in {j["id"] for j in listed["jobs"]}
    else:
        assert job.status_code == 404
    await tab.close()


async def test_proxy_assets(
    relay: RunningRelay, relay_http: httpx.AsyncClient, comfyui_version: ComfyVersion
) -> None:
    """Asset uploads stream through with the upload checks; content streams back; a bad id or
    file name never reaches ComfyUI."""
    files = {"file": ("pic.png", PNG, "image/png")}
    bad = await relay_http.post("/api/assets", files={"file": ("../evil.png", PNG, "image/png")})
    assert (bad.status_code, bad.json()["error"]["type"]) == (400, "bad_filename")
    assert (await relay_http.get("/api/assets/not-a-uuid")).status_code == 404
    uploaded = await relay_http.post("/api/assets", files=files)
    if comfyui_version == "0.3.64":
        assert uploaded.status_code == 404  # no asset system there: ComfyUI's own answer
        return
    assert uploaded.status_code == 201, uploaded.text
    asset = uploaded.json()
    assert (await relay_http.get(f"/api/assets/{asset['id']}/content")).content == PNG
    assert (await relay_http.get(f"/api/assets/{asset['id']}")).json()["hash"] == asset["hash"]
    assert (await relay_http.head(f"/api/assets/hash/{asset['hash']}")).status_code == 200
    assert (await relay_http.head(f"/api/assets/hash/blake3:{'0' * 64}")).status_code == 404
    assert (await relay_http.head("/api/assets/hash/md5:abc")).status_code == 400
    assert (await relay_http.delete(f"/api/assets/{asset['id']}")).status_code == 204


async def test_preview_method_per_prompt(
    relay: RunningRelay, relay_http: httpx.AsyncClient, comfyui_version: ComfyVersion
) -> None:
    """Current ComfyUI takes each prompt's preview method from its extra_data: "none" means no
    previews for that run (progress still comes); 0.3.64 ignores it. The relay passes it on."""
    tab = await open_tab(relay.ws_url, "clientId=quiet")
    body = {"prompt": TEXT2IMG, "client_id": "quiet", "extra_data": {"preview_method": "none"}}
    quiet = (await relay_http.post("/prompt", json=body)).json()["prompt_id"]
    await tab.wait_done(quiet)
    assert len(tab.of("relay.progress", quiet)) == 20
    previews = tab.of("relay.preview", quiet)
    assert (previews == []) is (comfyui_version == "current")
    await tab.close()
