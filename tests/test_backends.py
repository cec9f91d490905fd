"""Several ComfyUI backends behind one relay: three emulators, prompts routed among them.

Every prompt goes to one backend and everything about it follows: its events reach the
client's one stream, its files come back through the relay's /view, its history and cancel go
to its backend. A backend that dies mid-run ends its prompts as lost; the next prompt goes to a
live one, and the backend rejoins when it answers again.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import obstore
import pytest

from relay.emulator import EmulatorConfig, RunningEmulator, run_emulator
from relay.emulator.config import ComfyVersion
from relay.server import RunningRelay, run_relay
from tests.conftest import TEST_SPEED, relay_config
from tests.redis_server import RedisServer
from tests.relay_client import open_tab
from tests.relay_processes import relay_processes
from tests.s3_server import S3Server
from tests.test_cluster import RoamingTab, assert_unbroken
from tests.test_operations import parse, value
from tests.test_relay_resilience import long_graph
from tests.test_storage import all_stored, bucket, storage_settings

TEXT2IMG = json.loads(resources.files("relay.emulator").joinpath("examples/text2img.json").read_text())


def painting(seed: int, steps: int = 20) -> dict[str, Any]:
    graph = copy.deepcopy(TEXT2IMG)
    graph["3"]["inputs"].update(seed=seed, steps=steps)
    return graph


@pytest.fixture
async def trio(comfyui_version: ComfyVersion) -> AsyncIterator[list[RunningEmulator]]:
    """Three emulated ComfyUI servers, each with its own folders (as pods with their own disks)."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                run_emulator(EmulatorConfig(port=0, speed=TEST_SPEED, comfyui_version=comfyui_version))
            )
            for _ in range(3)
        ]


def pooled(trio: list[RunningEmulator], **overrides: object) -> Any:
    return relay_config(
        trio[0],
        comfyui_urls=",".join(emulator.url for emulator in trio),
        backend_check_interval=0.1,
        backend_lost_after=1.0,
        **overrides,
    )


@pytest.fixture
async def relay(trio: list[RunningEmulator]) -> AsyncIterator[RunningRelay]:
    async with run_relay(pooled(trio)) as running:
        yield running


@pytest.fixture
async def http(relay: RunningRelay) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
        yield client


def name_of(emulator: RunningEmulator) -> str:
    return emulator.url.removeprefix("http://")


async def send(http: httpx.AsyncClient, graph: dict[str, Any], client_id: str) -> dict[str, Any]:
    answer = await http.post("/prompt", json={"prompt": graph, "client_id": client_id})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def held_by(emulator: RunningEmulator, prompt_id: str) -> bool:
    """Whether the emulator itself has the prompt (queued, running or in its history)."""
    async with httpx.AsyncClient(base_url=emulator.url) as direct:
        queue = (await direct.get("/queue")).json()
        history = (await direct.get(f"/history/{prompt_id}")).json()
    queued = {str(item[1]) for item in queue["queue_running"] + queue["queue_pending"]}
    return prompt_id in queued or prompt_id in history


async def test_prompts_spread_by_load_into_one_stream_and_their_files_come_back(
    relay: RunningRelay, http: httpx.AsyncClient, trio: list[RunningEmulator]
) -> None:
    """Three prompts sent at once go one to each backend (least loaded); both tabs of the client
    see all three in one stream; each result's /view through the relay is the file of the
    backend that made it, although every backend named its file the same."""
    tabs = [await open_tab(relay.ws_url, "clientId=ann") for _ in range(2)]
    answers = await asyncio.gather(*(send(http, painting(seed, steps=200), "ann") for seed in (1, 2, 3)))
    assert {answer["backend"] for answer in answers} == {name_of(e) for e in trio}
    by_name = {name_of(e): e for e in trio}
    for answer in answers:
        assert await held_by(by_name[answer["backend"]], answer["prompt_id"])
    files: dict[str, tuple[str, bytes]] = {}
    for answer in answers:
        prompt_id = answer["prompt_id"]
        for tab in tabs:
            done = await tab.wait_done(prompt_id, timeout=60)
            assert done["status"] == "success"
        (queued,) = tabs[0].of("relay.queued", prompt_id)
        assert queued["backend"] == answer["backend"]
        (output,) = tabs[0].of("relay.output", prompt_id)
        image = output["files"][0]
        assert f"prompt_id={prompt_id}" in image["url"]  # the relay's /view knows where it is
        async with httpx.AsyncClient(base_url=by_name[answer["backend"]].url) as direct:
            query = {key: image[key] for key in ("filename", "subfolder", "type")}
            original = await direct.get("/view", params=query)
        assert original.status_code == 200
        files[prompt_id] = (image["filename"], original.content)
        through = await http.get(image["url"])
        assert through.status_code == 200
        assert through.content == original.content
    # The check means something: the backends' files share a name but not their bytes.
    assert len({name for name, _ in files.values()}) == 1
    assert len({content for _, content in files.values()}) == 3
    metrics = parse((await http.get("/metrics")).text)
    for emulator in trio:
        assert value(metrics, "relay_backend_prompts_total", backend=name_of(emulator)) == 1
        assert value(metrics, "relay_backend_in_flight", backend=name_of(emulator)) == 0
    # One stream: the two tabs saw the same events, in the same order.
    assert [e.get("seq") for e in tabs[0].events] == [e.get("seq") for e in tabs[1].events]
    for tab in tabs:
        await tab.close()


