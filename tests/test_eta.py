"""Time left (``eta``): absent before any data, close to the truth after a few runs, kept across restarts."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from relay.emulator import EmulatorConfig, RunningEmulator, run_emulator
from relay.emulator.config import ComfyVersion
from relay.eta import Durations
from relay.events import Done
from relay.observers import EtaKeeper
from relay.server import run_relay
from relay.translator import StepTiming
from tests.conftest import relay_config
from tests.redis_server import RedisServer
from tests.relay_client import Tab, open_tab

# Slow enough that the sampler's 20 steps take about a second, so 25% is a fair bar.
SPEED = 4.0


@pytest.fixture
async def steady_emulator(comfyui_version: ComfyVersion) -> AsyncIterator[RunningEmulator]:
    async with run_emulator(EmulatorConfig(port=0, speed=SPEED, comfyui_version=comfyui_version)) as emulator:
        yield emulator


async def run_once(http: httpx.AsyncClient, tab: Tab, seed: int) -> tuple[str, dict[str, Any]]:
    """One text2img run (a new seed: the sampler, decoder and saver run again; loaders are cached)."""
    response = await http.post(
        "/workflows/text2img/prompt", json={"client_id": "eta", "params": {"seed": seed, "steps": 20}}
    )
    assert response.status_code == 200, response.text
    prompt_id: str = response.json()["prompt_id"]
    return prompt_id, await tab.wait_done(prompt_id, timeout=60)


def timed(tab: Tab, prompt_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in tab.events
        if e.get("prompt_id") == prompt_id
        and (e["type"] == "relay.progress" or (e["type"] == "relay.step" and e["state"] == "running"))
    ]


async def test_eta_is_absent_first_then_close_to_the_truth_and_survives_a_restart(
    steady_emulator: RunningEmulator, tmp_path: Path
) -> None:
    eta_file = tmp_path / "durations.json"
    config = relay_config(steady_emulator, eta_file=str(eta_file))
    async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        tab = await open_tab(relay.ws_url, "clientId=eta")
        first, _ = await run_once(http, tab, 1)
        assert timed(tab, first)
        assert not [e for e in timed(tab, first) if "eta" in e]  # no data yet: no made-up eta
        for seed in (2, 3):
            await run_once(http, tab, seed)
        prompt_id, done = await run_once(http, tab, 4)
        checked = 0
        for event in timed(tab, prompt_id):
            assert "eta" in event, event
            actual = done["ts"] - event["ts"]
            if actual > 0.3:  # the last few hundredths are all scheduling noise
                assert abs(event["eta"] - actual) <= 0.25 * actual, (event, actual)
                checked += 1
        assert checked >= 10
        await tab.close()
    saved = orjson.loads(eta_file.read_bytes())
    sampler = saved["pipelines"]["text2img"]["3"]
    assert sampler["runs"] == 4
    assert sampler["per_iteration"] > 0

    # A new relay process reads what the last one learned: eta from the first run on.
    async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        tab = await open_tab(relay.ws_url, "clientId=eta")
        prompt_id, _ = await run_once(http, tab, 5)
        assert all("eta" in e for e in timed(tab, prompt_id))
        await tab.close()


def test_per_iteration_rates_scale_with_the_steps_asked_for(tmp_path: Path) -> None:
    durations = Durations(tmp_path / "d.json")
    durations.record("wf", "load", 3.0)
    durations.record("wf", "sample", 2.0, iterations=20)  # 0.1 s per step
    # 40 sampler steps to come, after the loader.
    assert durations.remaining("wf", [("load", None), ("sample", 40)], None) == 7.0
    # Half-way through a 40-step sampler: 2 s left; a loader that ran 1 s of its 3: 2 s left.
    assert durations.remaining("wf", [], ("sample", 5.0, 0.5, 40)) == 2.0
    assert durations.remaining("wf", [], ("load", 1.0, 0.0, None)) == 2.0
    # One step never seen: no estimate at all.
    assert durations.remaining("wf", [("load", None), ("decode", None)], None) is None
    assert durations.remaining("other", [("load", None)], None) is None
    # Moving average: a slower run moves the estimate part of the way.
    durations.record("wf", "load", 5.0)
    step = durations.step("wf", "load")
    assert step is not None
    assert 3.0 < step.seconds < 5.0
    durations.save()
    assert Durations(tmp_path / "d.json").step("wf", "load") == step


def test_an_unreadable_file_starts_afresh(tmp_path: Path) -> None:
    broken = tmp_path / "d.json"
    broken.write_text("{not json")
    durations = Durations(broken)
    assert durations.remaining("wf", [("x", None)], None) is None
    durations.record("wf", "x", 1.0)
    durations.save()
    assert Durations(broken).remaining("wf", [("x", None)], None) == 1.0


def test_old_pipelines_are_forgotten_past_the_cap(tmp_path: Path) -> None:
    """Every ad-hoc graph is a pipeline of its own: the file keeps the most recently used ones."""
    durations = Durations(tmp_path / "d.json")
    durations.record("keep", "x", 1.0)
    for number in range(300):
        durations.record(f"graph:{number}", "x", 1.0)
        if number == 200:
            durations.record("keep", "x", 1.0)  # used again: recent
    assert durations.step("keep", "x") is not None
    assert durations.step("graph:0", "x") is None
    assert durations.step("graph:299", "x") is not None
    durations.save()
    assert len(orjson.loads((tmp_path / "d.json").read_bytes())["pipelines"]) == 256


def done(prompt_id: str) -> Done:
    return Done(prompt_id, "success", 1.0, 1, 1, 100.0, {}, recovered=False)


async def test_eta_saves_are_batched_and_written_off_the_event_loop(tmp_path: Path) -> None:
    """A burst of finished prompts is one write; a prompt that ends during a write is one more;
    no write happens on the event loop's thread."""
    durations = Durations(tmp_path / "durations.json")
    keeper = EtaKeeper(durations)
    writing, release = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    write = durations.write

    def held_write(data: dict[str, Any]) -> bool:
        threads.append(threading.current_thread())
        writing.set()
        release.wait(timeout=30)
        return write(data)

    durations.write = held_write  # type: ignore[method-assign]
    for number in range(20):
        keeper.learned(StepTiming("wf", "sampler", 1.0 + number, None))
        keeper.published("c", done(f"p{number}"))
    await asyncio.to_thread(writing.wait, 30)  # the first save is under way, in a thread
    writing.clear()
    for number in range(20, 30):  # these end while it writes: they share one more save
        keeper.learned(StepTiming("wf", "sampler", 1.0 + number, None))
        keeper.published("c", done(f"p{number}"))
    release.set()
    await keeper.close()
    assert keeper.saves == 2
    assert threading.main_thread() not in threads
    saved = orjson.loads((tmp_path / "durations.json").read_bytes())
    assert saved["pipelines"]["wf"]["sampler"]["runs"] == 30


