"""Faults injected while clients run prompts, each run held to the same invariants
(tests/faults/browsers.py): every prompt gets exactly one ``relay.done`` on every tab, the
stream has no hole and no repeat, and no event of one client reaches another.

``FAULT_ROUNDS`` sets how many times each fault is injected per run: 2 in ``make test``, more
in ``make fuzz``. Every run reports what it did on one ``fault-run`` line (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from relay.emulator import EmulatorConfig, run_emulator
from relay.server import run_relay
from relay.serving import InLoopServer
from tests.conftest import relay_config
from tests.faults.browsers import Browser, Ledger, check
from tests.netcut import forwarder
from tests.relay_client import open_tab
from tests.relay_processes import RelayProcess
from tests.tracekit import load_trace

ROUNDS = int(os.environ.get("FAULT_ROUNDS", "2"))
CLIENTS = ("ana", "ben")


def graph(steps: int = 30, delay: float = 0.2) -> dict[str, Any]:
    """The interrupt trace's graph: a sampler of ``steps`` steps of ``delay`` seconds (at x1)."""
    prompt: dict[str, Any] = load_trace("04").workflow()
    prompt["2"]["inputs"].update(steps=steps, delay=delay)
    return prompt


def sampling(steps: int) -> dict[str, Any]:
    """The example text-to-image graph: a JPEG preview on every one of its ``steps`` steps."""
    prompt: dict[str, Any] = json.loads(
        resources.files("relay.emulator").joinpath("examples/text2img.json").read_text()
    )
    prompt["3"]["inputs"]["steps"] = steps
    return prompt


def report(name: str, **figures: Any) -> None:
    print(f"fault-run {name} " + " ".join(f"{k}={v}" for k, v in figures.items()))


async def submit(
    http: httpx.AsyncClient,
    ledger: Ledger,
    client_id: str,
    steps: int = 30,
    prompt: dict[str, Any] | None = None,
) -> str:
    """Submit through the relay, retrying while it is away (a restart in progress)."""
    async with asyncio.timeout(60):
        while True:
            try:
                # A step more each time: ComfyUI would serve an identical graph from its cache.
                body = {"prompt": prompt or graph(steps + len(ledger.owners)), "client_id": client_id}
                answer = await http.post("/prompt", json=body)
            except httpx.TransportError:
                await asyncio.sleep(0.1)
                continue
            if answer.status_code == 200:
                prompt_id: str = answer.json()["prompt_id"]
                ledger.add(client_id, prompt_id)
                return prompt_id
            assert answer.status_code in (502, 503, 504), answer.text  # ComfyUI away: try again
            await asyncio.sleep(0.1)


async def browsers(ws_url: str, per_client: int = 2) -> list[Browser]:
    tabs = [Browser(ws_url, client) for client in CLIENTS for _ in range(per_client)]
    for tab in tabs:
        await tab.until(lambda tab=tab: bool(tab.events), 30)
    return tabs


async def running(tab: Browser, prompt_id: str) -> None:
    """Until the prompt has started on ComfyUI, as this tab sees it (or has already ended)."""
    kinds = ("relay.progress", "relay.done", "relay.detached")
    await tab.until(
        lambda: any(e["type"] in kinds and e.get("prompt_id") == prompt_id for e in tab.events), 60
    )


async def finish(tabs: list[Browser], ledger: Ledger, *, resets_allowed: bool = False) -> dict[str, int]:
    totals: dict[str, int] = {"prompts": len(ledger.owners), "dones": 0, "reconnections": 0, "resets": 0}
    for tab in tabs:
        await tab.settled(ledger.of(tab.client_id))
    for tab in tabs:
        await tab.stop()
        for key, value in check(tab, ledger, resets_allowed=resets_allowed).items():
            totals[key] += value
    return totals


def statuses(tabs: list[Browser]) -> dict[str, int]:
    seen: dict[str, int] = {}
    for tab in tabs:
        for event in tab.events:
            if event["type"] == "relay.done":
                seen[event["status"]] = seen.get(event["status"], 0) + 1
    return seen


