"""The progress page in a real headless Chromium, against the relay and the emulator.

Chromium comes from Debian's packages (``scripts/install-browser.sh``, run by ``make test``);
Playwright drives it. Screenshots of the page go to ``build/screenshots`` (or
``RELAY_SCREENSHOTS``), printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.emulator import EmulatorConfig, RunningEmulator
from relay.emulator.config import ComfyVersion
from relay.emulator.images import encode, generated_art
from relay.server import RunningRelay, run_relay
from tests.conftest import SCREENSHOTS, relay_config
from tests.relay_client import open_tab
from tests.s3_server import S3Server
from tests.test_emulator_cli import free_port
from tests.test_storage import storage_settings

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed and could not be (scripts/install-browser.sh)"
)

# As a root process in a container, with no network beyond localhost.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).parents[1]
PORTRAIT = json.loads((ROOT / "workflows" / "portrait_mode.json").read_text())
PORTRAIT_NAMES = sorted(texts["ko"] for texts in PORTRAIT["steps"].values())
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def emulator_config(comfyui_version: ComfyVersion) -> EmulatorConfig:
    # Slow enough to watch a run, reload in its middle and cancel what waits behind it.
    return EmulatorConfig(port=0, speed=2, comfyui_version=comfyui_version)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


class Page:
    """One browser page on the relay, with the errors its scripts raised."""

    def __init__(self, page: Any, base: str) -> None:
        self.page = page
        self.base = base
        self.errors: list[str] = []
        # Uncaught script errors (a refused socket while the relay is away is logged, not thrown).
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    @classmethod
    async def open(
        cls, browser: Any, relay: RunningRelay, *, viewport: dict[str, int] = DESKTOP, path: str = "/"
    ) -> Page:
        context = await browser.new_context(viewport=viewport, locale="ko-KR")
        page = cls(await context.new_page(), relay.url)
        await page.page.goto(relay.url + path)
        await page.page.wait_for_selector("#workflow option[value=portrait_mode]", state="attached")
        await page.page.wait_for_selector('#connection[data-state="connected"]')
        return page

    async def until(self, expression: str, timeout: float = 30.0) -> None:
        """Poll ``expression`` in the page until truthy (the page's CSP forbids wait_for_function's eval)."""
        async with asyncio.timeout(timeout):
            while not await self.page.evaluate(expression):
                await asyncio.sleep(0.05)

    async def submit(self, seed: int) -> str:
        """Submit portrait_mode with this seed from the form; the prompt id the page follows."""
        await self.page.select_option("#workflow", "portrait_mode")
        await self.page.fill("#param-seed", str(seed))
        await self.page.click("#submit")
        await self.until("Boolean(document.querySelector('#run').dataset.promptId)")
        prompt_id: str = await self.page.eval_on_selector("#run", "run => run.dataset.promptId")
        return prompt_id

    async def steps(self) -> list[dict[str, str]]:
        steps: list[dict[str, str]] = await self.page.eval_on_selector_all(
            "#steps li",
            "items => items.map(li => ({state: li.dataset.state,"
            " index: li.querySelector('.index').textContent, name: li.querySelector('.name').textContent}))",
        )
        return steps

    async def running_index(self, at_least: int) -> None:
        await self.until(
            "(() => { const li = document.querySelector('#steps li[data-state=\"running\"] .index');"
            f" return Boolean(li) && Number(li.textContent) >= {at_least}; }})()"
        )

    async def done(self, timeout: float = 60_000) -> str:
        await self.page.wait_for_selector('#run[data-phase="done"]', timeout=timeout)
        status: str = await self.page.eval_on_selector("#run", "run => run.dataset.status")
        return status

    async def shot(self, name: str) -> None:
        await asyncio.to_thread(SCREENSHOTS.mkdir, parents=True, exist_ok=True)
        await self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    async def result_loaded(self) -> None:
        await self.until(
            "(() => { const img = document.querySelector('#results img');"
            " return Boolean(img) && img.complete && img.naturalWidth > 0; })()"
        )


async def learn_portrait_durations(relay: RunningRelay) -> None:
    """One portrait_mode run through the relay's API, for it to learn step durations from."""
    tab = await open_tab(relay.ws_url, "clientId=warm-up")
    async with httpx.AsyncClient(base_url=relay.url) as http:
        answer = await http.post(
            "/workflows/portrait_mode/prompt", json={"client_id": "warm-up", "params": {"seed": 100}}
        )
    assert (await tab.wait_done(answer.json()["prompt_id"], timeout=60))["status"] == "success"
    await tab.close()


