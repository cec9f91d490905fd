"""``comfy-relay submit`` as a user runs it: a real process against a real relay and emulator.

Plain progress lines on a pipe, live bars on a terminal (a pseudo-terminal read back through a
small screen model), exit codes for success, failure, refusal and an unreachable relay, and the
watch surviving a cut connection (resumed) and a relay restart (learned from ComfyUI's history).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from relay.emulator import EmulatorConfig, RunningEmulator
from relay.emulator.config import ComfyVersion
from relay.server import RunningRelay, run_relay
from relay.terminal import LiveRenderer, PlainRenderer, RunView, bar, display_width, duration, fit
from tests.conftest import relay_config
from tests.netcut import forwarder
from tests.relay_client import open_tab
from tests.s3_server import S3Server
from tests.test_emulator_cli import free_port
from tests.test_storage import storage_settings
from tests.tracekit import load_trace, long_graph

WORKFLOWS = Path(__file__).parents[1] / "workflows"
PORTRAIT = json.loads((WORKFLOWS / "portrait_mode.json").read_text())
STEP_LINE = re.compile(r"^\[ ?(\d+)/16\] (.+?) \(elapsed ")


async def run_cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``comfy-relay ARGS`` to its end: exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class Watched:
    """A ``submit --watch`` process whose output a test reads as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(cls, *args: str) -> Watched:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "submit", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        return cls(process)

    async def until(self, pattern: str, timeout: float = 30) -> None:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while not any(pattern in line for line in self.lines):
                line = await self.process.stdout.readline()
                assert line, f"output ended before {pattern!r}: {self.lines}"
                self.lines.append(line.decode().rstrip("\n"))

    async def finish(self, timeout: float = 60) -> tuple[int, str]:
        async with asyncio.timeout(timeout):
            out, err = await self.process.communicate()
        self.lines += out.decode().splitlines()
        assert self.process.returncode is not None
        return self.process.returncode, err.decode()


def step_lines(lines: list[str]) -> list[tuple[int, str]]:
    return [(int(m[1]), m[2]) for line in lines if (m := STEP_LINE.match(line))]