async def test_merged_queue_shows_all_and_cancel_follows_the_route(
    relay: RunningRelay, http: httpx.AsyncClient, trio: list[RunningEmulator]
) -> None:
    """Six long prompts: each backend runs one and holds one. The relay's /queue shows all six,
    each labelled with its backend, running before waiting; cancelling each through the relay
    reaches its backend and ends it."""
    tab = await open_tab(relay.ws_url, "clientId=bo")
    answers = [await send(http, long_graph(steps=500, delay=0.2), "bo") for _ in range(6)]
    where = {answer["prompt_id"]: answer["backend"] for answer in answers}
    assert sorted(where.values()) == sorted([name_of(e) for e in trio] * 2)
    for answer in answers[:3]:
        await tab.wait_type("relay.started", answer["prompt_id"])
    queue = (await http.get("/queue")).json()
    running = {item[1]: item[3] for item in queue["queue_running"]}
    pending = {item[1]: item[3] for item in queue["queue_pending"]}
    assert set(running) == {a["prompt_id"] for a in answers[:3]}
    assert set(pending) == {a["prompt_id"] for a in answers[3:]}
    for prompt_id, extra in {**running, **pending}.items():
        assert extra["backend"] == where[prompt_id]
        assert extra["client_id"] == "bo"
    assert set(queue["backends"]) == {name_of(e) for e in trio}
    for mine in queue["backends"].values():
        assert mine["state"] == "up"
        assert len(mine["queue_running"]) == len(mine["queue_pending"]) == 1
    history = (await http.get(f"/history/{answers[0]['prompt_id']}")).json()
    assert history == {}  # running: not in any backend's history yet
    for answer in reversed(answers):
        cancelled = await http.post(f"/prompt/{answer['prompt_id']}/cancel")
        assert cancelled.json() == {"prompt_id": answer["prompt_id"], "cancelled": True}
    for answer in answers:
        done = await tab.wait_done(answer["prompt_id"], timeout=30)
        assert done["status"] in ("cancelled", "interrupted")
    # The running ones were interrupted, so they are in their backend's history, labelled.
    first = answers[0]["prompt_id"]
    entry = (await http.get(f"/history/{first}")).json()[first]
    assert entry["prompt"][3]["backend"] == where[first]
    merged = (await http.get("/history")).json()
    assert {a["prompt_id"] for a in answers[:3]} <= set(merged)
    await tab.close()


async def test_a_backend_killed_mid_run_ends_its_prompt_and_then_rejoins(
    relay: RunningRelay, http: httpx.AsyncClient, trio: list[RunningEmulator]
) -> None:
    """A backend stops while running a prompt: the prompt ends as lost (it does not hang), the
    backend is down in /readyz and /metrics, the next prompts go to the live ones; started
    again, it is up and gets prompts again."""
    tab = await open_tab(relay.ws_url, "clientId=cy")
    doomed = await send(http, long_graph(steps=1000, delay=0.2), "cy")
    await tab.wait_for(lambda e: e["type"] == "relay.progress" and e["prompt_id"] == doomed["prompt_id"])
    victim = next(e for e in trio if name_of(e) == doomed["backend"])
    await victim.stop()
    done = await tab.wait_done(doomed["prompt_id"], timeout=30)
    assert done["status"] == "error"
    assert done["error"]["exception_type"] == "PromptLost"
    assert doomed["backend"] in done["error"]["message"]
    ready = (await http.get("/readyz")).json()
    states = {b["name"]: b["state"] for b in ready["backends"]}
    assert states[doomed["backend"]] == "down"
    assert ready["status"] == "ready"
    assert ready["degraded"] == ["backend_down"]
    metrics = parse((await http.get("/metrics")).text)
    assert value(metrics, "relay_backend_state", backend=doomed["backend"], state="down") == 1
    assert value(metrics, "relay_backend_lost_total", backend=doomed["backend"]) == 1
    following = [await send(http, painting(seed), "cy") for seed in (5, 6, 7)]
    assert doomed["backend"] not in {answer["backend"] for answer in following}
    for answer in following:
        assert (await tab.wait_done(answer["prompt_id"], timeout=60))["status"] == "success"

    await victim.start()
    await wait_until(
        http, lambda body: {b["name"]: b["state"] for b in body["backends"]}[doomed["backend"]] == "up"
    )
    later = await asyncio.gather(*(send(http, long_graph(steps=100, delay=0.2), "cy") for _ in range(3)))
    assert {answer["backend"] for answer in later} == {name_of(e) for e in trio}
    for answer in later:
        assert (await tab.wait_done(answer["prompt_id"], timeout=60))["status"] == "success"
    await tab.close()