async def test_portrait_run_step_by_step(browser: Any, relay: RunningRelay) -> None:
    """Submit portrait_mode: the list advances to 16/16 named steps, percent only rises, the image shows."""
    await learn_portrait_durations(relay)  # so the run has an ETA to show
    page = await Page.open(browser, relay)
    await page.shot("1-start")
    await page.submit(seed=101)
    percents: list[float] = []
    current: list[str] = []

    async def sample() -> None:
        while True:
            text = await page.page.text_content("#percent")
            percents.append(float((text or "0").rstrip("%")))
            current.append(await page.page.text_content("#current") or "")
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    await page.running_index(14)  # the sampler, with its live preview
    await page.page.wait_for_selector("#preview:not([hidden]) img")
    await page.until("document.querySelector('#timing').textContent.includes('남은 시간')")
    await page.shot("2-mid-run")
    assert await page.done() == "success"
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    # The last sample may predate the end by one poll: read the final figure itself.
    percents.append(float((await page.page.text_content("#percent") or "0").rstrip("%")))
    await page.result_loaded()
    await page.shot("3-done")

    steps = await page.steps()
    assert [s["index"] for s in steps] == [str(i) for i in range(1, 17)]
    assert sorted(s["name"] for s in steps) == PORTRAIT_NAMES
    # The warm-up run left the model loaders in ComfyUI's cache: they come first, as cached.
    assert {s["state"] for s in steps} == {"done", "cached"}
    assert percents == sorted(percents)
    assert percents[-1] == 100.0
    assert len(set(percents)) > 3  # it moved in steps, not straight from 0 to 100
    assert any(text.startswith("[14/16]") and "20/20" not in text for text in current)
    assert page.errors == []


# Phone widths the page must fit: small Android phones, the common 360 px, and iPhones.
PHONE_WIDTHS = (320, 360, 390)
# Long unbroken text a user can put on the page: a photo's file name and a client id (64 is the
# longest the page accepts).
LONG_FILE_NAME = "IMG_20261202_183005_" + "HDR_portrait_edit_final_v2_" * 4 + ".png"
LONG_CLIENT_ID = "team-kiosk-" + "0123456789abcdef" * 3 + "ffff-x"

# What makes the page wider than its window. Each element that paints is hidden in turn, deepest
# first, and the ones whose absence narrows the page are named by a CSS path with their width:
# the element to fix, not the page-wide symptom. Only run when the page does overflow.
OVERFLOW_REPORT = """() => {
  const root = document.documentElement;
  const overflow = () => root.scrollWidth - root.clientWidth;
  const before = overflow();
  if (before <= 0) return { overflow: before, culprits: [] };
  const path = (el) => {
    const parts = [];
    for (let node = el; node && node !== document.body; node = node.parentElement) {
      if (node.id) { parts.unshift("#" + CSS.escape(node.id)); break; }
      let part = node.tagName.toLowerCase() + [...node.classList].map((c) => "." + CSS.escape(c)).join("");
      const same = [...node.parentElement.children].filter((s) => s.tagName === node.tagName);
      if (same.length > 1) part += `:nth-of-type(${same.indexOf(node) + 1})`;
      parts.unshift(part);
    }
    return parts.join(" > ");
  };
  const found = [];
  for (const el of [...document.body.querySelectorAll("*")].reverse()) {
    if (!el.getClientRects().length || found.some((f) => el.contains(f.el))) continue;
    const box = el.getBoundingClientRect();
    const display = el.style.getPropertyValue("display");
    const priority = el.style.getPropertyPriority("display");
    el.style.setProperty("display", "none", "important");
    const after = overflow();
    el.style.setProperty("display", display, priority);
    if (after < before) found.push({ el, gain: before - after, width: box.width, right: box.right });
  }
  found.sort((a, b) => b.gain - a.gain);
  return {
    overflow: before,
    culprits: found.slice(0, 3).map((f) => ({
      selector: path(f.el), width: Math.round(f.width), right: Math.round(f.right), gain: f.gain,
    })),
  };
}"""


