"""Property-based fuzzing of the relay's input surfaces (hypothesis).

A relay and an emulated ComfyUI run for the whole module in a thread with its own event loop,
so that hypothesis drives them with plain blocking clients, example after example. The
``fast`` profile (the default, in ``make test``) tries a few dozen inputs per surface; ``make
fuzz`` selects ``long`` (HYPOTHESIS_PROFILE=long) for thousands.

A bystander, a client with a socket of its own, watches through every module: after the last
example it runs a prompt of its own, and must have seen that prompt end and nothing else, on a
socket that never closed. Whatever the fuzzing did, another client's stream was unaffected.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings

from relay.emulator import EmulatorConfig, RunningEmulator
from relay.server import RunningRelay
from tests.conftest import relay_config
from tests.relay_client import Tab, open_tab
from tests.tracekit import load_trace

# The guarded relay's token and the one page origin it lets in.
TOKEN = "fuzz-token-0123456789abcdef"
ALLOWED_ORIGIN = "https://app.example"

settings.register_profile(
    "fast", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


@dataclass
class Servers:
    """The relay and the emulator, running in their own loop; call :meth:`run` to act there."""

    relay: RunningRelay
    emulator: RunningEmulator
    loop: asyncio.AbstractEventLoop
    bystander: Tab
    token: str = ""

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def reached(self, path: str) -> list[str]:
        """Queries of the requests for ``path`` that got to ComfyUI (a copy, taken in its loop)."""

        async def copy() -> list[str]:
            return [query for _, seen, query, _ in self.emulator.state.requests if seen == path]

        result: list[str] = self.run(copy())
        return result

    def healthy(self) -> bool:
        return httpx.get(f"{self.relay.url}/healthz", timeout=10).status_code == 200


async def _check_bystander(running: Servers) -> None:
    """The bystander runs a prompt of its own: it must end, and be all the bystander saw."""
    tab = running.bystander
    headers = {"Authorization": f"Bearer {running.token}"} if running.token else {}
    async with httpx.AsyncClient(base_url=running.relay.url, headers=headers, timeout=30) as http:
        body = {"prompt": load_trace("01").workflow(), "client_id": "bystander"}
        answer = await http.post("/prompt", json=body)
        assert answer.status_code == 200, answer.text
        prompt_id = answer.json()["prompt_id"]
    await tab.wait_done(prompt_id, timeout=60)
    assert not tab.closed.is_set()
    strangers = [e for e in tab.events if e.get("prompt_id") not in (None, prompt_id)]
    assert not strangers, strangers[:3]
    assert {e.get("client_id") for e in tab.events} <= {None, "bystander"}
    await tab.close()


def _serve(**overrides: Any) -> Iterator[Servers]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-servers", daemon=True)
    thread.start()
    token = str(overrides.get("token", ""))

    async def start() -> Servers:
        emulator = RunningEmulator(EmulatorConfig(port=0, speed=50))
        await emulator.start()
        relay = RunningRelay(relay_config(emulator, max_http_requests=10_000, **overrides))
        await relay.start()
        query = "clientId=bystander" + (f"&token={token}" if token else "")
        bystander = await open_tab(relay.ws_url, query)
        await bystander.wait_type("relay.hello")
        return Servers(relay, emulator, loop, bystander, token)

    started: Future[Servers] = asyncio.run_coroutine_threadsafe(start(), loop)
    running = started.result(60)
    try:
        yield running
        running.run(_check_bystander(running))
    finally:

        async def stop() -> None:
            await running.relay.stop()
            await running.emulator.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """A relay with the defaults: no token, same-origin pages only."""
    yield from _serve()


@pytest.fixture(scope="module")
def guarded() -> Iterator[Servers]:
    """A relay with a token and one allowed page origin."""
    yield from _serve(token=TOKEN, allowed_origins=ALLOWED_ORIGIN)
