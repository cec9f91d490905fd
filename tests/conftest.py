"""Shared fixtures: an in-process emulator on port 0 and a recording client session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from relay.emulator import EmulatorConfig, RunningEmulator, run_emulator
from tests.driver import Session

# Fast enough for a quick suite, slow enough that a 0.2 s probe step (10 ms here) still
# leaves room for an interrupt between two steps.
TEST_SPEED = 20.0


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    """Override in a test module to start the emulator with other flags."""
    return EmulatorConfig(port=0, speed=TEST_SPEED)


@pytest.fixture
async def emulator(emulator_config: EmulatorConfig) -> AsyncIterator[RunningEmulator]:
    async with run_emulator(emulator_config) as running:
        yield running


@pytest.fixture
async def session(emulator: RunningEmulator) -> AsyncIterator[Session]:
    async with httpx.AsyncClient(base_url=emulator.url, timeout=30) as http:
        current = Session(emulator.url, http)
        try:
            yield current
        finally:
            await current.close()