async def assert_fits_phones(page: Page, moment: str) -> None:
    """At every phone width, the page is no wider than the window; else name what widens it."""
    for width in PHONE_WIDTHS:
        await page.page.set_viewport_size({"width": width, "height": PHONE["height"]})
        report = await page.page.evaluate(OVERFLOW_REPORT)
        if report["overflow"] > 0:
            lang = await page.page.get_attribute("html", "lang")
            named = "; ".join(
                f"{c['selector']} ({c['width']} px wide, right edge at {c['right']} px,"
                f" hiding it narrows the page by {c['gain']} px)"
                for c in report["culprits"]
            )
            raise AssertionError(
                f"{moment}, {lang}, {width} px: the page is {report['overflow']} px wider than the"
                f" window; {named or 'no single element accounts for it'}"
            )


@pytest.mark.parametrize("lang", ["ko", "en"])
async def test_phone_layout(browser: Any, relay: RunningRelay, lang: str, tmp_path: Path) -> None:
    """At 320, 360 and 390 px, in Korean and English, at start, mid-run and done, nothing is wider than
    the screen, a long file name and client id included; the language switch gives English names."""
    page = await Page.open(browser, relay, viewport=PHONE, path=f"/?clientId={LONG_CLIENT_ID}")
    if lang == "en":
        await page.page.click("#lang-toggle")
        await page.page.wait_for_selector('html[lang="en"]', state="attached")
        await page.page.wait_for_selector('#connection[data-state="connected"]')
        await page.page.wait_for_selector("#workflow option[value=portrait_mode]", state="attached")
        assert await page.page.text_content("#submit") == "Generate"
    await page.page.select_option("#workflow", "portrait_mode")
    await assert_fits_phones(page, "start")
    photo = tmp_path / LONG_FILE_NAME
    photo.write_bytes(encode(generated_art(96, 128, seed=5, text="me"), "PNG"))
    await page.page.set_input_files("#param-image", photo)
    assert await page.page.text_content("#param-image-name") == LONG_FILE_NAME
    await assert_fits_phones(page, "a photo chosen")

    await page.page.set_viewport_size(PHONE)
    prompt_id = await page.submit(seed=202)
    await page.running_index(14)  # the sampler: its mini bar and the live preview
    await page.page.wait_for_selector("#preview:not([hidden]) img")
    await assert_fits_phones(page, "mid-run")
    assert await page.done() == "success"
    await page.result_loaded()
    await page.page.wait_for_selector(f'#queue-history li[data-prompt-id="{prompt_id}"]')
    running = await page.page.text_content("#queue-running")
    assert running == {"ko": "없음", "en": "Nothing"}[lang]
    await assert_fits_phones(page, "done")
    await page.page.set_viewport_size(PHONE)
    await page.shot(f"4-phone-done-{lang}")
    names = sorted(s["name"] for s in await page.steps())
    assert names == sorted(texts[lang] for texts in PORTRAIT["steps"].values())
    assert page.errors == []


async def test_phone_layout_wraps_long_unbroken_text(browser: Any, relay: RunningRelay) -> None:
    """Every place a name, id, file name or error text shows takes a long unbroken string without
    widening the page: it wraps or is cut with an ellipsis."""
    page = await Page.open(browser, relay, viewport=PHONE)
    prompt_id = await page.submit(seed=203)
    assert await page.done() == "success"
    await page.page.wait_for_selector(f'#queue-history li[data-prompt-id="{prompt_id}"]')
    long_word = "🚀" + "Sampler_Custom_Advanced_" * 12 + prompt_id
    slots = [
        "#run-title",
        "#run-status",
        "#steps li:nth-child(3) .name",
        "#steps li:nth-child(3) .duration",
        "#results a",
        "#queue-history li .what",
        "#workflow-description",
        "#param-image-name",
        "#client-label",
        "#connection .text",
        "#upstream .text",
        ".field .label",
        ".field .hint",
    ]
    for selector in slots:
        await page.page.eval_on_selector(selector, "(el, text) => { el.textContent = text; }", long_word)
    # The error box, with an exception's long line as ComfyUI reports it.
    await page.page.eval_on_selector(
        "#run-error",
        "(el, text) => { el.hidden = false; el.textContent = 'RuntimeError: ' + text; }",
        long_word,
    )
    await assert_fits_phones(page, "long text everywhere")
    assert page.errors == []


