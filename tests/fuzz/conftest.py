"""Property-based fuzzing of the relay's input surfaces (hypothesis).

A relay and an emulated ComfyUI run for the whole module in a thread with its own event loop,
so that hypothesis drives them with plain blocking clients, example after example. The
``fast`` profile (the default, in ``make test``) tries a few dozen inputs per surface; ``make
fuzz`` selects ``long`` (HYPOTHESIS_PROFILE=long) for thousands.
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


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-servers", daemon=True)
    thread.start()

    async def start() -> Servers:
        emulator = RunningEmulator(EmulatorConfig(port=0, speed=50))
        await emulator.start()
        relay = RunningRelay(relay_config(emulator, max_http_requests=10_000))
        await relay.start()
        return Servers(relay, emulator, loop)

    started: Future[Servers] = asyncio.run_coroutine_threadsafe(start(), loop)
    running = started.result(60)
    try:
        yield running
    finally:

        async def stop() -> None:
            await running.relay.stop()
            await running.emulator.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