async def assert_served_image(url: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200
    assert response.content.startswith(b"\x89PNG")


async def test_watch_shows_every_named_step_and_the_output(relay: RunningRelay) -> None:
    """portrait_mode: 16 named steps in order (ko), sampler progress, the output's URL, exit 0."""
    code, out, err = await run_cli("submit", "portrait_mode", "--watch", "--relay", relay.url, "-p", "seed=7")
    assert code == 0, err
    lines = out.splitlines()
    steps = step_lines(lines)
    assert [index for index, _ in steps] == list(range(1, 17))
    assert sorted(name for _, name in steps) == sorted(name["ko"] for name in PORTRAIT["steps"].values())
    assert steps[-1][1] == PORTRAIT["steps"]["50"]["ko"]  # the save step is reported, last
    assert any(line.strip().startswith("████") and "20/20" in line for line in lines)
    assert any(line.startswith("✓ done in ") for line in lines)
    assert lines[-1].startswith(f"output: {relay.url}/view?filename=portrait_")
    await assert_served_image(lines[-1].removeprefix("output: "))


async def test_language_and_parameters_reach_the_run(relay: RunningRelay, emulator: RunningEmulator) -> None:
    """--lang en names steps in English; --param values are typed and fill the graph ComfyUI ran."""
    code, out, err = await run_cli(
        "submit", "text2img", "-w", "--relay", relay.url, "--lang", "en",
        "-p", "prompt=a lighthouse at dusk", "-p", "seed=1234", "-p", "cfg=4.5", "-p", "steps=3",
    )  # fmt: skip
    assert code == 0, err
    text2img = json.loads((WORKFLOWS / "text2img.json").read_text())
    names = [name for _, name in step_lines_any(out)]
    assert sorted(names) == sorted(name["en"] for name in text2img["steps"].values())
    prompt_id = re.search(r"prompt ([0-9a-f-]{36})", out)
    assert prompt_id is not None
    async with httpx.AsyncClient(base_url=emulator.url) as comfy:
        history = (await comfy.get(f"/history/{prompt_id[1]}")).json()[prompt_id[1]]
    graph = history["prompt"][2]
    sampler = next(node for node in graph.values() if node["class_type"] == "KSampler")
    assert (sampler["inputs"]["seed"], sampler["inputs"]["cfg"], sampler["inputs"]["steps"]) == (1234, 4.5, 3)
    assert "a lighthouse at dusk" in {n["inputs"].get("text") for n in graph.values()}


async def test_image_parameter_uploads_a_local_file(
    relay: RunningRelay, emulator: RunningEmulator, tmp_path: Path
) -> None:
    """``-p image=@PATH`` uploads the file through the relay and the run loads that upload."""
    photo = tmp_path / "me.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photo)
    code, out, err = await run_cli(
        "submit", "portrait_mode", "-w", "--relay", relay.url, "-p", f"image=@{photo}"
    )
    assert code == 0, err
    prompt_id = re.search(r"prompt ([0-9a-f-]{36})", out)
    assert prompt_id is not None
    async with httpx.AsyncClient(base_url=emulator.url) as comfy:
        graph = (await comfy.get(f"/history/{prompt_id[1]}")).json()[prompt_id[1]]["prompt"][2]
        loader = next(node for node in graph.values() if node["class_type"] == "LoadImage")
        assert loader["inputs"]["image"] == "me.png"
        stored = await comfy.get("/view", params={"filename": "me.png", "type": "input"})
    assert stored.content == photo.read_bytes()
    code, _, err = await run_cli("submit", "portrait_mode", "--relay", relay.url, "-p", "image=@/no/such.png")
    assert code == 2
    assert "cannot read /no/such.png" in err


def step_lines_any(out: str) -> list[tuple[int, str]]:
    return [(int(m[1]), m[2]) for m in re.finditer(r"^\[ ?(\d+)/\d+\] (.+?) \(elapsed ", out, re.M)]


async def test_refused_requests_exit_2_and_reach_nothing(
    relay: RunningRelay, emulator: RunningEmulator
) -> None:
    """Unknown workflow, bad or unknown parameters, a bad graph file: exit 2, a message naming the fault."""
    code, _, err = await run_cli("submit", "portrait_modee", "--relay", relay.url)
    assert code == 2
    assert "no workflow named 'portrait_modee' (it knows: animatediff, hybrid_mode, portrait_mode," in err
    code, _, err = await run_cli("submit", "portrait_mode", "-w", "--relay", relay.url, "-p", "steps=many")
    assert code == 2
    assert "'steps' must be an integer" in err
    code, _, err = await run_cli("submit", "portrait_mode", "--relay", relay.url, "-p", "strength=2")
    assert code == 2
    assert "'strength'" in err
    code, _, err = await run_cli("submit", "portrait_mode", "--relay", relay.url, "-p", "seed")
    assert code == 2
    assert "NAME=VALUE" in err
    code, _, err = await run_cli("submit", "no-such-graph.json", "--relay", relay.url)
    assert code == 2
    assert "cannot read" in err
    async with httpx.AsyncClient(base_url=emulator.url) as comfy:
        assert (await comfy.get("/history")).json() == {}


async def test_unreachable_relay_exits_3() -> None:
    """Nothing listening at --relay: exit 3 and a message saying so, quickly."""
    code, _, err = await run_cli(
        "submit", "portrait_mode", "-w", "--relay", f"http://127.0.0.1:{free_port()}"
    )
    assert code == 3
    assert "cannot reach the relay" in err


async def test_failed_run_exits_1_naming_the_step(relay: RunningRelay, tmp_path: Path) -> None:
    """A graph file whose node raises: the failing step and exception shown, exit 1."""
    graph = tmp_path / "failing.json"
    graph.write_text(json.dumps(load_trace("05").workflow()))
    code, out, err = await run_cli("submit", str(graph), "--watch", "--relay", relay.url)
    assert code == 1, (out, err)
    failure = out[out.index("✗ failed at ") :]
    assert "Fail After" in failure.splitlines()[0]
    assert "RuntimeError: deliberate failure from FailAfter (probe)" in failure


@pytest.fixture
def emulator_config(comfyui_version: ComfyVersion) -> EmulatorConfig:
    # Slow enough to act in the middle of a run (portrait_mode takes a few seconds).
    return EmulatorConfig(port=0, speed=3, comfyui_version=comfyui_version)


async def test_interrupted_run_exits_1(relay: RunningRelay) -> None:
    """Interrupting the prompt while the sampler runs: shown as interrupted at that step, exit 1."""
    watched = await Watched.start("portrait_mode", "-w", "--relay", relay.url)
    await watched.until("(KSampler) (elapsed")
    async with httpx.AsyncClient(base_url=relay.url) as http:
        assert (await http.post("/interrupt", json={})).status_code == 200
    code, err = await watched.finish()
    assert code == 1, err
    assert any(line.startswith("✗ interrupted at [14/16] 🚀") for line in watched.lines), watched.lines


async def test_cut_connection_is_resumed_without_losing_a_step(relay: RunningRelay) -> None:
    """The socket to the relay is cut mid-run: the watch resumes with since and shows every step once."""
    port = int(relay.url.rsplit(":", 1)[1])
    async with forwarder(port) as cut:
        watched = await Watched.start("portrait_mode", "-w", "--relay", cut.url)
        await watched.until("[ 5/16]")
        cut.cut()
        code, err = await watched.finish()
    assert code == 0, err
    assert [index for index, _ in step_lines(watched.lines)] == list(range(1, 17))
    assert any(re.match(r"… reconnected, \d+ missed events replayed", line) for line in watched.lines)
    assert watched.lines[-1].startswith(f"output: {cut.url}/view?")


async def test_relay_restart_mid_run_still_ends_with_the_truth(emulator: RunningEmulator) -> None:
    """The relay restarts mid-run (its buffer gone): the watch learns the end from history, exit 0."""
    port = free_port()
    first = run_relay(relay_config(emulator, port=port))
    relay = await first.__aenter__()
    try:
        watched = await Watched.start("portrait_mode", "-w", "--relay", relay.url)
        await watched.until("[ 5/16]")
    finally:
        await first.__aexit__(None, None, None)
    async with run_relay(relay_config(emulator, port=port)):
        code, err = await watched.finish()
        assert code == 0, (err, watched.lines)
        assert any("could not replay what was missed" in line for line in watched.lines)
        assert any(line.startswith("✓ done in ") for line in watched.lines)
        assert watched.lines[-1].startswith(f"output: http://127.0.0.1:{port}/view?filename=portrait_")
        await assert_served_image(watched.lines[-1].removeprefix("output: "))


# The live display ---------------------------------------------------------------------------

_CONTROL = re.compile(r"\x1b\[(\?25[lh]|2K|1A)|[\r\n]|[^\x1b\r\n]+")


def screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: the few controls the live display uses, applied."""
    lines, row = [""], 0
    for match in _CONTROL.finditer(raw):
        token = match[0]
        if token == "\x1b[2K":
            lines[row] = ""
        elif token == "\x1b[1A":
            row -= 1
        elif token == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
        elif token in ("\r", "\x1b[?25l", "\x1b[?25h"):
            continue
        else:
            lines[row] += token
    assert "\x1b" not in "".join(lines), "an escape sequence the display should not use"
    return lines


async def run_in_terminal(*args: str, columns: int = 100, timeout: float = 60) -> tuple[int, str]:
    """Run ``comfy-relay ARGS`` with a pseudo-terminal as stdout; exit code and everything written."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "40"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args, stdout=follower, stderr=subprocess.PIPE, env=env
    )
    os.close(follower)
    chunks: list[bytes] = []
    loop = asyncio.get_running_loop()

    def read() -> None:
        try:
            while chunk := os.read(leader, 65536):
                chunks.append(chunk)
        except OSError:  # the terminal closes when the process ends
            pass

    reading = loop.run_in_executor(None, read)
    async with asyncio.timeout(timeout):
        await process.wait()
        await reading
    os.close(leader)
    assert process.returncode is not None
    return process.returncode, b"".join(chunks).decode()