async def test_overflow_check_names_the_widening_element(browser: Any, relay: RunningRelay) -> None:
    """The phone check fails on an element wider than the screen and names that element and its width."""
    page = await Page.open(browser, relay, viewport=PHONE)
    await page.page.eval_on_selector(
        "#new-job",  # a card the page does not redraw
        """card => {
          const wide = document.createElement("div");
          wide.className = "too-wide";
          wide.style.setProperty("width", "700px");
          wide.style.setProperty("height", "2rem");  // an empty box of no height widens nothing
          card.append(wide);
        }""",
    )
    with pytest.raises(AssertionError) as failure:
        await assert_fits_phones(page, "injected")
    message = str(failure.value)
    assert "injected, ko, 320 px: the page is" in message
    named = message.split("window; ")[1]
    selector, width = named.split(" (", 1)
    assert width.startswith("700 px wide")
    # The path it gives leads to the injected element and no other.
    assert await page.page.eval_on_selector_all(selector, "found => found.map(el => el.className)") == [
        "too-wide"
    ]


async def test_cancel_a_pending_job(browser: Any, relay: RunningRelay, emulator: RunningEmulator) -> None:
    """A second job waits behind the first; Cancel in the queue panel removes it and the page says so."""
    page = await Page.open(browser, relay)
    first = await page.submit(seed=301)
    await page.running_index(2)
    second = await page.submit(seed=302)
    row = f'#queue-pending li[data-prompt-id="{second}"] button.cancel'
    await page.page.wait_for_selector(row)
    await page.shot("5-pending")
    await page.page.click(row)
    assert await page.done(timeout=15_000) == "cancelled"
    await page.page.wait_for_selector(f'#queue-pending li[data-prompt-id="{second}"]', state="detached")
    assert await page.page.text_content("#run-status") == "취소됨"
    async with httpx.AsyncClient(base_url=emulator.url) as comfy:
        queue = (await comfy.get("/queue")).json()
        assert second not in {item[1] for item in queue["queue_pending"] + queue["queue_running"]}
        assert first in {item[1] for item in queue["queue_running"]}  # the first runs on
        await comfy.post("/interrupt")
    assert page.errors == []


async def test_upstream_drop_shows_reconnecting_then_the_true_end(
    browser: Any, emulator: RunningEmulator
) -> None:
    """The relay's ComfyUI socket drops mid-run: the page says reconnecting, then shows the real result."""
    async with run_relay(relay_config(emulator, reconnect_initial=1.5, reconnect_max=2.0)) as relay:
        page = await Page.open(browser, relay)
        await page.submit(seed=401)
        await page.running_index(3)
        await emulator.drop_sockets()
        await page.page.wait_for_selector('#upstream[data-state="reconnecting"]', timeout=5_000)
        await page.shot("6-upstream-reconnecting")
        assert await page.done() == "success"
        await page.page.wait_for_selector('#upstream[data-state="connected"]')
        await page.result_loaded()
        steps = await page.steps()
        assert len(steps) == 16
        assert {s["state"] for s in steps} == {"done"}
        assert page.errors == []


async def test_lost_upstream_socket_says_the_run_is_detached_then_shows_the_result(
    browser: Any, relay: RunningRelay
) -> None:
    """The relay's ComfyUI socket is lost without a close mid-run: the page says the run can no longer
    be followed, then shows the true result when ComfyUI has it."""
    page = await Page.open(browser, relay, viewport=PHONE)
    await page.submit(seed=451)
    await page.running_index(3)
    client_id = await page.page.evaluate("localStorage.getItem('comfy-relay.clientId')")
    session = relay.state.sessions.find(client_id)
    assert session is not None
    assert session.upstream._socket is not None
    session.upstream._socket.transport.abort()
    await page.page.wait_for_selector("#current .detached")
    assert "진행 상황은 더 받을 수 없습니다" in (await page.page.text_content("#current") or "")
    await assert_fits_phones(page, "detached")
    await page.page.set_viewport_size(PHONE)
    await page.shot("7-detached")
    assert await page.done() == "success"
    await page.result_loaded()
    assert "재연결 후" in (await page.page.text_content("#run-error") or "")
    assert page.errors == []


