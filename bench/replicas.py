"""The fan-out benchmark with Redis: one relay in memory, one relay on Redis, three relays on
Redis, in the same run, against the same pacer (bench/fanout.py's ComfyUI stand-in).

For each setup, N tabs of one client (spread evenly over the relays) receive one prompt's
progress events at a fixed rate. Reported per setup: p50/p99 latency from the pacer's send to
the tab's receive, the relays' CPU time (all of them, utime + stime from /proc) per delivered
frame, and Redis commands per relay event (INFO commandstats, before and after); then each
Redis setup against the in-memory one: latency added (ms) and CPU per frame as a ratio.

Needs redis-server (``make redis``); it is started here on a free port, in memory only.

    .venv/bin/python bench/replicas.py                       # N = 100, median of 3 rounds
    .venv/bin/python bench/replicas.py --subscribers 300 --rate 50 --events 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from _common import free_port, server_process, wait_until_up
from fanout import Client, _close, _connect, _cpu_seconds, _latencies, _percentile
from redis.asyncio import Redis
from redis.exceptions import RedisError

FANOUT = Path(__file__).resolve().parent / "fanout.py"
SETUPS = ("memory", "redis-1", "redis-3")


@dataclass
class Result:
    setup: str
    subscribers: int
    events: int
    p50_ms: float
    p99_ms: float
    relay_cpu_us_per_frame: float
    delivered_frames: int
    redis_commands_per_event: float
    cpu_ms_per_relay: list[int]


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench/replicas.py needs redis-server: run `make redis` first")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        async with server_process(
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            folder,
        ):
            url = f"redis://127.0.0.1:{port}/0"
            client = Redis.from_url(url)
            try:
                async with asyncio.timeout(20):
                    while True:
                        with contextlib.suppress(OSError, RedisError):
                            if await client.ping():
                                break
                        await asyncio.sleep(0.05)
            finally:
                await client.aclose()
            yield url


async def _commands(redis: Redis | None) -> int:
    if redis is None:
        return 0
    stats = await redis.info("commandstats")
    return sum(int(entry["calls"]) for entry in stats.values() if isinstance(entry, dict))


async def measure(
    setup: str,
    relays: list[tuple[str, int]],
    client: str,
    args: argparse.Namespace,
    pacer_url: str,
    redis: Redis | None,
) -> Result:
    n = args.subscribers
    tabs: list[Client] = []
    for index, (url, _) in enumerate(relays):
        share = n // len(relays) + (1 if index < n % len(relays) else 0)
        tabs += await _connect(url.replace("http", "ws") + "/ws", share, relay=True, client=client)
    async with httpx.AsyncClient(timeout=60) as http:
        await http.post(f"{pacer_url}/bench/configure", params={"rate": args.rate, "events": args.events})
        frames_before = sum(c.frames for c in tabs)
        gc.collect()
        gc.disable()
        each_before = [_cpu_seconds(pid) for _, pid in relays]
        commands_before = await _commands(redis)
        body = {"prompt": {"1": {"class_type": "BenchSave", "inputs": {}}}, "client_id": client}
        response = await http.post(f"{relays[0][0]}/prompt", json=body)
        response.raise_for_status()
        async with asyncio.timeout(args.events / args.rate + 60):
            await asyncio.gather(*(c.done.wait() for c in tabs))
        each = [_cpu_seconds(pid) - before for (_, pid), before in zip(relays, each_before, strict=True)]
        cpu = sum(each)
        commands = await _commands(redis) - commands_before - 1  # less this INFO
        gc.enable()
        sent = (await http.get(f"{pacer_url}/bench/sent")).json()["sent"]
    delivered = sum(c.frames for c in tabs) - frames_before
    # Relay events of the run: what any one tab received, less its greeting.
    events = tabs[0].frames - 1
    latency = _latencies(tabs, sent)
    await _close(tabs)
    return Result(
        setup=setup,
        subscribers=n,
        events=events,
        p50_ms=round(_percentile(latency, 50), 3),
        p99_ms=round(_percentile(latency, 99), 3),
        relay_cpu_us_per_frame=round(cpu / delivered * 1e6, 2),
        delivered_frames=delivered,
        redis_commands_per_event=round(commands / events, 2) if redis is not None else 0.0,
        cpu_ms_per_relay=[round(seconds * 1000) for seconds in each],
    )


def _env(pacer_url: str, port: int, args: argparse.Namespace, redis_url: str = "") -> dict[str, str]:
    return {
        **os.environ,
        "COMFYUI_URL": pacer_url,
        "RELAY_PORT": str(port),
        "RELAY_LOG_LEVEL": "warning",
        "RELAY_UPSTREAM_GRACE": "300",
        "RELAY_ETA_FILE": "",
        "RELAY_MAX_CONNECTIONS_PER_CLIENT": str(args.subscribers + 10),
        "RELAY_REDIS_URL": redis_url,
    }


async def drive(args: argparse.Namespace) -> list[Result]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pacer_port = free_port()
    pacer_url = f"http://127.0.0.1:{pacer_port}"
    ports = [free_port() for _ in range(4)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    rounds: dict[str, list[Result]] = {setup: [] for setup in SETUPS}
    async with (
        redis_server() as redis_url,
        server_process(sys.executable, str(FANOUT), "--pacer", str(pacer_port)) as _pacer,
        server_process(sys.executable, "-m", "relay", "serve", env=_env(pacer_url, ports[0], args)) as memory,
        contextlib.AsyncExitStack() as stack,
    ):
        redis = Redis.from_url(redis_url, decode_responses=True)
        stack.push_async_callback(redis.aclose)
        replicas = [
            await stack.enter_async_context(
                server_process(
                    sys.executable, "-m", "relay", "serve", env=_env(pacer_url, port, args, redis_url)
                )
            )
            for port in ports[1:]
        ]
        await wait_until_up(f"{pacer_url}/queue")
        for url in urls:
            await wait_until_up(f"{url}/healthz")
        setups = {
            "memory": ([(urls[0], memory.pid)], None),
            "redis-1": ([(urls[1], replicas[0].pid)], redis),
            "redis-3": ([(url, process.pid) for url, process in zip(urls[1:], replicas, strict=True)], redis),
        }
        for number in range(1, args.repeat + 1):
            for setup, (relays, counted) in setups.items():
                if setup not in args.setups:
                    continue
                # A fresh client each time: its first relay to ask holds it, as in production.
                client = f"bench-{setup}-{number}"
                result = await measure(setup, relays, client, args, pacer_url, counted)
                rounds[setup].append(result)
                if args.verbose:
                    print(f"  round {number}: {_row(result)}", flush=True)
                await asyncio.sleep(0.2)
    results = [_median(rounds[setup]) for setup in SETUPS if rounds[setup]]
    for result in results:
        print(_row(result))
    base = results[0]
    for result in results[1:] if base.setup == "memory" else []:
        # CPU time comes in 10 ms ticks: a run too short to register one has no ratio.
        ratio = (
            result.relay_cpu_us_per_frame / base.relay_cpu_us_per_frame
            if base.relay_cpu_us_per_frame
            else None
        )
        print(
            f"{result.setup} vs memory: p50 added {result.p50_ms - base.p50_ms:+.3f} ms, "
            f"p99 added {result.p99_ms - base.p99_ms:+.3f} ms, CPU per delivered frame "
            f"{f'{ratio:.2f}x' if ratio is not None else 'n/a (too short to measure)'}, "
            f"{result.redis_commands_per_event:.2f} Redis commands per event"
        )
    return results


def _median(rounds: list[Result]) -> Result:
    values = {
        name: statistics.median(getattr(r, name) for r in rounds)
        for name in asdict(rounds[0])
        if name not in ("setup", "cpu_ms_per_relay")
    }
    return Result(
        setup=rounds[0].setup,
        subscribers=rounds[0].subscribers,
        events=int(values["events"]),
        p50_ms=values["p50_ms"],
        p99_ms=values["p99_ms"],
        relay_cpu_us_per_frame=values["relay_cpu_us_per_frame"],
        delivered_frames=int(values["delivered_frames"]),
        redis_commands_per_event=values["redis_commands_per_event"],
        cpu_ms_per_relay=rounds[len(rounds) // 2].cpu_ms_per_relay,
    )


def _row(r: Result) -> str:
    return (
        f"{r.setup:<8} N={r.subscribers:<4} latency p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms"
        f"  relay CPU/frame {r.relay_cpu_us_per_frame:6.2f} us"
        f"  Redis commands/event {r.redis_commands_per_event:.2f}  CPU ms by relay {r.cpu_ms_per_relay}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--subscribers", type=int, default=100, help="tabs of the one client (default: %(default)s)"
    )
    parser.add_argument(
        "--rate", type=float, default=20.0, help="upstream events per second (default: %(default)s)"
    )
    parser.add_argument(
        "--events", type=int, default=100, help="events per measurement (default: %(default)s)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds; medians are reported (default: %(default)s)"
    )
    parser.add_argument(
        "--setups", default=",".join(SETUPS), help="which to run, comma-separated (default: %(default)s)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every round, not only the medians")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.setups = args.setups.split(",")
    started = time.monotonic()
    print(
        f"replicas benchmark: N={args.subscribers}, rate {args.rate:g}/s, {args.events} events, "
        f"median of {args.repeat} rounds, {os.cpu_count()} CPUs"
    )
    results = asyncio.run(drive(args))
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
