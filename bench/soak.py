"""A bounded soak: many clients connecting, submitting, resuming and leaving, for a fixed time,
against a relay process in front of the emulator; then: did the relay give back what it took?

Equal load phases (three by default), each followed by a quiet spell in which every client has
left, the relay has dropped their sessions (``relay_clients`` back to 0) and the cycle
collector has made a full pass (``RELAY_GC_INTERVAL`` is 5 s here, 60 s by default): waited
for, never slept on.
Sampled from the relay process (/proc) and its /metrics: resident memory, open file
descriptors, event-loop tasks.

- Descriptors and tasks must come back to their idle level after each phase.
- Memory: Python's allocator keeps some of what it once used, so the first phase may leave
  the resident size higher than at the start. A leak keeps growing: the figure checked is the
  growth over the last phase, quiet to quiet (at most ``--rss-slack``).

Each client, in a loop until its phase ends: opens one to three tabs (one may take ComfyUI's
raw frames), submits a prompt, sometimes cancels it, sometimes drops a tab mid-run (a clean
close or a reset) and resumes it with ``since``, reads a few HTTP routes, waits for the
prompt's ``relay.done`` and leaves. Every answer is checked: no 5xx, no relay.done missing,
none twice, no event of another client.

    .venv/bin/python bench/soak.py                       # 3 x 40 s, 40 clients
    .venv/bin/python bench/soak.py --phase 300 --phases 4 --clients 100 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import free_port, server_process, wait_until_up


@dataclass
class Sample:
    at: float
    rss_mb: float
    fds: int
    tasks: int
    clients: int


@dataclass
class Tally:
    prompts: int = 0
    dones: int = 0
    cancelled: int = 0
    resumes: int = 0
    resets: int = 0
    tabs: int = 0
    requests: int = 0
    errors_5xx: int = 0
    missing_dones: int = 0
    duplicate_dones: int = 0
    foreign_events: int = 0
    failures: list[str] = field(default_factory=list)


# The emulator's text-to-image example, read once.
TEXT2IMG = resources.files("relay.emulator").joinpath("examples/text2img.json").read_text()


def example(steps: int, seed: int) -> dict[str, Any]:
    """The text-to-image example with ``steps`` sampler steps and its own seed."""
    prompt: dict[str, Any] = json.loads(TEXT2IMG)
    prompt["3"]["inputs"].update(steps=steps, seed=seed)
    return prompt


def proc_sample(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def sample(http: httpx.AsyncClient, pid: int, start: float) -> Sample:
    text = (await http.get("/metrics")).text
    rss, fds = proc_sample(pid)
    # The scrape itself holds a descriptor: count the figures as of before it.
    return Sample(round(time.monotonic() - start, 1), round(rss, 1), fds,
                  int(metric(text, "relay_asyncio_tasks")), int(metric(text, "relay_clients")))  # fmt: skip


class Tab:
    def __init__(self, url: str, client_id: str, tally: Tally, *, raw: bool = False, since: str = "") -> None:
        self.events: list[dict[str, Any]] = []
        self.client_id = client_id
        self.tally = tally
        self.url = f"{url}?clientId={client_id}" + ("&events=all" if raw else "") + since
        self.socket: websockets.ClientConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    async def open(self) -> None:
        self.socket = await websockets.connect(self.url, max_size=None, open_timeout=20)
        self.tally.tabs += 1
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.socket is not None
        with contextlib.suppress(websockets.ConnectionClosed):
            async for frame in self.socket:
                if isinstance(frame, str) and (event := json.loads(frame)).get("type", "").startswith(
                    "relay."
                ):
                    if event.get("client_id") not in (None, self.client_id):
                        self.tally.foreign_events += 1
                    self.events.append(event)
                    self.changed.set()
        self.changed.set()

    def resume_query(self) -> str:
        hello = [e for e in self.events if e["type"] == "relay.hello"][-1]
        seqs = [
            e["seq"] for e in self.events if e["type"] not in ("relay.hello", "relay.snapshot", "relay.error")
        ]
        return f"&since={seqs[-1] if seqs else hello['seq']}&epoch={hello['epoch']}"

    def dones(self, prompt_id: str) -> int:
        return sum(e["type"] == "relay.done" and e.get("prompt_id") == prompt_id for e in self.events)

    async def until_done(self, prompt_id: str, within: float) -> bool:
        try:
            async with asyncio.timeout(within):
                while not self.dones(prompt_id):
                    if self.task is not None and self.task.done():
                        return False
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, *, reset: bool = False) -> None:
        if self.socket is not None:
            if reset:
                self.socket.transport.abort()
            else:
                await self.socket.close()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def client_loop(
    n: int, url: str, ws_url: str, deadline: float, tally: Tally, rng: random.Random
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        round_ = 0
        while time.monotonic() < deadline:
            round_ += 1
            client_id = f"soak{n}-{round_ % 3}"  # ids come back: sessions are reused, then reaped
            tabs = [Tab(ws_url, client_id, tally, raw=rng.random() < 0.2) for _ in range(rng.randint(1, 3))]
            for tab in tabs:
                await tab.open()
            steps = rng.randint(3, 12)
            body = {"prompt": example(steps, n * 1000 + round_), "client_id": client_id}
            answer = await http.post("/prompt", json=body)
            tally.requests += 1
            if answer.status_code >= 500:
                tally.errors_5xx += 1
                tally.failures.append(f"POST /prompt {answer.status_code} {answer.text[:120]}")
            if answer.status_code != 200:
                for tab in tabs:
                    await tab.close()
                continue
            prompt_id = answer.json()["prompt_id"]
            tally.prompts += 1
            roll = rng.random()
            story = "plain"
            if roll < 0.1:
                story = "cancelled"
                cancelled = await http.post(f"/prompt/{prompt_id}/cancel")
                tally.requests += 1
                tally.cancelled += cancelled.status_code == 200 and cancelled.json().get("cancelled") is True
            elif roll < 0.5 and len(tabs) > 0:
                # Drop a tab mid-run and come back with since.
                leaving = tabs.pop()
                if rng.random() < 0.5:  # now, or once the run has got going
                    await leaving.until_done(prompt_id, 0.3)
                reset = rng.random() < 0.5
                story = "resumed after a reset" if reset else "resumed after a close"
                tally.resets += reset
                await leaving.close(reset=reset)
                back = Tab(ws_url, client_id, tally, since=leaving.resume_query())
                back.events = list(leaving.events)  # one tab, reconnected: what it already saw counts
                await back.open()
                tally.resumes += 1
                tabs.append(back)
            for path in ("/queue", f"/history/{prompt_id}", "/system_stats"):
                reply = await http.get(path)
                tally.requests += 1
                if reply.status_code >= 500:
                    tally.errors_5xx += 1
                    tally.failures.append(f"GET {path} {reply.status_code}")
            for tab in tabs:
                if await tab.until_done(prompt_id, 60):
                    tally.dones += 1
                    if tab.dones(prompt_id) > 1:
                        tally.duplicate_dones += 1
                else:
                    tally.missing_dones += 1
                    seen = [e["type"] for e in tab.events if e.get("prompt_id") in (None, prompt_id)]
                    tally.failures.append(f"{client_id}: no relay.done for {prompt_id} ({story}; "
                                          f"{tab.url[-40:]}; saw {seen[:3]}...{seen[-4:]})")  # fmt: skip
            for tab in tabs:
                await tab.close(reset=rng.random() < 0.2)


async def quiet(http: httpx.AsyncClient, pid: int, start: float, within: float) -> Sample:
    """Until every client has left and its session is gone (relay_clients 0) and a full pass
    of the cycle collector has run since (what is left is what survives one); then a sample."""

    async def full_passes() -> float:
        return metric((await http.get("/metrics")).text, 'python_gc_collections_total{generation="2"}')

    async with asyncio.timeout(within):
        # Another process's state: asked again until it has changed.
        while (await sample(http, pid, start)).clients:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        passes = await full_passes()
        while await full_passes() == passes:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        return await sample(http, pid, start)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    comfy_port, relay_port = free_port(), free_port()
    env = {**os.environ, "COMFYUI_URL": f"http://127.0.0.1:{comfy_port}", "RELAY_UPSTREAM_GRACE": "1",
           "RELAY_ETA_FILE": "", "RELAY_LOG_LEVEL": "info" if args.log else "warning",
           "RELAY_LOG_FORMAT": "json", "RELAY_MAX_CONNECTIONS_PER_CLIENT": "16",
           "RELAY_SESSION_TTL": "2", "RELAY_GC_INTERVAL": "5"}  # fmt: skip
    emulator = [
        sys.executable,
        "-m",
        "relay",
        "emulator",
        "--port",
        str(comfy_port),
        "--speed",
        str(args.speed),
    ]
    relay = [sys.executable, "-m", "relay", "serve", "--port", str(relay_port)]
    url, ws_url = f"http://127.0.0.1:{relay_port}", f"ws://127.0.0.1:{relay_port}/ws"
    async with server_process(*emulator, env=env), server_process(*relay, env=env, log=args.log) as process:
        await wait_until_up(f"http://127.0.0.1:{comfy_port}/system_stats")
        await wait_until_up(url + "/healthz")
        start = time.monotonic()
        samples: list[Sample] = []
        rng = random.Random(args.seed)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            # Warm up (first imports, caches, the allocator's first arenas), then the idle level.
            await phase(url, ws_url, min(5.0, args.phase), 4, Tally(), rng, http, process.pid, start, samples)
            idle = await quiet(http, process.pid, start, args.settle)
            tallies, after = [], []
            for _ in range(args.phases):
                tally = Tally()
                await phase(
                    url, ws_url, args.phase, args.clients, tally, rng, http, process.pid, start, samples
                )
                tallies.append(tally)
                after.append(await quiet(http, process.pid, start, args.settle))
    peak = max(samples, key=lambda s: s.rss_mb)
    total = Tally()
    for tally in tallies:
        for key, value in asdict(tally).items():
            if key == "failures":
                total.failures += value
            else:
                setattr(total, key, getattr(total, key) + value)
    return {
        "phase_seconds": args.phase, "clients": args.clients, "idle": asdict(idle),
        "after_phases": [asdict(a) for a in after], "peak": asdict(peak),
        "rss_growth_last_phase_mb": round(after[-1].rss_mb - after[-2].rss_mb, 1),
        "rss_growth_vs_idle_mb": round(after[-1].rss_mb - idle.rss_mb, 1),
        "fd_growth": max(a.fds for a in after) - idle.fds,
        "task_growth": max(a.tasks for a in after) - idle.tasks,
        **{k: v for k, v in asdict(total).items() if k != "failures"}, "failures": total.failures[:20],
        "samples": [asdict(s) for s in samples],
    }  # fmt: skip


async def phase(url: str, ws_url: str, seconds: float, clients: int, tally: Tally, rng: random.Random,
                http: httpx.AsyncClient, pid: int, start: float, samples: list[Sample]) -> None:  # fmt: skip
    deadline = time.monotonic() + seconds
    loops = [asyncio.create_task(client_loop(n, url, ws_url, deadline, tally, random.Random(rng.random())))
             for n in range(clients)]  # fmt: skip
    while not all(loop.done() for loop in loops):
        samples.append(await sample(http, pid, start))
        await asyncio.wait(loops, timeout=2.0)
    for loop in loops:
        if loop.exception() is not None:
            tally.failures.append(f"client loop: {loop.exception()!r}")


def verdict(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    problems = [f"{key}: {result[key]}" for key in ("errors_5xx", "missing_dones", "duplicate_dones",
                                                    "foreign_events") if result[key]]  # fmt: skip
    if result["fd_growth"] > args.fd_slack:  # idle keep-alive connections to ComfyUI come and go
        problems.append(f"open descriptors grew by {result['fd_growth']}")
    if result["task_growth"] > 0:
        problems.append(f"event-loop tasks grew by {result['task_growth']}")
    if result["rss_growth_last_phase_mb"] > args.rss_slack:
        problems.append(f"memory grew by {result['rss_growth_last_phase_mb']} MB over the last phase")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phase", type=float, default=40.0, help="seconds of load per phase")
    parser.add_argument(
        "--phases", type=int, default=3, help="phases of load, each followed by a quiet spell"
    )
    parser.add_argument("--clients", type=int, default=40, help="concurrent clients")
    parser.add_argument("--speed", type=float, default=20.0, help="the emulator's speed-up")
    parser.add_argument("--settle", type=float, default=60.0, help="longest wait for the relay to go quiet")
    parser.add_argument(
        "--rss-slack", type=float, default=4.0, help="MB of growth allowed over the last phase"
    )
    parser.add_argument("--fd-slack", type=int, default=4, help="descriptors allowed above the idle level")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log", type=Path, help="append the relay's log (JSON lines) here")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    result = asyncio.run(soak(args))
    print(f"soak: {args.clients} clients, {args.phases} x {args.phase:.0f} s")
    print(f"  prompts {result['prompts']}, relay.done {result['dones']}, cancelled {result['cancelled']}, "
          f"tabs {result['tabs']}, resumes {result['resumes']} ({result['resets']} after a reset), "
          f"HTTP requests {result['requests']}")  # fmt: skip
    print(f"  5xx {result['errors_5xx']}, missing relay.done {result['missing_dones']}, "
          f"duplicated {result['duplicate_dones']}, "
          f"other clients' events {result['foreign_events']}")  # fmt: skip
    rows = [("idle", result["idle"]), ("peak", result["peak"])]
    rows += [(f"after phase {n}", s) for n, s in enumerate(result["after_phases"], 1)]
    for name, s in rows:
        figures = f"rss {s['rss_mb']:7.1f} MB  fds {s['fds']:4}  tasks {s['tasks']:4}  clients {s['clients']}"
        print(f"  {name:14} {figures}")
    print(f"  growth: rss over the last phase {result['rss_growth_last_phase_mb']:+.1f} MB "
          f"(vs idle {result['rss_growth_vs_idle_mb']:+.1f} MB), fds {result['fd_growth']:+d}, "
          f"tasks {result['task_growth']:+d}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    problems = verdict(result, args)
    for failure in result["failures"]:
        print("  failure:", failure)
    if problems:
        print("LEAK OR LOSS: " + "; ".join(problems))
        sys.exit(1)
    print("ok: back to the idle level, nothing lost")


if __name__ == "__main__":
    main()
