"""The relay with RELAY_REDIS_URL, against a real redis-server: a tab resumes across a restart.

A relay keeps each client's events in a Redis Stream as well as in its ring: after a restart
(a rolling update), a tab that reconnects with ``since`` and ``epoch`` gets exactly what it
missed, and numbering goes on where it stopped. Redis away: the relay still serves, says a
resume is not possible rather than leave a hole, and writes the events once Redis is back.
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any

import httpx

from relay.emulator import RunningEmulator
from relay.server import run_relay
from tests.conftest import relay_config
from tests.redis_server import RedisServer
from tests.relay_client import open_tab
from tests.tracekit import long_graph

TEXT2IMG = json.loads(resources.files("relay.emulator").joinpath("examples/text2img.json").read_text())


def sequenced(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] not in ("relay.hello", "relay.error", "relay.snapshot")]


async def submit(http: httpx.AsyncClient, client_id: str) -> str:
    answer = await http.post("/prompt", json={"prompt": TEXT2IMG, "client_id": client_id})
    assert answer.status_code == 200, answer.text
    prompt_id: str = answer.json()["prompt_id"]
    return prompt_id


async def test_a_tab_resumes_across_a_relay_restart(
    emulator: RunningEmulator, redis_server: RedisServer
) -> None:
    """Events said by the relay before it stopped are replayed by the next one, from where the
    tab left off to the end of the run, once each and in order; new events continue the count."""
    config = relay_config(emulator, redis_url=redis_server.url)
    async with run_relay(config) as first, httpx.AsyncClient(base_url=first.url, timeout=30) as http:
        watcher = await open_tab(first.ws_url, "clientId=roamer")
        leaver = await open_tab(first.ws_url, "clientId=roamer")
        hello = await leaver.wait_type("relay.hello")
        prompt_id = await submit(http, "roamer")
        await leaver.wait_type("relay.progress", prompt_id, count=3)
        await leaver.close()
        left_at = sequenced(leaver.events)[-1]["seq"]
        await watcher.wait_done(prompt_id)
        told = sequenced(watcher.events)
        await watcher.close()
    async with run_relay(config) as second, httpx.AsyncClient(base_url=second.url, timeout=30) as http:
        back = await open_tab(second.ws_url, f"clientId=roamer&since={left_at}&epoch={hello['epoch']}")
        again = await back.wait_type("relay.hello")
        assert (again["resumed"], again["epoch"]) == (True, hello["epoch"])
        await back.wait_done(prompt_id)
        expected = [e for e in told if e["seq"] > left_at]
        # Replayed: all of those, then whatever the new relay said before the tab joined (its
        # socket to ComfyUI opening...); every later event is live.
        assert again["missed"] >= len(expected)
        # The very same events, names and all, in order; then what the new relay says.
        assert sequenced(back.events)[: len(expected)] == expected
        second_run = await submit(http, "roamer")
        await back.wait_done(second_run)
        seqs = [e["seq"] for e in sequenced(back.events)]
        assert seqs == list(range(left_at + 1, left_at + 1 + len(seqs)))  # no restart at 1, no hole
        await back.close()


async def test_redis_away_means_no_resume_but_a_working_relay(
    emulator: RunningEmulator, redis_server: RedisServer
) -> None:
    """With Redis stopped a restarted relay cannot replay: the tab is told (resumed false), runs
    still go through, and their events reach Redis, under the new epoch, once it is back."""
    config = relay_config(emulator, redis_url=redis_server.url)
    async with run_relay(config) as first, httpx.AsyncClient(base_url=first.url, timeout=30) as http:
        tab = await open_tab(first.ws_url, "clientId=stoic")
        hello = await tab.wait_type("relay.hello")
        await tab.wait_done(await submit(http, "stoic"))
        left_at = sequenced(tab.events)[-1]["seq"]
        await tab.close()
    await redis_server.stop()
    async with run_relay(config) as second, httpx.AsyncClient(base_url=second.url, timeout=30) as http:
        back = await open_tab(second.ws_url, f"clientId=stoic&since={left_at - 3}&epoch={hello['epoch']}")
        again = await back.wait_type("relay.hello")
        assert again["resumed"] is False
        assert again["epoch"] != hello["epoch"]
        assert (await back.wait_done(await submit(http, "stoic")))["status"] == "success"
        await redis_server.start()
        client = redis_server.client()
        try:
            async with asyncio.timeout(20):  # until the writer, backing off up to 5 s, gets through
                while await client.xlen("relay:{stoic}:events") < len(sequenced(back.events)):
                    await asyncio.sleep(0.1)
            assert await client.get("relay:{stoic}:epoch") == again["epoch"]
        finally:
            await client.aclose()
        await back.close()


async def test_readiness_says_when_redis_is_away(
    emulator: RunningEmulator, redis_server: RedisServer
) -> None:
    """/readyz names Redis: reachable, then (Redis stopped) still ready, since the relay still
    relays, but degraded with the reason; and reachable again once Redis is back."""
    config = relay_config(emulator, redis_url=redis_server.url)
    async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        ready = (await http.get("/readyz")).json()
        assert (ready["status"], ready["redis"], "degraded" in ready) == ("ready", {"reachable": True}, False)
        await redis_server.stop()
        away = await http.get("/readyz")
        assert away.status_code == 200
        assert away.json()["degraded"] == ["redis_unreachable"]
        assert away.json()["redis"]["reachable"] is False
        tab = await open_tab(relay.ws_url, "clientId=steady")
        assert (await tab.wait_done(await submit(http, "steady")))["status"] == "success"
        await tab.close()
        await redis_server.start()
        back = (await http.get("/readyz")).json()
        assert back["redis"] == {"reachable": True}
        assert "degraded" not in back


async def test_an_accepted_prompt_is_in_redis_before_the_answer(
    emulator: RunningEmulator, redis_server: RedisServer
) -> None:
    """With Redis, POST /prompt answers once Redis has the prompt's record: a relay killed the
    moment after leaves it for the next one (found by tests/faults). Redis holds writes for a
    moment here (CLIENT PAUSE ... WRITE); reads go on, and show the record by the answer."""
    config = relay_config(emulator, redis_url=redis_server.url)
    redis = redis_server.client()
    try:
        async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
            tab = await open_tab(relay.ws_url, "clientId=durable")
            await tab.wait_type("relay.upstream")  # the lease is taken, the socket to ComfyUI open
            await redis.execute_command("CLIENT", "PAUSE", "600", "WRITE")
            answer = await http.post("/prompt", json={"prompt": long_graph(), "client_id": "durable"})
            assert answer.status_code == 200, answer.text
            prompt_id = answer.json()["prompt_id"]
            assert await redis.hexists("relay:{durable}:prompts", prompt_id)
            await tab.close()
    finally:
        await redis.aclose()
