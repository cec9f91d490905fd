"""Several backends: how fast a burst of prompts gets done through one relay in front of three
emulated ComfyUI servers, routed (least loaded, a workflow kept where it ran), against the same
relay in front of one server and against plain round-robin over the three, in the same run.

The burst mixes two workflows that load different checkpoints (as two models of a real
deployment do): ComfyUI, and the emulator, keep a loaded model only while the next prompt uses
it, so a backend switching between them loads a checkpoint each time. With ``--busy N`` the
first backend (the single setup's one) already has N prompts of another front end in its queue
when the burst comes, as in a cluster that several apps share. Every setup gets fresh server
processes (empty caches), and the setups take turns each round. The relay checks its backends
every 2 s divided by the emulators' speed-up: its default, on their faster clock.

Reported per setup: the median wall time from the first submit to the last ``relay.done``,
prompts per second, checkpoint loads (prompts of the burst whose loader was not cached) and how
many prompts each backend got (the first, the busy one, first); then the throughput of each
setup as a ratio to single and to round-robin.

    .venv/bin/python bench/backends.py                       # 24 prompts, none busy, 3 rounds
    .venv/bin/python bench/backends.py --busy 8              # the first backend busy
    .venv/bin/python bench/backends.py --prompts 48 --rounds 5 --speed 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import httpx
import websockets
from _common import free_port, server_process, wait_until_up

SETUPS = ("single", "round-robin", "routed")
CHECKPOINTS = ("sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors")
OUTSIDE = "realisticVisionV60B1_v51HyperVAE.safetensors"  # another front end's model
TEXT2IMG = json.loads(resources.files("relay.emulator").joinpath("examples/text2img.json").read_text())


@dataclass
class Result:
    setup: str
    seconds: float
    prompts_per_second: float
    checkpoint_loads: int
    spread: dict[str, int]


def burst(count: int, steps: int, checkpoint: str | None = None) -> list[dict[str, Any]]:
    """``count`` text-to-image graphs, the two checkpoints in a fixed shuffled order (or all
    with ``checkpoint``)."""
    order = random.Random(7)
    graphs = []
    for n in range(count):
        graph = copy.deepcopy(TEXT2IMG)
        graph["4"]["inputs"]["ckpt_name"] = checkpoint or CHECKPOINTS[order.random() < 0.5]
        graph["3"]["inputs"].update(seed=1000 + n, steps=steps)
        graphs.append(graph)
    return graphs


@contextlib.asynccontextmanager
async def emulators(count: int, speed: float) -> AsyncIterator[list[str]]:
    ports = [free_port() for _ in range(count)]
    async with contextlib.AsyncExitStack() as stack:
        for port in ports:
            await stack.enter_async_context(
                server_process(
                    sys.executable, "-m", "relay", "emulator", "--port", str(port), "--speed", str(speed),
                    "--log-level", "warning",
                )
            )  # fmt: skip
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url in urls:
            await wait_until_up(f"{url}/system_stats")
        yield urls


@contextlib.asynccontextmanager
async def relay(setup: str, backends: list[str], speed: float) -> AsyncIterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "RELAY_PORT": str(port),
        "RELAY_LOG_LEVEL": "warning",
        "RELAY_ETA_FILE": "",
        "COMFYUI_URL": backends[0],
        "RELAY_COMFYUI_URLS": "" if setup == "single" else ",".join(backends),
        "RELAY_ROUTING": "round-robin" if setup == "round-robin" else "least-loaded",
        # The default 2 s between checks, on the emulators' faster clock.
        "RELAY_BACKEND_CHECK_INTERVAL": str(2.0 / speed),
    }
    async with server_process(sys.executable, "-m", "relay", "serve", env=env):
        url = f"http://127.0.0.1:{port}"
        await wait_until_up(f"{url}/healthz")
        yield url


async def keep_busy(url: str, backend: str, graphs: list[dict[str, Any]], setup: str) -> None:
    """Another front end's prompts, straight into ``backend``'s queue; then wait until the relay
    has seen that queue whole (its next check of the backend)."""
    async with httpx.AsyncClient(base_url=backend, timeout=60) as direct:
        for graph in graphs:
            answer = await direct.post("/prompt", json={"prompt": graph, "client_id": "another-front-end"})
            answer.raise_for_status()
    if setup == "single":
        return
    name = backend.removeprefix("http://")
    async with httpx.AsyncClient(base_url=url, timeout=10) as http, asyncio.timeout(30):
        while True:
            ready = (await http.get("/readyz")).json()
            # Its check after the last of them was queued (one or two may have run since).
            if any(b["name"] == name and b["queue_remaining"] >= len(graphs) - 2 for b in ready["backends"]):
                return
            await asyncio.sleep(0.05)


async def run_burst(url: str, graphs: list[dict[str, Any]], setup: str, names: list[str]) -> Result:
    ends: dict[str, float] = {}
    loaded: set[str] = set()
    all_done = asyncio.Event()
    wanted: set[str] = set()
    async with websockets.connect(url.replace("http", "ws") + "/ws?clientId=bench") as tab:

        async def read() -> None:
            async for frame in tab:
                event = json.loads(frame)
                prompt_id = event.get("prompt_id")
                if event["type"] == "relay.started" and "4" not in event["cached"]:
                    loaded.add(prompt_id)
                elif event["type"] == "relay.done":
                    ends[prompt_id] = time.perf_counter()
                    if wanted and wanted <= ends.keys():
                        all_done.set()

        reader = asyncio.create_task(read())
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            started = time.perf_counter()
            answers = await asyncio.gather(
                *(http.post("/prompt", json={"prompt": graph, "client_id": "bench"}) for graph in graphs)
            )
            bodies = [answer.json() for answer in answers]
            if any(answer.status_code != 200 for answer in answers):
                sys.exit(f"a prompt was refused: {bodies}")
            wanted.update(body["prompt_id"] for body in bodies)
            if wanted <= ends.keys():
                all_done.set()
            async with asyncio.timeout(600):
                await all_done.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    seconds = max(ends[p] for p in wanted) - started
    spread = Counter(str(body.get("backend", names[0])) for body in bodies)
    return Result(
        setup=setup,
        seconds=round(seconds, 3),
        prompts_per_second=round(len(graphs) / seconds, 3),
        checkpoint_loads=len(loaded & wanted),
        spread={f"backend {n}": spread[name] for n, name in enumerate(names)},
    )


async def one_round(args: argparse.Namespace) -> dict[str, Result]:
    results = {}
    graphs = burst(args.prompts, args.steps)
    for setup in SETUPS:
        async with emulators(3, args.speed) as backends, relay(setup, backends, args.speed) as url:
            if args.busy:
                outside = burst(args.busy, args.steps, checkpoint=OUTSIDE)
                await keep_busy(url, backends[0], outside, setup)
            names = [backend.removeprefix("http://") for backend in backends]
            results[setup] = await run_burst(url, graphs, setup, names)
        print(
            f"  {setup:12} {results[setup].seconds:7.2f} s  loads {results[setup].checkpoint_loads}",
            flush=True,
        )
    return results


def median_result(runs: list[Result]) -> Result:
    middle = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    return Result(
        setup=middle.setup,
        seconds=round(statistics.median(r.seconds for r in runs), 3),
        prompts_per_second=round(statistics.median(r.prompts_per_second for r in runs), 3),
        checkpoint_loads=middle.checkpoint_loads,
        spread=middle.spread,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=24, help="prompts in the burst (default 24)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians reported (default 3)")
    parser.add_argument("--speed", type=float, default=10.0, help="the emulators' speed-up (default 10)")
    parser.add_argument("--steps", type=int, default=8, help="sampler steps per prompt (default 8)")
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="prompts of another front end already on the first backend (default 0)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    runs: dict[str, list[Result]] = {setup: [] for setup in SETUPS}
    for n in range(args.rounds):
        print(f"round {n + 1}/{args.rounds}", flush=True)
        for setup, result in (await one_round(args)).items():
            runs[setup].append(result)
    medians = {setup: median_result(results) for setup, results in runs.items()}
    ratios = {
        setup: {
            "vs_single": round(medians[setup].prompts_per_second / medians["single"].prompts_per_second, 2),
            "vs_round_robin": round(
                medians[setup].prompts_per_second / medians["round-robin"].prompts_per_second, 2
            ),
        }
        for setup in SETUPS
    }
    if args.json:
        print(json.dumps({"results": {s: asdict(r) for s, r in medians.items()}, "ratios": ratios}, indent=2))
        return
    busy = f", {args.busy} other prompts on the first backend" if args.busy else ""
    print(f"\n{args.prompts} prompts, two checkpoints mixed, {args.steps} steps, emulators at "
          f"x{args.speed}{busy}; median of {args.rounds} rounds")  # fmt: skip
    header = f"{'setup':12} {'seconds':>8} {'prompts/s':>10} {'loads':>6}  {'spread':15} "
    print(header + "vs single  vs round-robin")
    for setup in SETUPS:
        r = medians[setup]
        spread = "/".join(str(c) for c in r.spread.values())
        ratio = ratios[setup]
        row = (
            f"{setup:12} {r.seconds:8.2f} {r.prompts_per_second:10.2f} {r.checkpoint_loads:6d}  {spread:15} "
        )
        print(row + f"{ratio['vs_single']:9.2f}  {ratio['vs_round_robin']:14.2f}")


if __name__ == "__main__":
    asyncio.run(main())
