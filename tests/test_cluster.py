"""Several relay processes sharing a real redis-server, in front of the emulator.

Each client is held by one relay (its ComfyUI socket, its events) and followed by the others;
a tab can be on any relay and move between them. What every test checks in the end: each tab
saw the run's events once each, in order, with no hole (``seq`` runs on by one across every
reconnection), the run ended with its true result, and ComfyUI never had two sockets open for
the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from relay.emulator import EmulatorConfig, RunningEmulator, run_emulator
from tests.redis_server import RedisServer
from tests.relay_client import Event, Tab, open_tab
from tests.relay_processes import RelayProcess, relay_processes

TEXT2IMG = json.loads(resources.files("relay.emulator").joinpath("examples/text2img.json").read_text())
# Not part of a client's numbered stream: greetings, errors, and the snapshots a tab gets
# instead of a replay.
_UNNUMBERED = ("relay.hello", "relay.error", "relay.snapshot")


def graph(steps: int) -> dict[str, Any]:
    """The example graph with a sampler of ``steps`` steps: a run that lasts."""
    prompt = copy.deepcopy(TEXT2IMG)
    prompt["3"]["inputs"]["steps"] = steps
    return prompt


@pytest.fixture
async def comfyui() -> AsyncIterator[RunningEmulator]:
    async with run_emulator(EmulatorConfig(port=0, speed=8.0)) as emulator:
        yield emulator


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = redis_server.client()
    try:
        yield client
    finally:
        await client.aclose()


async def holder(redis: Redis, relays: Sequence[RelayProcess], client_id: str) -> RelayProcess:
    """The relay holding the client's lease (waiting for one to hold it)."""
    async with asyncio.timeout(20):
        while True:
            token = await redis.get(f"relay:lease:{{{client_id}}}")
            if token is not None:
                url = await redis.get(f"relay:replica:{token.rpartition(':')[0]}")
                for relay in relays:
                    if relay.url == url:
                        return relay
            await asyncio.sleep(0.05)


async def submit(relay: RelayProcess, client_id: str, steps: int) -> str:
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        answer = await http.post("/prompt", json={"prompt": graph(steps), "client_id": client_id})
    assert answer.status_code == 200, answer.text
    prompt_id: str = answer.json()["prompt_id"]
    return prompt_id


class RoamingTab:
    """A browser tab that, when its relay goes away, resumes on another (``since`` + ``epoch``),
    as the bundled client does; its events are gathered across every socket it had."""

    def __init__(self, client_id: str, relays: Sequence[RelayProcess], start: int) -> None:
        self.client_id = client_id
        self.relays = relays
        self.at = start
        self.numbered: list[Event] = []
        self.hellos: list[Event] = []
        self.closes: list[int | None] = []
        self.tab: Tab | None = None
        self.epoch: str | None = None

    @property
    def relay(self) -> RelayProcess:
        return self.relays[self.at % len(self.relays)]

    def seqs(self) -> list[int]:
        return [event["seq"] for event in self.numbered]

    async def connect(self) -> None:
        query = f"clientId={self.client_id}"
        if self.numbered and self.epoch is not None:
            query += f"&since={self.numbered[-1]['seq']}&epoch={self.epoch}"
        while True:
            try:
                self.tab = await open_tab(self.relay.ws_url, query)
                break
            except (OSError, websockets.InvalidHandshake):
                self.at += 1  # that relay is down: the next one
        hello = await self.tab.wait_type("relay.hello")
        self.hellos.append(hello)
        assert hello["resumed"] or not self.numbered, f"a resume was refused: {hello}"
        self.epoch = hello["epoch"]

    async def until_done(self, prompt_id: str) -> Event:
        """Read, moving to the next relay whenever the socket closes, until the prompt is done."""
        return (await self.until_each_done([prompt_id]))[prompt_id]

    async def until_each_done(self, prompt_ids: Sequence[str]) -> dict[str, Event]:
        """Read, moving to the next relay whenever the socket closes, until every prompt is done."""
        read = 0
        ended: dict[str, Event] = {}
        while True:
            assert self.tab is not None
            tab = self.tab
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await tab.closed.wait()
            fresh = [e for e in tab.events[read:] if e["type"] not in _UNNUMBERED]
            read = len(tab.events)
            self.numbered += fresh
            ended.update(
                (e["prompt_id"], e)
                for e in fresh
                if e["type"] == "relay.done" and e["prompt_id"] in prompt_ids
            )
            if len(ended) == len(prompt_ids):
                return ended
            if tab.closed.is_set():
                self.closes.append(tab.close_code)
                self.at += 1
                read = 0
                await self.connect()

    async def close(self) -> None:
        if self.tab is not None:
            await self.tab.close()