# ComfyUI's faults -----------------------------------------------------------------------


async def test_comfyui_killed_and_restarted_repeatedly() -> None:
    """ComfyUI restarts with prompts running and waiting, round after round: every prompt ends
    once on every tab, as a success or as lost (ComfyUI forgot it), never twice, never silently."""
    async with (
        run_emulator(EmulatorConfig(port=0, speed=10)) as emulator,
        run_relay(relay_config(emulator)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        ledger = Ledger()
        tabs = await browsers(relay.ws_url)
        for _ in range(ROUNDS):
            first = [await submit(http, ledger, client) for client in CLIENTS]
            for client in CLIENTS:
                await submit(http, ledger, client)
            await running(tabs[0], first[0])
            await emulator.restart()
        last = [await submit(http, ledger, client, steps=3) for client in CLIENTS]
        totals = await finish(tabs, ledger)
        seen = statuses(tabs)
        assert set(seen) <= {"success", "error"}, seen
        for tab in tabs:  # ComfyUI is back: the last prompts ran
            assert tab.done(last[CLIENTS.index(tab.client_id)])[0]["status"] == "success"
        lost = [e for t in tabs for e in t.events if e["type"] == "relay.done" and e["status"] == "error"]
        assert all(e["recovered"] and e["error"]["exception_type"] == "PromptLost" for e in lost)
        report("comfyui-restarts", restarts=ROUNDS, **totals, **seen)


@pytest.mark.parametrize("cut", ["reset", "half-open", "blackhole"])
async def test_upstream_cuts(cut: str) -> None:
    """The relay's sockets to ComfyUI are cut (reset at once, left half-open, or black-holed)
    while prompts run: ComfyUI keeps working, so every prompt ends in success, exactly once."""
    async with run_emulator(EmulatorConfig(port=0, speed=10)) as emulator, forwarder(emulator.port) as link:
        config = relay_config(emulator, comfyui_url=link.url, stall_check_interval=0.5, ws_ping_interval=1.0)
        async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
            ledger = Ledger()
            tabs = await browsers(relay.ws_url)
            cuts = 0
            for _ in range(ROUNDS):
                prompts = [await submit(http, ledger, client) for client in CLIENTS]
                await running(tabs[0], prompts[0])
                if cut == "reset":
                    cuts += link.cut(websockets_only=True)
                elif cut == "half-open":
                    cuts += link.cut(hold=1.0, websockets_only=True)
                else:
                    cuts += link.cut(hold=1.5, blackhole=True, websockets_only=True)
                await tabs[0].settled([prompts[0]])
            totals = await finish(tabs, ledger)
            assert statuses(tabs) == {"success": totals["dones"]}, statuses(tabs)
            report(f"upstream-{cut}", connections_cut=cuts, **totals)


class GarbageComfy:
    """A server on ComfyUI's port that answers everything with nonsense, slowly or not."""

    def __init__(self) -> None:
        self.delay = 0.0

    async def http(self, request: Request) -> Response:
        await asyncio.sleep(self.delay)
        bodies = [b"<html>oops</html>", b"{not json", b"[]", b'{"prompt_id": 7}', b"\xff\xfe"]
        return Response(bodies[len(request.url.path) % len(bodies)], status_code=200)

    async def socket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        for frame in ("not json", '{"type": 5}', '{"type": "executing", "data": 3}', '{"type": "progress"}'):
            await websocket.send_text(frame)
        await websocket.send_bytes(b"\x00\x00\x00\x09junk")
        await websocket.close()

    def app(self) -> Starlette:
        return Starlette(routes=[WebSocketRoute("/ws", self.socket),
                                 Route("/{path:path}", self.http, methods=["GET", "POST"])])  # fmt: skip


@contextlib.asynccontextmanager
async def garbage_comfy() -> AsyncIterator[tuple[GarbageComfy, InLoopServer]]:
    fake = GarbageComfy()

    def build(port: int) -> tuple[Starlette, uvicorn.Server]:
        app = fake.app()
        return app, uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    server = InLoopServer("127.0.0.1", 0, build, name="garbage-comfy")
    await server.start()
    try:
        yield fake, server
    finally:
        await server.stop()


def at_url(url: str) -> Any:
    """What relay_config needs of an emulator (its URL), for a server that is not one."""
    return SimpleNamespace(url=url)


async def test_comfyui_answering_garbage_or_slowly() -> None:
    """A ComfyUI that answers nonsense, then answers too slowly: the relay answers 502/504 in
    JSON (never a 5xx of its own, never a traceback), its tabs stay open, and it stays healthy."""
    async with (
        garbage_comfy() as (fake, server),
        run_relay(relay_config(at_url(server.url), http_read_timeout=0.5)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        tab = await open_tab(relay.ws_url, "clientId=garbage")
        await tab.wait_type("relay.hello")
        answers: dict[int, int] = {}
        requests = [("POST", "/prompt", {"prompt": graph(), "client_id": "garbage"}),
                    ("GET", "/queue", None), ("GET", "/history", None), ("GET", "/system_stats", None),
                    ("GET", "/object_info", None), ("POST", "/interrupt", {}),
                    ("GET", "/view?filename=a.png&type=output", None)]  # fmt: skip
        for slow in (False, True):
            fake.delay = 1.0 if slow else 0.0
            for method, path, body in requests:
                answer = await http.request(method, path, json=body)
                answers[answer.status_code] = answers.get(answer.status_code, 0) + 1
                assert "Traceback" not in answer.text
                assert answer.status_code < 500 or answer.status_code in (502, 504), (path, answer.text)
                if slow and answer.status_code >= 500:
                    assert answer.json()["error"]["type"] in ("upstream_timeout", "upstream_unavailable")
        assert (await http.get("/healthz")).status_code == 200
        assert not tab.closed.is_set()
        await tab.close()
        report("garbage-comfyui", requests=2 * len(requests), answers=answers)


async def test_garbage_frames_on_a_clients_comfyui_socket() -> None:
    """Nonsense on one client's ComfyUI socket (not JSON, wrong shapes, unknown binary) does
    not end its prompts wrongly, and reaches no other client."""
    async with (
        run_emulator(EmulatorConfig(port=0, speed=10)) as emulator,
        run_relay(relay_config(emulator)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        ledger = Ledger()
        tabs = await browsers(relay.ws_url, per_client=1)
        garbage = ["not json", "{}", '{"type": null}', '{"type": "executing", "data": "x"}',
                   '{"type": "progress", "data": {"value": "a", "max": 0}}',
                   '{"type": "executed", "data": []}',
                   '{"type": "execution_success", "data": {"prompt_id": 5}}', "[" * 10_000]  # fmt: skip
        sent = 0
        for _ in range(ROUNDS):
            prompts = [await submit(http, ledger, client) for client in CLIENTS]
            await running(tabs[0], prompts[0])
            for connection in emulator.state.hub.live():
                if connection.sid.startswith("ana."):
                    for frame in garbage:
                        await connection.send(frame)
                        sent += 1
                    await connection.send(b"\x00\x00\x00\x63" + os.urandom(64))
                    sent += 1
        totals = await finish(tabs, ledger)
        assert statuses(tabs) == {"success": totals["dones"]}, statuses(tabs)
        assert (await http.get("/healthz")).status_code == 200
        report("garbage-frames", frames=sent, **totals)


# The relay's own faults -----------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """Where the relay keeps events: in memory (""), or in a real redis-server."""
    if request.param == "memory":
        return ""
    url: str = request.getfixturevalue("redis_server").url
    return url


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_relay_stopped_mid_run(redis_url: str, how: str, tmp_path: Path) -> None:
    """The relay process is stopped (SIGTERM, as in a rolling update) or killed (SIGKILL, an
    OOM kill) with prompts in flight, and started again on the same port. With Redis nothing is
    lost: every tab resumes and sees every prompt end exactly once. In memory the stream starts
    over (the hello says so) and the new relay follows what ComfyUI still has: every prompt
    ends exactly once on every tab, except one that ended while no relay was there to see it,
    which ends at most once; and every relay.done says what ComfyUI's history says."""
    backend = "redis" if redis_url else "memory"
    async with run_emulator(EmulatorConfig(port=0, speed=10)) as emulator:
        env = {**os.environ, "COMFYUI_URL": emulator.url, "RELAY_REDIS_URL": redis_url,
               "RELAY_LEASE_TTL": "1.0", "RELAY_UPSTREAM_GRACE": "0.5", "RELAY_RECONNECT_INITIAL": "0.05",
               "RELAY_RECONNECT_MAX": "0.5", "RELAY_DETACHED_POLL_INTERVAL": "0.5", "RELAY_ETA_FILE": "",
               "RELAY_LOG_FORMAT": "json", "RELAY_SHUTDOWN_GRACE": "3"}  # fmt: skip
        relay = RelayProcess("relay", env, tmp_path / "relay.log")
        await relay.start()
        outages: list[tuple[float, float]] = []
        try:
            async with httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
                ledger = Ledger()
                tabs = await browsers(relay.ws_url)
                for _ in range(ROUNDS):
                    prompts = [await submit(http, ledger, client, steps=80) for client in CLIENTS]
                    await running(tabs[0], prompts[0])
                    down = time.time()
                    await (relay.stop() if how == "SIGTERM" else relay.kill())
                    await relay.start()
                    outages.append((down, time.time()))
                for client in CLIENTS:
                    await submit(http, ledger, client, steps=3)
                truth = await comfyui_history(http, ledger)

                def unseen(prompt_id: str) -> bool:
                    """Ended while no relay was there (from just before a stop to just after
                    the restart): nobody could report it."""
                    ended = truth[prompt_id][1]
                    return backend == "memory" and any(a - 0.5 <= ended <= b + 1.0 for a, b in outages)

                for tab in tabs:
                    owed = [p for p in ledger.of(tab.client_id) if not unseen(p)]
                    await tab.until(lambda tab=tab, owed=owed: all(tab.done(p) for p in owed), 60)
                    for prompt_id in ledger.of(tab.client_id):
                        for done in tab.done(prompt_id):
                            assert done["status"] == truth[prompt_id][0], (prompt_id, done, truth[prompt_id])
                totals = await finish(tabs, ledger, resets_allowed=backend == "memory")
                unreported = sum(not tab.done(p) for tab in tabs for p in ledger.of(tab.client_id))
                report(f"relay-{how}-{backend}", stops=ROUNDS, **totals, **statuses(tabs),
                       unreported=unreported, ended_while_down=sum(map(unseen, ledger.owners)))  # fmt: skip
        finally:
            await relay.stop()


async def comfyui_history(http: httpx.AsyncClient, ledger: Ledger) -> dict[str, tuple[str, float]]:
    """Each prompt's outcome and end time (seconds), from ComfyUI's history read through the
    relay, once every prompt has run."""
    truth: dict[str, tuple[str, float]] = {}
    for prompt_id in ledger.owners:
        async with asyncio.timeout(90):
            while True:
                entry = (await http.get(f"/history/{prompt_id}")).json().get(prompt_id)
                if entry is not None and entry.get("status", {}).get("completed") is not None:
                    break
                await asyncio.sleep(0.2)
        status = entry["status"]
        ended = max(m[1]["timestamp"] for m in status["messages"] if "timestamp" in m[1]) / 1000
        truth[prompt_id] = (status["status_str"], ended)
    return truth


# Browsers' faults -----------------------------------------------------------------------


async def test_stalled_browser_is_cut_loose_and_resumes() -> None:
    """A tab that stops reading does not slow the others: they get every event in order. When
    it reads again it finds, in order, every step and every relay.done (progress may have been
    coalesced); if the relay had to close it (1013), a resume gets it the rest."""
    async with (
        run_emulator(EmulatorConfig(port=0, speed=10)) as emulator,
        run_relay(relay_config(emulator, subscriber_queue=8)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        ledger = Ledger()
        tabs = await browsers(relay.ws_url, per_client=1)
        # A stalled tab with a small receive window, taking ComfyUI's raw frames too (each
        # sampler step's JPEG preview): greeted, then not read until the end.
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", relay.port))
        raw.setblocking(False)
        stalled = await websockets.connect(
            f"{relay.ws_url}?clientId=ana&events=all", sock=raw, max_queue=1, max_size=None
        )
        hello = json.loads(await stalled.recv())
        for _ in range(ROUNDS * 2):
            for client in CLIENTS:
                await submit(http, ledger, client, prompt=sampling(60))
        totals = await finish(tabs, ledger)
        # The stalled tab reads again: everything queued for it, or up to a 1013 close.
        seen: list[dict[str, Any]] = []
        wanted = set(ledger.of("ana"))
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(60):
                while wanted - {e.get("prompt_id") for e in seen if e["type"] == "relay.done"}:
                    frame = await stalled.recv()
                    if isinstance(frame, str) and (event := json.loads(frame))["type"].startswith("relay."):
                        seen.append(event)
        code = stalled.close_code
        assert code in (None, 1013), code
        seqs = [e["seq"] for e in seen]
        assert seqs == sorted(set(seqs)), "events out of order or repeated"
        if code == 1013:
            last = seen[-1]["seq"] if seen else hello["seq"]
            resumed = await open_tab(relay.ws_url, f"clientId=ana&since={last}&epoch={hello['epoch']}")
            await resumed.wait_type("relay.hello")
            for prompt_id in wanted:
                if not any(e["type"] == "relay.done" and e.get("prompt_id") == prompt_id for e in seen):
                    await resumed.wait_done(prompt_id, timeout=30)
            seen += resumed.events[1:]
            await resumed.close()
        else:
            await stalled.close()
        for prompt_id in wanted:
            assert sum(e["type"] == "relay.done" and e.get("prompt_id") == prompt_id for e in seen) == 1
        coalesced = sum(b - a - 1 for a, b in itertools.pairwise(seqs))
        report("stalled-browser", close=code, skipped_by_coalescing=coalesced, **totals)


async def test_connection_flood_is_bounded() -> None:
    """One client opens sockets far past its limit and floods HTTP: the extra sockets get 4429,
    the extra requests 429, all in the documented form, while another client runs a prompt."""
    async with (
        run_emulator(EmulatorConfig(port=0, speed=10)) as emulator,
        run_relay(relay_config(emulator, max_connections_per_client=20, max_http_requests=16)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        ledger = Ledger()
        bystander = Browser(relay.ws_url, "ben")
        await bystander.until(lambda: bool(bystander.events), 30)
        prompt_id = await submit(http, ledger, "ben", steps=20)
        flood = await asyncio.gather(*(open_tab(relay.ws_url, "clientId=ana") for _ in range(60)))
        codes: dict[int | None, int] = {}
        for tab in flood:
            first = await tab.wait_for(lambda e: e["type"] in ("relay.hello", "relay.error"))
            if first["type"] == "relay.error":
                await tab.closed.wait()
                codes[tab.close_code] = codes.get(tab.close_code, 0) + 1
        assert codes == {4429: 40}, codes
        async with httpx.AsyncClient(
            base_url=relay.url, timeout=30, limits=httpx.Limits(max_connections=200)
        ) as many:
            answers = await asyncio.gather(*(many.get("/object_info") for _ in range(150)))
        statuses_seen = sorted({a.status_code for a in answers})
        assert set(statuses_seen) <= {200, 429}, statuses_seen
        assert all(a.json()["error"]["type"] == "too_many_requests" for a in answers if a.status_code == 429)
        for tab in flood:
            await tab.close()
        # The flood is gone: the client may open sockets again.
        again = await open_tab(relay.ws_url, "clientId=ana")
        assert (await again.wait_for(lambda e: e["type"] in ("relay.hello", "relay.error")))[
            "type"
        ] == "relay.hello"
        await again.close()
        await bystander.settled([prompt_id])
        await bystander.stop()
        check(bystander, ledger, resets_allowed=False)
        report("flood", sockets=60, refused_sockets=codes.get(4429, 0), requests=150,
               answered_429=sum(a.status_code == 429 for a in answers))  # fmt: skip