async def test_reload_mid_run_resumes_the_same_prompt(browser: Any, relay: RunningRelay) -> None:
    """Reloading mid-run: the page comes back on the same prompt with the steps done so far, then ends."""
    page = await Page.open(browser, relay)
    prompt_id = await page.submit(seed=501)
    await page.running_index(6)
    await page.page.reload()
    await page.page.wait_for_selector(f'#run[data-prompt-id="{prompt_id}"]')
    await page.until("document.querySelectorAll('#steps li[data-state=\"done\"]').length >= 5")
    restored = await page.steps()
    assert len(restored) == 16
    assert [s["index"] for s in restored[:5]] == ["1", "2", "3", "4", "5"]
    assert await page.done() == "success"
    await page.result_loaded()
    assert {s["state"] for s in await page.steps()} == {"done"}
    assert page.errors == []


async def test_relay_restart_mid_run_ends_from_history(browser: Any, emulator: RunningEmulator) -> None:
    """The relay itself restarts mid-run: the page reconnects, and shows the end ComfyUI recorded."""
    port = free_port()
    first = run_relay(relay_config(emulator, port=port))
    relay = await first.__aenter__()
    try:
        page = await Page.open(browser, relay)
        await page.submit(seed=601)
        await page.running_index(4)
    finally:
        await first.__aexit__(None, None, None)
    await page.page.wait_for_selector('#connection[data-state="reconnecting"]', timeout=5_000)
    async with run_relay(relay_config(emulator, port=port)):
        await page.page.wait_for_selector('#connection[data-state="resumed"]', timeout=15_000)
        assert await page.done() == "success"
        await page.result_loaded()
        assert "재연결 후" in (await page.page.text_content("#run-error") or "")
    assert page.errors == []


async def test_page_with_a_token(browser: Any, emulator: RunningEmulator) -> None:
    """A relay with RELAY_TOKEN: the page opened as /#token=... runs a job and shows its image; the token
    leaves the address bar, and the socket carries it as a subprotocol, not in its URL."""
    token = "browser-token-0123456789abcdef"
    async with run_relay(relay_config(emulator, token=token)) as relay:
        page = await Page.open(browser, relay, path=f"/#token={token}")
        assert token not in page.page.url
        sockets: list[str] = []
        page.page.on("websocket", lambda socket: sockets.append(socket.url))
        await page.submit(seed=701)
        assert await page.done() == "success"
        await page.result_loaded()
        # A reload keeps working: the token stays with the tab (sessionStorage), not the URL.
        await page.page.reload()
        await page.page.wait_for_selector('#connection[data-state="connected"]')
        assert sockets
        assert all(token not in url for url in sockets)
        assert page.errors == []


async def test_stored_copy_is_linked_under_the_result(
    browser: Any, emulator: RunningEmulator, s3_server: S3Server
) -> None:
    """With storage, the page offers to keep the results; the run's result then shows
    "storing", then a link to its stored copy (a presigned URL that serves the same bytes)."""
    prefix = f"page-{uuid.uuid4().hex[:8]}"
    async with run_relay(relay_config(emulator, **storage_settings(s3_server, prefix))) as relay:
        page = await Page.open(browser, relay)
        await page.page.wait_for_selector("#store:not([hidden])")
        await page.page.check("#store input")
        await page.submit(seed=5)
        assert await page.done() == "success"
        await page.page.wait_for_selector('#results .stored[data-state="stored"]', timeout=30_000)
        await page.result_loaded()
        await page.shot("8-stored")
        link = await page.page.get_attribute('#results .stored[data-state="stored"]', "href")
        shown = await page.page.get_attribute("#results img", "src")
        assert link is not None
        assert link.startswith(s3_server.endpoint)
        assert shown is not None
        async with httpx.AsyncClient() as http:
            stored, original = await http.get(link), await http.get(shown)
        assert stored.status_code == 200
        assert stored.content == original.content
        assert page.errors == []


async def test_page_hides_the_storage_option_without_storage(browser: Any, relay: RunningRelay) -> None:
    """A relay without storage: no option to keep results, and none asked for."""
    page = await Page.open(browser, relay)
    await page.page.wait_for_selector("#param-seed")  # the form is drawn after the option is decided
    assert await page.page.is_hidden("#store")