@contextlib.asynccontextmanager
async def tabs_on_every_relay(
    count: int, client_id: str, comfyui: RunningEmulator, redis_server: RedisServer, folder: Path
) -> AsyncIterator[tuple[list[RelayProcess], list[RoamingTab]]]:
    """``count`` relays, and a tab of ``client_id`` connected to each; the tabs closed after."""
    async with relay_processes(
        count, comfyui_url=comfyui.url, redis_url=redis_server.url, folder=folder
    ) as relays:
        tabs = [RoamingTab(client_id, relays, n) for n in range(count)]
        for tab in tabs:
            await tab.connect()
        try:
            yield relays, tabs
        finally:
            for tab in tabs:
                await tab.close()


def assert_unbroken(tabs: Sequence[RoamingTab]) -> None:
    """Every tab: seq rises by one from its first event to its last; all tabs saw the same."""
    for tab in tabs:
        seqs = tab.seqs()
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"hole or repeat: {seqs}"
    last = min(tab.seqs()[-1] for tab in tabs)
    first = max(tab.seqs()[0] for tab in tabs)
    common = [[e for e in tab.numbered if first <= e["seq"] <= last] for tab in tabs]
    for other in common[1:]:
        assert [(e["seq"], e["type"]) for e in other] == [(e["seq"], e["type"]) for e in common[0]]