async def test_live_display_in_a_terminal(relay: RunningRelay) -> None:
    """On a terminal: bars redrawn in place, with ETA once learned; finished steps stay, in order."""
    await run_cli("submit", "portrait_mode", "-w", "--relay", relay.url)  # a first run to learn from
    code, raw = await run_in_terminal("submit", "portrait_mode", "-w", "--relay", relay.url, "-p", "seed=9")
    assert code == 0, raw
    assert raw.startswith("portrait_mode: prompt ")
    assert raw.endswith("\x1b[?25h")  # the cursor is given back
    assert "\x1b[1A" in raw  # the status is redrawn in place
    assert "eta " in raw
    assert "20/20" in raw  # the sampler's own bar
    shown = [line for line in screen(raw) if line]
    settled = [re.match(r"^[✓·] \[ ?(\d+)/16\] (.+?)\s{2,}", line) for line in shown[1:-2]]
    assert all(settled), shown
    assert [int(m[1]) for m in settled if m] == list(range(1, 17))
    assert sorted(m[2] for m in settled if m) == sorted(name["ko"] for name in PORTRAIT["steps"].values())
    assert shown[-2].startswith("✓ done in ")
    assert shown[-1].startswith(f"output: {relay.url}/view?filename=portrait_")
    assert all(len(line) <= 100 for line in shown)


