"""Shared fixtures: an in-process emulator on port 0 and a recording client session."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from relay.config import RelayConfig
from relay.emulator import EmulatorConfig, RunningEmulator, run_emulator
from relay.emulator.config import PROFILES, ComfyVersion
from relay.server import RunningRelay, run_relay
from tests.driver import Session, open_session

# A real redis-server on a free port for the tests that ask for ``redis_server``.
pytest_plugins = ["tests.redis_server", "tests.s3_server"]

# Where tests/test_browser.py saves its screenshots of the progress page.
SCREENSHOTS = Path(os.environ.get("RELAY_SCREENSHOTS", Path(__file__).parents[1] / "build" / "screenshots"))

# Fast enough for a quick suite, slow enough that a 0.2 s probe step (10 ms here) still
# leaves room for an interrupt between two steps.
TEST_SPEED = 20.0


@pytest.fixture(params=PROFILES)
def comfyui_version(request: pytest.FixtureRequest) -> ComfyVersion:
    """Every test on an emulator runs against each ComfyUI the relay supports (docs/emulator.md).
    The contract tests, held to the 0.3.64 recordings, override it."""
    version: ComfyVersion = request.param
    return version


@pytest.fixture
def emulator_config(comfyui_version: ComfyVersion) -> EmulatorConfig:
    """Override in a test module to start the emulator with other flags."""
    return EmulatorConfig(port=0, speed=TEST_SPEED, comfyui_version=comfyui_version)


@pytest.fixture
async def emulator(emulator_config: EmulatorConfig) -> AsyncIterator[RunningEmulator]:
    async with run_emulator(emulator_config) as running:
        yield running


@pytest.fixture
async def session(emulator: RunningEmulator) -> AsyncIterator[Session]:
    async with open_session(emulator.url) as current:
        yield current


@pytest.fixture
async def slow_session() -> AsyncIterator[Session]:
    """An emulator at x2 (0.3.64, for the contract tests): slow enough to act in the middle of a run."""
    async with (
        run_emulator(EmulatorConfig(port=0, speed=2, comfyui_version="0.3.64")) as emulator,
        open_session(emulator.url) as current,
    ):
        yield current


def relay_config(emulator: RunningEmulator, **overrides: object) -> RelayConfig:
    """A relay in front of the test emulator, with short timers so tests do not wait."""
    settings: dict[str, object] = {
        "comfyui_url": emulator.url,
        "port": 0,
        "upstream_grace": 0.5,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.5,
        "stall_check_interval": 2.0,
        "upstream_connect_timeout": 3.0,
        "eta_file": "",  # learned durations in memory only: tests start from nothing
        **overrides,
    }
    return RelayConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def relay(emulator: RunningEmulator) -> AsyncIterator[RunningRelay]:
    async with run_relay(relay_config(emulator)) as running:
        yield running


@pytest.fixture
async def relay_http(relay: RunningRelay) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        yield http


def pytest_report_header() -> str:
    """Name the Chromium the browser tests drive: a newer one has laid the page out differently before."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return "chromium: not installed (the browser tests skip)"
    found = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return f"chromium: {found.stdout.strip() or 'version unknown'} ({chromium})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say where the browser tests left their screenshots."""
    if SCREENSHOTS.is_dir() and any(SCREENSHOTS.glob("*.png")):
        terminalreporter.write_line(f"screenshots of the progress page: {SCREENSHOTS}")