async def test_tabs_on_every_replica_see_one_run_once_in_order(
    comfyui: RunningEmulator, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """Three relays, a tab of one client on each: the run is submitted through a relay that
    does not hold the client (it passes the request on), and every tab sees every step once,
    in order; ComfyUI had one socket for the client."""
    async with tabs_on_every_relay(3, "crew", comfyui, redis_server, tmp_path) as (relays, tabs):
        owner = await holder(redis, relays, "crew")
        other = next(relay for relay in relays if relay is not owner)
        prompt_id = await submit(other, "crew", steps=12)
        results = [await tab.until_done(prompt_id) for tab in tabs]
        assert {result["status"] for result in results} == {"success"}
        assert_unbroken(tabs)
        steps = [e for e in tabs[0].numbered if e["type"] == "relay.step" and e["state"] == "done"]
        assert [e["index"] for e in steps] == list(range(1, len(steps) + 1))
        assert len(steps) == results[0]["total"]
        assert comfyui.state.hub.peak["crew"] == 1
        assert [tab.closes for tab in tabs] == [[]] * 3


async def test_killing_the_holder_mid_run_loses_nothing(
    comfyui: RunningEmulator, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """SIGKILL the relay holding the client while its prompt runs: another relay takes the
    client over, the run still ends with its true result on every tab, and the tab that was
    on the killed relay resumes elsewhere with no hole and no repeat."""
    async with tabs_on_every_relay(3, "keel", comfyui, redis_server, tmp_path) as (relays, tabs):
        owner = await holder(redis, relays, "keel")
        prompt_id = await submit(owner, "keel", steps=60)
        watcher = tabs[(relays.index(owner) + 1) % 3].tab
        assert watcher is not None
        await watcher.wait_type("relay.progress", prompt_id, count=3)
        await owner.kill()
        results = [await tab.until_done(prompt_id) for tab in tabs]
        async with httpx.AsyncClient(base_url=comfyui.url) as http:
            truth = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]["status"]["status_str"]
        assert {result["status"] for result in results} == {"success"} == {truth}
        assert all(result["outputs"] for result in results)
        assert_unbroken(tabs)
        assert await holder(redis, relays, "keel") is not owner
        assert comfyui.state.hub.peak["keel"] == 1


async def test_a_rolling_restart_during_a_run(
    comfyui: RunningEmulator, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """Every relay restarted in turn (SIGTERM, start again) while a run goes on: the client
    changes hands cleanly, its progress keeps coming live, and every tab sees the whole run."""
    async with tabs_on_every_relay(3, "tide", comfyui, redis_server, tmp_path) as (relays, tabs):
        prompt_id = await submit(relays[0], "tide", steps=120)
        watcher = tabs[0].tab
        assert watcher is not None
        await watcher.wait_type("relay.progress", prompt_id)
        for relay in relays:
            await relay.stop()
            await relay.start()
        results = [await tab.until_done(prompt_id) for tab in tabs]
        assert {result["status"] for result in results} == {"success"}
        assert all(result["recovered"] is False for result in results)  # followed live to the end
        assert_unbroken(tabs)
        assert comfyui.state.hub.peak["tide"] == 1


async def test_redis_restarted_mid_run(
    comfyui: RunningEmulator, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis stopped and started empty while a run goes on: the tab on the holding relay keeps
    getting progress, the run ends on every tab, and no tab sees a hole or an event twice (the
    holder writes what Redis missed once it is back; the follower resumes from there)."""
    async with tabs_on_every_relay(2, "gale", comfyui, redis_server, tmp_path) as (relays, tabs):
        client = redis_server.client()
        try:
            owner = await holder(client, relays, "gale")
        finally:
            await client.aclose()
        prompt_id = await submit(owner, "gale", steps=80)
        watcher = tabs[relays.index(owner)].tab
        assert watcher is not None
        await watcher.wait_type("relay.progress", prompt_id, count=2)
        await redis_server.stop()
        before = len(watcher.events)
        await watcher.wait_for(
            lambda e: e["type"] == "relay.progress", count=len(watcher.of("relay.progress")) + 3
        )
        assert len(watcher.events) > before  # progress goes on with Redis away
        await redis_server.start()
        results = [await tab.until_done(prompt_id) for tab in tabs]
        assert {result["status"] for result in results} == {"success"}
        assert_unbroken(tabs)
        assert comfyui.state.hub.peak["gale"] == 1


async def test_resume_on_another_replica(
    comfyui: RunningEmulator, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A tab leaves one relay mid-run and comes back on another with since and epoch: it gets
    exactly what it missed, then the rest live."""
    async with relay_processes(
        2, comfyui_url=comfyui.url, redis_url=redis_server.url, folder=tmp_path
    ) as relays:
        watcher = RoamingTab("wren", relays, 0)
        await watcher.connect()
        leaver = await open_tab(relays[0].ws_url, "clientId=wren")
        hello = await leaver.wait_type("relay.hello")
        prompt_id = await submit(relays[1], "wren", steps=30)
        await leaver.wait_type("relay.progress", prompt_id, count=3)
        await leaver.close()
        left_at = [e for e in leaver.events if e["type"] not in _UNNUMBERED][-1]["seq"]
        await watcher.until_done(prompt_id)
        back = await open_tab(relays[1].ws_url, f"clientId=wren&since={left_at}&epoch={hello['epoch']}")
        again = await back.wait_type("relay.hello")
        assert (again["resumed"], again["epoch"]) == (True, hello["epoch"])
        await back.wait_done(prompt_id)
        missed = [e for e in watcher.numbered if e["seq"] > left_at]
        assert [e for e in back.events if e["type"] not in _UNNUMBERED][: len(missed)] == missed
        await back.close()
        await watcher.close()


async def test_comfyui_frames_reach_raw_tabs_on_a_following_replica(
    comfyui: RunningEmulator, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """A tab with events=all on a relay that does not hold the client still gets ComfyUI's own
    frames of the client's run (text and binary previews), and none of another client's."""
    async with relay_processes(
        2, comfyui_url=comfyui.url, redis_url=redis_server.url, folder=tmp_path
    ) as relays:
        watcher = RoamingTab("moss", relays, 0)
        await watcher.connect()
        owner = await holder(redis, relays, "moss")
        follower = next(relay for relay in relays if relay is not owner)
        raw = await open_tab(follower.ws_url, "clientId=moss&events=all")
        await raw.wait_type("relay.hello")
        stranger = await open_tab(owner.ws_url, "clientId=stranger")
        await stranger.wait_type("relay.hello")
        # The holder learns that a follower wants raw frames at its next tick, which comes long
        # before this run's end.
        other_run = await submit(owner, "stranger", steps=10)
        prompt_id = await submit(owner, "moss", steps=40)
        await watcher.until_done(prompt_id)
        await stranger.wait_done(other_run)

        def comfy(kind: str) -> list[dict[str, Any]]:
            texts = [json.loads(f) for f in raw.raw if isinstance(f, str)]
            return [m for m in texts if m.get("type") == kind]

        def finished(frame: str | bytes) -> bool:
            message = json.loads(frame) if isinstance(frame, str) else {}
            return message.get("type") == "execution_success" and message["data"]["prompt_id"] == prompt_id

        await raw.wait_raw(finished)
        assert [m for m in comfy("progress") if m["data"]["prompt_id"] == prompt_id]
        assert any(isinstance(frame, bytes) for frame in raw.raw)  # previews, as ComfyUI sent them
        seen = {m["data"].get("prompt_id") for m in comfy("executing") + comfy("progress")}
        assert other_run not in seen
        for tab in (raw, stranger):
            await tab.close()
        await watcher.close()


async def test_a_request_passed_on_keeps_its_rights_and_loses_nothing(
    comfyui: RunningEmulator, redis_server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """With a token and the origin rules on, a browser's POST /prompt to a relay that does not
    hold the client (token in the URL, the page's own origin) is served by the holder: the
    relay passing it on vouches for it. A request with no token is still refused, by the first."""
    token = "s3cret-token-for-the-test"
    async with relay_processes(
        2, comfyui_url=comfyui.url, redis_url=redis_server.url, folder=tmp_path, RELAY_TOKEN=token
    ) as relays:
        tab = await open_tab(relays[0].ws_url, f"clientId=gate&token={token}")
        await tab.wait_type("relay.hello")
        owner = await holder(redis, relays, "gate")
        other = next(relay for relay in relays if relay is not owner)
        body = {"prompt": graph(4), "client_id": "gate"}
        async with httpx.AsyncClient(base_url=other.url, timeout=30) as http:
            refused = await http.post("/prompt", json=body)
            answer = await http.post(f"/prompt?token={token}", json=body, headers={"Origin": other.url})
        assert refused.status_code == 401
        assert answer.status_code == 200, answer.text
        done = await tab.wait_done(answer.json()["prompt_id"])
        assert done["status"] == "success"
        await tab.close()