def test_text_width_and_bars() -> None:
    """Hangul and emoji count two cells; cutting keeps within the width; bars fill in eighths."""
    assert display_width("얼굴 감지") == 9
    assert display_width("⚙️ Negative") == 11
    assert display_width("🚀 a") == 4
    cut = fit("👤 얼굴 영역 감지 중...", 8)
    assert display_width(cut) <= 8
    assert cut.endswith("…")
    assert bar(0.5, 10) == "█████░░░░░"
    assert bar(0.55, 10) == "█████▌░░░░"
    assert bar(1.2, 4) == "████"
    assert (duration(2.84), duration(65), duration(3725)) == ("2.8 s", "1 m 05 s", "1 h 02 m")


def test_plain_lines_for_a_queued_then_cached_run() -> None:
    """Waiting behind others is said once; cached steps are counted; the end names the output."""
    out = io.StringIO()
    view = RunView("p1")
    renderer = PlainRenderer(view, out, base_url="http://relay:8190/")
    steps = [{"node": "1", "name": "load"}, {"node": "2", "name": "save"}]
    for event in [
        {"type": "relay.queued", "prompt_id": "p1", "total": 2, "steps": steps},
        {"type": "relay.queue", "remaining": 3},
        {"type": "relay.queue", "remaining": 2},
        {"type": "relay.started", "prompt_id": "p1", "total": 2, "cached": ["1"], "queued_for": 4.2},
        {
            "type": "relay.step",
            "prompt_id": "p1",
            "node": "2",
            "name": "save",
            "index": 2,
            "state": "running",
            "elapsed": 0.0,
            "percent": 50.0,
        },
        {
            "type": "relay.done",
            "prompt_id": "p1",
            "status": "success",
            "elapsed": 0.3,
            "percent": 100.0,
            "outputs": {"2": {"images": [{"filename": "a b.png", "subfolder": "", "type": "output"}]}},
        },
        {"type": "relay.done", "prompt_id": "p1", "status": "error"},  # a second account changes nothing
    ]:
        renderer.event(event)
    assert out.getvalue().splitlines() == [
        "queued: 2 steps (prompt p1)",
        "waiting in ComfyUI's queue (3 prompts queued or running)",
        "started after 4.2 s in the queue; 1 steps cached",
        "[2/2] save (elapsed 0.0 s, 50.0%)",
        "✓ done in 0.3 s",
        "output: http://relay:8190/view?filename=a+b.png&subfolder=&type=output",
    ]