def state_of(ready: dict[str, Any], backend: str) -> str:
    states = {b["name"]: b["state"] for b in ready["backends"]}
    return states[backend]


async def wait_until(http: httpx.AsyncClient, check: Any, timeout: float = 20.0) -> None:
    """Until /readyz's body passes ``check`` (the relay checks its backends every 0.1 s here)."""
    async with asyncio.timeout(timeout):
        while not check((await http.get("/readyz")).json()):
            await asyncio.sleep(0.05)


async def test_an_upload_reaches_every_backend(
    relay: RunningRelay, http: httpx.AsyncClient, trio: list[RunningEmulator]
) -> None:
    """An image uploaded through the relay is in every backend's input folder, under one name,
    so a prompt naming it runs wherever it is routed."""
    missing = await http.get("/view?filename=face.png&type=input")
    assert missing.status_code == 404  # on no backend yet
    image = _png()
    answer = await http.post("/upload/image", files={"image": ("face.png", image, "image/png")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == "face.png"
    for emulator in trio:
        async with httpx.AsyncClient(base_url=emulator.url) as direct:
            copy_there = await direct.get("/view", params={"filename": "face.png", "type": "input"})
        assert copy_there.status_code == 200
        assert copy_there.content == image


def _png() -> bytes:
    from tests.test_comfyui_versions import PNG  # noqa: PLC0415 - a recorded upload's image

    return PNG


async def test_a_restarted_relay_follows_its_clients_prompts_on_every_backend(
    trio: list[RunningEmulator],
) -> None:
    """Without Redis a restarted relay remembers nothing; the client's first tab afterwards gets
    each prompt the backends still hold for it announced and ended, whichever backend it is on."""
    async with run_relay(pooled(trio)) as before, httpx.AsyncClient(base_url=before.url, timeout=30) as http:
        tab = await open_tab(before.ws_url, "clientId=dot")
        answers = [await send(http, long_graph(steps=60, delay=0.2), "dot") for _ in range(3)]
        assert len({answer["backend"] for answer in answers}) == 3
        for answer in answers:
            await tab.wait_type("relay.progress", answer["prompt_id"])
        await tab.close()
    async with run_relay(pooled(trio)) as after:
        back = await open_tab(after.ws_url, "clientId=dot")
        for answer in answers:
            done = await back.wait_done(answer["prompt_id"], timeout=60)
            assert (done["status"], done["recovered"]) == ("success", True)
            assert len(back.of("relay.queued", answer["prompt_id"])) == 1
            assert len(back.of("relay.done", answer["prompt_id"])) == 1
        await back.close()


async def test_replicas_on_redis_hand_each_backends_socket_over(
    trio: list[RunningEmulator], redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two relays on Redis in front of three backends, a tab of the client on each: prompts on
    every backend, then both relays restarted in turn. Each prompt's backend goes with its
    record and each socket's routing id with the handover, so the runs are followed live to
    the end on every tab, with one socket per backend for the client throughout."""
    settings = {
        "RELAY_COMFYUI_URLS": ",".join(emulator.url for emulator in trio),
        "RELAY_BACKEND_CHECK_INTERVAL": "0.1",
    }
    async with relay_processes(
        2, comfyui_url=trio[0].url, redis_url=redis_server.url, folder=tmp_path, **settings
    ) as relays:
        tabs = [RoamingTab("eve", relays, n) for n in range(2)]
        for tab in tabs:
            await tab.connect()
        async with httpx.AsyncClient(base_url=relays[0].url, timeout=30) as http:
            answers = [await send(http, long_graph(steps=120, delay=0.2), "eve") for _ in range(3)]
        assert len({answer["backend"] for answer in answers}) == 3
        watcher = tabs[0].tab
        assert watcher is not None
        for answer in answers:
            await watcher.wait_type("relay.progress", answer["prompt_id"])
        for relay in relays:
            await relay.stop()
            await relay.start()
        for tab in tabs:
            ended = await tab.until_each_done([answer["prompt_id"] for answer in answers])
            assert {(done["status"], done["recovered"]) for done in ended.values()} == {("success", False)}
        assert_unbroken(tabs)
        for emulator in trio:
            assert emulator.state.hub.peak["eve"] == 1
        for tab in tabs:
            await tab.close()


async def test_each_prompts_files_are_stored_from_the_backend_that_made_them(
    trio: list[RunningEmulator], s3_server: S3Server
) -> None:
    """Storage copies each prompt's files from its own backend: three prompts on three
    backends, files named alike, each stored object the bytes of the right backend's file."""
    prefix = f"pool-{uuid.uuid4().hex[:8]}"
    config = pooled(trio, **storage_settings(s3_server, prefix))
    async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        tab = await open_tab(relay.ws_url, "clientId=fay")
        bodies = [
            {"prompt": painting(seed, steps=200), "client_id": "fay", "extra_data": {"store": True}}
            for seed in (11, 12, 13)
        ]
        answers = [r.json() for r in await asyncio.gather(*(http.post("/prompt", json=b) for b in bodies))]
        assert len({answer["backend"] for answer in answers}) == 3
        by_name = {name_of(e): e for e in trio}
        contents = set()
        for answer in answers:
            (stored,) = await all_stored(tab, answer["prompt_id"])
            assert stored["state"] == "stored"
            kept = await obstore.get_async(bucket(s3_server), stored["key"])
            async with httpx.AsyncClient(base_url=by_name[answer["backend"]].url) as direct:
                made = await direct.get("/view", params={"filename": stored["filename"], "type": "output"})
            assert bytes(await kept.bytes_async()) == made.content
            contents.add(made.content)
        assert len(contents) == 3
        await tab.close()


async def test_an_upload_stored_under_different_names_is_a_conflict(
    relay: RunningRelay, http: httpx.AsyncClient, trio: list[RunningEmulator]
) -> None:
    """One backend already has another file by the upload's name, so it keeps the new one under
    another name: the relay says so (409, each backend's name) rather than answer with a name
    that means a different picture on that backend."""
    async with httpx.AsyncClient(base_url=trio[1].url) as direct:
        other = await direct.post(
            "/upload/image", files={"image": ("dog.png", b"not the same picture", "image/png")}
        )
    assert other.status_code == 200
    answer = await http.post("/upload/image", files={"image": ("dog.png", _png(), "image/png")})
    assert answer.status_code == 409
    error = answer.json()["error"]
    assert error["type"] == "upload_diverged"
    assert name_of(trio[1]) in error["message"]


async def test_calls_for_every_backend_reach_every_backend(
    relay: RunningRelay, http: httpx.AsyncClient, trio: list[RunningEmulator], comfyui_version: ComfyVersion
) -> None:
    """A global /interrupt stops what each backend runs; /queue clear empties every queue (the
    removed prompts end cancelled); /api/jobs lists the jobs of all, labelled; a history clear
    clears every backend's."""
    tab = await open_tab(relay.ws_url, "clientId=gus")
    answers = [await send(http, long_graph(steps=500, delay=0.2), "gus") for _ in range(6)]
    for answer in answers[:3]:
        await tab.wait_type("relay.started", answer["prompt_id"])
    if comfyui_version == "current":
        jobs = (await http.get("/api/jobs", params={"limit": "4"})).json()
        assert len(jobs["jobs"]) == 4
        assert jobs["pagination"]["total"] == 6
        assert {job["backend"] for job in jobs["jobs"]} <= {name_of(e) for e in trio}
    cleared = await http.post("/queue", json={"clear": True})
    assert cleared.status_code == 200
    for answer in answers[3:]:
        assert (await tab.wait_done(answer["prompt_id"]))["status"] == "cancelled"
    stopped = await http.post("/interrupt")
    assert stopped.status_code == 200
    for answer in answers[:3]:
        assert (await tab.wait_done(answer["prompt_id"]))["status"] == "interrupted"
    assert len((await http.get("/history")).json()) == 3  # the interrupted ones, one per backend
    assert (await http.post("/history", json={"clear": True})).status_code == 200
    for emulator in trio:
        async with httpx.AsyncClient(base_url=emulator.url) as direct:
            assert (await direct.get("/history")).json() == {}
    await tab.close()