async def test_relays_share_what_they_learn_through_redis(redis_server: RedisServer) -> None:
    """Two relays' keepers on one Redis: a step one of them learned is known to the other after
    its next share (at a relay.done, or at start), and a relay's own fresher learning is not
    overwritten by the shared copy."""
    first_client, second_client = redis_server.client(), redis_server.client()
    try:
        first = EtaKeeper(Durations(), first_client)
        second = EtaKeeper(Durations(), second_client)
        first.learned(StepTiming("text2img", "3", 8.0, 20))
        await first.share()
        assert second.durations.step("text2img", "3") is None
        await second.share()
        shared = second.durations.step("text2img", "3")
        assert shared is not None
        assert (shared.seconds, shared.per_iteration, shared.runs) == (8.0, 0.4, 1)
        # The second relay learns more of the same step; the first one's old copy does not win.
        second.learned(StepTiming("text2img", "3", 4.0, 20))
        await first.share()
        await second.share()
        mine = second.durations.step("text2img", "3")
        assert mine is not None
        assert mine.runs == 2
        await first.share()
        theirs = first.durations.step("text2img", "3")
        assert theirs is not None
        assert (theirs.runs, theirs.seconds) == (2, mine.seconds)
    finally:
        await first_client.aclose()
        await second_client.aclose()