async def test_submit_to_a_relay_with_a_token(emulator: RunningEmulator) -> None:
    """With --token the run is submitted and watched to its end; without it the relay's refusal exits 2."""
    token = "submit-token-0123456789abcdef"
    async with run_relay(relay_config(emulator, token=token)) as relay:
        code, _, err = await run_cli("submit", "text2img", "--relay", relay.url)
        assert code == 2
        assert "a valid token is required" in err
        code, out, err = await run_cli("submit", "text2img", "-w", "--relay", relay.url, "--token", token)
        assert code == 0, err
        assert "done in" in out
        code, out, _ = await run_cli("workflows", "--relay", relay.url, "--token", token)
        assert code == 0
        assert "text2img" in out


def test_a_step_announced_again_with_its_activity() -> None:
    """A running step announced again with an activity (current ComfyUI's "loading") is one step:
    one plain line, and the live status names what it is doing until it says otherwise."""
    step = {"type": "relay.step", "prompt_id": "p1", "node": "1", "name": "load", "index": 1,
            "state": "running", "elapsed": 0.0, "percent": 0.0}  # fmt: skip
    out, live_out = io.StringIO(), io.StringIO()
    plain = PlainRenderer(RunView("p1"), out, base_url="http://relay:8190/")
    live_view = RunView("p1")
    live = LiveRenderer(live_view, live_out, base_url="http://relay:8190/", columns=60)
    for renderer in (plain, live):
        renderer.event({"type": "relay.queued", "prompt_id": "p1", "total": 2, "steps": []})
        renderer.event(step)
        renderer.event({**step, "activity": "loading"})
    assert [line for line in out.getvalue().splitlines() if line.startswith("[")] == [
        "[1/2] load (elapsed 0.0 s, 0.0%)"
    ]
    assert live._status()[0].startswith("▶ [1/2] load (loading)")
    live.event(step)  # the activity is over
    assert "(loading)" not in live._status()[0]
    live.close()


async def test_cancel_command(relay: RunningRelay) -> None:
    """``comfy-relay cancel ID`` takes a waiting prompt out of the queue (exit 0), says when there
    is nothing left to cancel (exit 1) and refuses a malformed id (exit 2)."""
    tab = await open_tab(relay.ws_url, "clientId=quitter")
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        running = (await http.post("/prompt", json={"prompt": long_graph(), "client_id": "quitter"})).json()[
            "prompt_id"
        ]
        graph = load_trace("01").workflow()
        waiting = (await http.post("/prompt", json={"prompt": graph, "client_id": "quitter"})).json()[
            "prompt_id"
        ]
        await tab.wait_type("relay.progress", running)
        code, out, err = await run_cli("cancel", waiting, "--relay", relay.url)
        assert (code, out.strip()) == (0, f"{waiting}: cancelled"), err
        assert (await tab.wait_done(waiting))["status"] == "cancelled"
        code, out, _ = await run_cli("cancel", waiting, "--relay", relay.url)
        assert code == 1
        assert "nothing to cancel" in out
        code, _, err = await run_cli("cancel", "not-a-prompt-id", "--relay", relay.url)
        assert code == 2
        assert "canonical lowercase UUID" in err
        await http.post(f"/prompt/{running}/cancel")
        assert (await tab.wait_done(running))["status"] == "interrupted"
    await tab.close()


async def test_watch_prints_the_stored_urls(emulator: RunningEmulator, s3_server: S3Server) -> None:
    """submit --store --watch stays until the files are stored and prints each presigned URL,
    which serves the same image as the relay's /view link printed before it."""
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    async with run_relay(relay_config(emulator, **storage_settings(s3_server, prefix))) as relay:
        code, out, err = await run_cli("submit", "portrait_mode", "--watch", "--store", "--progress", "plain",
                                       "--relay", relay.url, "-p", "seed=9")  # fmt: skip
        assert code == 0, err
        lines = out.splitlines()
        output = next(line for line in lines if line.startswith("output: "))
        assert "… storing 1 file in the bucket" in lines
        stored = [line.removeprefix("stored: ") for line in lines if line.startswith("stored: ")]
        assert len(stored) == 1
        assert stored[0].startswith(f"{s3_server.endpoint}/{s3_server.bucket}/{prefix}/")
        async with httpx.AsyncClient() as http:
            kept, original = await http.get(stored[0]), await http.get(output.removeprefix("output: "))
    assert kept.status_code == 200
    assert kept.content == original.content
