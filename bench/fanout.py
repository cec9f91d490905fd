"""Fan-out benchmark: N tabs of one client, an upstream emitting progress at a fixed rate.

Three processes on 127.0.0.1:

* the *pacer*, a minimal ComfyUI stand-in (this file with ``--pacer``) that runs one prompt by
  sending ``progress`` messages at ``--rate`` per second and records when it sent each one;
* the relay, started as ``comfy-relay serve`` in front of the pacer;
* this driver, which holds the N client sockets and timestamps what they receive.

For each N it measures, in the same run:

* **direct**: N sockets connected straight to the pacer, which sends every message to each of
  them in turn (what an upstream doing its own fan-out costs);
* **relay**: N sockets on one clientId at the relay; the pacer sends each message once.

Reported: delivered frames per second, the relay's CPU time per delivered frame (from
/proc, utime + stime), p50/p99 latency from the pacer's send to the client's receive for both
paths and their ratio, and the relay's resident memory per idle subscriber (RSS growth while N
sockets connect and sit idle, divided by N). Both clocks are CLOCK_MONOTONIC, shared by all
processes on the machine.

    .venv/bin/python bench/fanout.py                   # N = 1, 100, 1000
    .venv/bin/python bench/fanout.py --subscribers 100 --rate 50 --events 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
import websockets
from _common import free_port, server_process, wait_until_up
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

CLIENT = "bench"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# The pacer ----------------------------------------------------------------------------------


class Pacer:
    def __init__(self) -> None:
        self.sockets: dict[str, WebSocket] = {}
        self.direct: list[WebSocket] = []
        self.sent: list[float] = []
        self.rate = 20.0
        self.events = 100
        self.tasks: set[asyncio.Task[None]] = set()

    async def ws(self, websocket: WebSocket) -> None:
        client_id = websocket.query_params.get("clientId", "anon")
        await websocket.accept()
        status = {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id},
        }
        await websocket.send_text(json.dumps(status))
        direct = client_id.startswith("direct")
        (self.direct.append if direct else self.sockets.__setitem__)(
            *((websocket,) if direct else (client_id, websocket))
        )
        try:
            while True:
                await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if direct:
                self.direct.remove(websocket)
            else:
                self.sockets.pop(client_id, None)

    async def object_info(self, request: Request) -> Response:
        return Response(orjson.dumps({"BenchSave": {"output_node": True}}), media_type="application/json")

    async def prompt(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        prompt_id, client_id = body["prompt_id"], body["client_id"]
        task = asyncio.create_task(self._run(self.sockets[client_id], prompt_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return Response(orjson.dumps({"prompt_id": prompt_id, "number": 0, "node_errors": {}}))

    async def queue(self, request: Request) -> Response:
        return Response(b'{"queue_running": [], "queue_pending": []}', media_type="application/json")

    async def history(self, request: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    async def start_direct(self, request: Request) -> Response:
        self.rate = float(request.query_params["rate"])
        self.events = int(request.query_params["events"])
        task = asyncio.create_task(self._direct())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return Response(b"{}")

    async def configure(self, request: Request) -> Response:
        self.rate = float(request.query_params["rate"])
        self.events = int(request.query_params["events"])
        return Response(b"{}")

    async def sent_times(self, request: Request) -> Response:
        return Response(orjson.dumps({"sent": self.sent}), media_type="application/json")

    async def _direct(self) -> None:
        self.sent = []
        start = time.monotonic()
        for i in range(self.events):
            await _sleep_until(start + i / self.rate)
            frame = _progress(i, self.events, "direct")
            self.sent.append(time.monotonic())
            for websocket in list(self.direct):
                await websocket.send_text(frame)
        done = json.dumps({"type": "executing", "data": {"node": None, "prompt_id": "direct"}})
        for websocket in list(self.direct):
            await websocket.send_text(done)

    async def _run(self, websocket: WebSocket, prompt_id: str) -> None:
        def message(kind: str, **data: Any) -> str:
            return json.dumps({"type": kind, "data": {**data, "prompt_id": prompt_id}})

        self.sent = []
        await websocket.send_text(message("execution_start", timestamp=0))
        await websocket.send_text(message("execution_cached", nodes=[], timestamp=0))
        await websocket.send_text(message("executing", node="1", display_node="1"))
        start = time.monotonic()
        for i in range(self.events):
            await _sleep_until(start + i / self.rate)
            frame = _progress(i, self.events, prompt_id)
            self.sent.append(time.monotonic())
            await websocket.send_text(frame)
        await websocket.send_text(message("executed", node="1", display_node="1", output={"images": []}))
        await websocket.send_text(message("execution_success", timestamp=0))
        await websocket.send_text(message("executing", node=None))


def _progress(i: int, total: int, prompt_id: str) -> str:
    return json.dumps(
        {"type": "progress", "data": {"value": i, "max": total, "prompt_id": prompt_id, "node": "1"}}
    )


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def run_pacer(port: int) -> None:
    pacer = Pacer()
    routes = [
        WebSocketRoute("/ws", pacer.ws),
        Route("/object_info", pacer.object_info),
        Route("/prompt", pacer.prompt, methods=["POST"]),
        Route("/queue", pacer.queue),
        Route("/history/{prompt_id}", pacer.history),
        Route("/bench/direct", pacer.start_direct, methods=["POST"]),
        Route("/bench/configure", pacer.configure, methods=["POST"]),
        Route("/bench/sent", pacer.sent_times),
    ]
    app = Starlette(routes=routes)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws_per_message_deflate=False,
        ws_ping_interval=None,
    )
    uvicorn.Server(config).run()


# The driver --------------------------------------------------------------------------------


@dataclass
class Result:
    subscribers: int
    rate: float
    events: int
    direct_p50_ms: float
    direct_p99_ms: float
    relay_p50_ms: float
    relay_p99_ms: float
    p50_ratio: float
    p99_ratio: float
    delivered_frames: int
    frames_per_second: float
    relay_cpu_us_per_frame: float
    pacer_cpu_us_per_frame_direct: float
    idle_kb_per_subscriber: float


class Client:
    def __init__(self, connection: websockets.ClientConnection, *, relay: bool) -> None:
        self.connection = connection
        self.relay = relay
        self.received: list[tuple[int, float]] = []  # (progress value, receive time)
        self.frames = 0
        self.done = asyncio.Event()
        self.hello = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for frame in self.connection:
                now = time.monotonic()
                message = orjson.loads(frame)
                self.frames += 1
                kind = message["type"]
                if kind in ("relay.hello", "status"):
                    self.hello.set()
                elif kind in ("relay.progress", "progress"):
                    data = message if self.relay else message["data"]
                    self.received.append((data["value"], now))
                elif kind == "relay.done" or (kind == "executing" and message["data"]["node"] is None):
                    self.done.set()


def _quiet_driver() -> None:
    """Collect now and not during the measurement: the driver piles up hundreds of thousands of
    samples, and its own collector pausing would show up as latency of whatever is measured."""
    gc.collect()
    gc.disable()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


async def _connect(url: str, n: int, *, relay: bool, client: str = CLIENT) -> list[Client]:
    clients: list[Client] = []
    for i in range(n):
        query = f"clientId={client}" if relay else f"clientId=direct-{i}"
        connection = await websockets.connect(
            f"{url}?{query}", max_size=None, compression=None, open_timeout=30
        )
        clients.append(Client(connection, relay=relay))
    async with asyncio.timeout(60):
        await asyncio.gather(*(c.hello.wait() for c in clients))
    return clients


async def _close(clients: list[Client]) -> None:
    await asyncio.gather(*(c.connection.close() for c in clients), return_exceptions=True)
    for client in clients:
        client.task.cancel()


def _latencies(clients: list[Client], sent: list[float]) -> list[float]:
    return [
        (received - sent[value]) * 1000
        for c in clients
        for value, received in c.received
        if value < len(sent)
    ]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def measure(
    n: int, rate: float, events: int, pacer_url: str, pacer_pid: int, relay_url: str, relay_pid: int
) -> Result:
    async with httpx.AsyncClient(timeout=60) as http:
        # Direct: the pacer fans out to N sockets itself.
        direct = await _connect(pacer_url.replace("http", "ws") + "/ws", n, relay=False)
        _quiet_driver()
        cpu_before = _cpu_seconds(pacer_pid)
        await http.post(f"{pacer_url}/bench/direct", params={"rate": rate, "events": events})
        async with asyncio.timeout(events / rate + 60):
            await asyncio.gather(*(c.done.wait() for c in direct))
        pacer_cpu = _cpu_seconds(pacer_pid) - cpu_before
        gc.enable()
        sent = (await http.get(f"{pacer_url}/bench/sent")).json()["sent"]
        direct_latency = _latencies(direct, sent)
        direct_frames = sum(len(c.received) for c in direct)
        await _close(direct)

        # Relay: N idle tabs (memory), then one prompt fanned out by the relay.
        await asyncio.sleep(0.5)
        rss_before = _rss_bytes(relay_pid)
        tabs = await _connect(relay_url.replace("http", "ws") + "/ws", n, relay=True)
        await asyncio.sleep(1.0)
        idle_kb = (_rss_bytes(relay_pid) - rss_before) / n / 1024
        await http.post(f"{pacer_url}/bench/configure", params={"rate": rate, "events": events})
        frames_before = sum(c.frames for c in tabs)
        _quiet_driver()
        cpu_before = _cpu_seconds(relay_pid)
        started = time.monotonic()
        body = {"prompt": {"1": {"class_type": "BenchSave", "inputs": {}}}, "client_id": CLIENT}
        response = await http.post(f"{relay_url}/prompt", json=body)
        response.raise_for_status()
        async with asyncio.timeout(events / rate + 60):
            await asyncio.gather(*(c.done.wait() for c in tabs))
        elapsed = time.monotonic() - started
        relay_cpu = _cpu_seconds(relay_pid) - cpu_before
        gc.enable()
        delivered = sum(c.frames for c in tabs) - frames_before
        sent = (await http.get(f"{pacer_url}/bench/sent")).json()["sent"]
        relay_latency = _latencies(tabs, sent)
        await _close(tabs)

    d50, d99 = _percentile(direct_latency, 50), _percentile(direct_latency, 99)
    r50, r99 = _percentile(relay_latency, 50), _percentile(relay_latency, 99)
    return Result(
        subscribers=n,
        rate=rate,
        events=events,
        direct_p50_ms=round(d50, 3),
        direct_p99_ms=round(d99, 3),
        relay_p50_ms=round(r50, 3),
        relay_p99_ms=round(r99, 3),
        p50_ratio=round(r50 / d50, 2),
        p99_ratio=round(r99 / d99, 2),
        delivered_frames=delivered,
        frames_per_second=round(delivered / elapsed, 1),
        relay_cpu_us_per_frame=round(relay_cpu / delivered * 1e6, 2),
        pacer_cpu_us_per_frame_direct=round(pacer_cpu / max(1, direct_frames) * 1e6, 2),
        idle_kb_per_subscriber=round(idle_kb, 1),
    )


async def drive(args: argparse.Namespace) -> list[Result]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pacer_port, relay_port = free_port(), free_port()
    pacer_url, relay_url = f"http://127.0.0.1:{pacer_port}", f"http://127.0.0.1:{relay_port}"
    env = {
        **os.environ,
        "COMFYUI_URL": pacer_url,
        "RELAY_PORT": str(relay_port),
        "RELAY_LOG_LEVEL": "warning",
        "RELAY_UPSTREAM_GRACE": "300",
        "RELAY_ETA_FILE": "",
        # Every tab is on one client id: allow as many as the largest N.
        "RELAY_MAX_CONNECTIONS_PER_CLIENT": str(max(args.subscribers) + 10),
    }
    results = []
    async with (
        server_process(sys.executable, __file__, "--pacer", str(pacer_port)) as pacer,
        server_process(sys.executable, "-m", "relay", "serve", env=env) as relay,
    ):
        await wait_until_up(f"{pacer_url}/queue")
        await wait_until_up(f"{relay_url}/healthz")
        for n in args.subscribers:
            rounds = []
            for number in range(1, args.repeat + 1):
                rounds.append(
                    await measure(n, args.rate, args.events, pacer_url, pacer.pid, relay_url, relay.pid)
                )
                if args.verbose:
                    print(f"  round {number}: {_row(rounds[-1])}", flush=True)
            result = _median(rounds)
            results.append(result)
            print(_row(result), flush=True)
    return results


def _median(rounds: list[Result]) -> Result:
    """Each figure's median over the rounds; the ratios are recomputed from the median latencies."""
    values = {name: statistics.median(getattr(r, name) for r in rounds) for name in asdict(rounds[0])}
    values["subscribers"], values["events"] = rounds[0].subscribers, rounds[0].events
    values["delivered_frames"] = int(values["delivered_frames"])
    # Memory: the first round is the one that grows the process; later rounds reuse what it freed.
    values["idle_kb_per_subscriber"] = max(r.idle_kb_per_subscriber for r in rounds)
    values["p50_ratio"] = round(values["relay_p50_ms"] / values["direct_p50_ms"], 2)
    values["p99_ratio"] = round(values["relay_p99_ms"] / values["direct_p99_ms"], 2)
    return Result(**values)


def _row(r: Result) -> str:
    return (
        f"N={r.subscribers:<5} frames/s={r.frames_per_second:>9.1f}"
        f"  relay CPU/frame={r.relay_cpu_us_per_frame:>6.2f} us"
        f"  (direct fan-out {r.pacer_cpu_us_per_frame_direct:>6.2f} us)"
        f"  latency p50 {r.relay_p50_ms:.2f}/{r.direct_p50_ms:.2f} ms = {r.p50_ratio:.2f}x"
        f"  p99 {r.relay_p99_ms:.2f}/{r.direct_p99_ms:.2f} ms = {r.p99_ratio:.2f}x"
        f"  idle {r.idle_kb_per_subscriber:.1f} KB/sub"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pacer", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--subscribers", default="1,100,1000", help="comma-separated N values (default: %(default)s)"
    )
    parser.add_argument(
        "--rate", type=float, default=20.0, help="upstream events per second (default: %(default)s)"
    )
    parser.add_argument(
        "--events", type=int, default=100, help="events per measurement (default: %(default)s)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds per N; medians are reported (default: %(default)s)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every round, not only the medians")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.pacer:
        run_pacer(args.pacer)
        return
    args.subscribers = [int(n) for n in args.subscribers.split(",")]
    print(
        f"fan-out benchmark: rate {args.rate:g}/s, {args.events} events per measurement, "
        f"median of {args.repeat} rounds, {os.cpu_count()} CPUs"
    )
    results = asyncio.run(drive(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
