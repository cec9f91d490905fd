"""What an operator sees: /healthz, /readyz following ComfyUI, and /metrics moving with a run."""

from __future__ import annotations

import asyncio
import gc
import io
from typing import Any, cast

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.websockets import WebSocket

from relay.backends import Backends
from relay.config import RelayConfig
from relay.emulator import RunningEmulator
from relay.fanout import Subscriber
from relay.metrics import Metrics
from relay.server import RunningRelay, run_relay
from relay.sessions import ClientSession, live_state
from tests.conftest import relay_config
from tests.relay_client import open_tab
from tests.test_fanout import FakeSocket, progress, settle, step

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and labels (the reference parser)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def until_status(
    http: httpx.AsyncClient, path: str, status: int, timeout: float = 10
) -> httpx.Response:
    async with asyncio.timeout(timeout):
        while True:
            response = await http.get(path)
            if response.status_code == status:
                return response
            await asyncio.sleep(0.1)


async def test_readyz_follows_comfyui(relay: RunningRelay, emulator: RunningEmulator) -> None:
    """/readyz is 200 while ComfyUI answers, 503 with a JSON reason while it is gone, 200 again after."""
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ready"
        assert body["comfyui"]["reachable"] is True
        assert body["comfyui"]["queue_remaining"] == 0

        await emulator.stop()
        down = await until_status(http, "/readyz", 503)
        assert down.headers["content-type"] == "application/json"
        reason = down.json()
        assert reason["status"] == "unready"
        assert reason["reason"] == "comfyui_unreachable"
        assert "unreachable" in reason["message"]
        # Liveness does not depend on ComfyUI: the process is fine.
        assert (await http.get("/healthz")).status_code == 200
        assert value(await scrape(http), "relay_comfyui_up") == 0

        await emulator.start()
        back = await until_status(http, "/readyz", 200)
        assert back.json()["comfyui"]["reachable"] is True
        assert value(await scrape(http), "relay_comfyui_up") == 1


async def test_readyz_probes_share_one_check(relay: RunningRelay, emulator: RunningEmulator) -> None:
    """Fifty probes at once cost ComfyUI one request: answers are shared and kept for a second."""
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        await asyncio.sleep(1.1)  # whatever an earlier check left has gone stale
        before = value(
            await scrape(http), "relay_http_requests_total", route="/readyz", method="GET", status="200"
        )
        answers = await asyncio.gather(*(http.get("/readyz") for _ in range(50)))
        assert all(answer.status_code == 200 for answer in answers)
        latencies = {answer.json()["comfyui"]["latency_ms"] for answer in answers}
        assert len(latencies) == 1, "every probe got the same, single check"
        after = value(
            await scrape(http), "relay_http_requests_total", route="/readyz", method="GET", status="200"
        )
        assert after - before == 50


async def test_metrics_move_as_a_run_goes_through(relay: RunningRelay, emulator: RunningEmulator) -> None:
    """A workflow run, a download, an upload, resumes and an upstream reconnect all show in /metrics."""
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        before = await scrape(http)
        tab = await open_tab(relay.ws_url, "clientId=metrics")
        await tab.wait_type("relay.hello")
        response = await http.post("/workflows/text2img/prompt", json={"client_id": "metrics", "params": {}})
        assert response.status_code == 200, response.text
        prompt_id = response.json()["prompt_id"]
        done = await tab.wait_done(prompt_id)
        assert done["status"] == "success"
        steps_done = len([e for e in tab.of("relay.step", prompt_id) if e["state"] == "done"])
        during = await scrape(http)

        def moved(name: str, **labels: str) -> float:
            return value(during, name, **labels) - value(before, name, **labels)

        assert value(during, "relay_browser_connections", events="relay") == 1
        assert value(during, "relay_upstream_sockets", state="connected") == 1
        assert value(during, "relay_clients") >= 1
        assert value(during, "relay_asyncio_tasks") >= 1  # the upstream reader at least
        assert value(during, "process_open_fds") >= 2  # the listening socket and this connection
        assert value(during, "process_resident_memory_bytes") > 10_000_000
        assert moved("relay_events_total", type="relay.step") == len(tab.of("relay.step", prompt_id))
        assert moved("relay_events_total", type="relay.done") == 1
        assert moved("relay_prompts_total", status="success", workflow="text2img") == 1
        assert moved("relay_prompt_duration_seconds_count", workflow="text2img") == 1
        assert moved("relay_prompt_duration_seconds_sum", workflow="text2img") > 0
        assert moved("relay_step_duration_seconds_count", workflow="text2img") == steps_done
        assert moved("relay_comfyui_frames_total", kind="text") > 0
        route = {"route": "/workflows/{name}/prompt", "method": "POST", "status": "200"}
        assert moved("relay_http_requests_total", **route) == 1

        # A download and an upload: bytes counted each way on their routes.
        image = done["outputs"][next(iter(done["outputs"]))]["images"][0]
        view = await http.get("/view", params=image)
        assert view.status_code == 200
        png = io.BytesIO()
        Image.new("RGB", (64, 64), "orange").save(png, format="PNG")
        files = {"image": ("metrics.png", png.getvalue(), "image/png")}
        assert (await http.post("/upload/image", files=files)).status_code == 200
        after_io = await scrape(http)
        sent = value(after_io, "relay_http_bytes_total", route="/view", direction="out") - value(
            before, "relay_http_bytes_total", route="/view", direction="out"
        )
        assert sent == len(view.content)
        received = value(after_io, "relay_http_bytes_total", route="/upload/image", direction="in")
        assert received > len(png.getvalue())
        assert value(after_io, "relay_http_requests_total", route="/view", method="GET", status="200") >= 1

        # Resuming: once from the last seq (replayed), once from a stale epoch (a gap).
        last = tab.events[-1]["seq"]
        epoch = tab.of("relay.hello")[0]["epoch"]
        await tab.close()
        resumed = await open_tab(relay.ws_url, f"clientId=metrics&since={last - 3}&epoch={epoch}")
        await resumed.wait_type("relay.hello")
        stale = await open_tab(relay.ws_url, "clientId=metrics&since=5&epoch=00000000")
        await stale.wait_type("relay.hello")
        resumes = await scrape(http)
        assert (
            value(resumes, "relay_resumes_total", result="replayed")
            - value(before, "relay_resumes_total", result="replayed")
            == 1
        )
        assert (
            value(resumes, "relay_replayed_events_total") - value(before, "relay_replayed_events_total") == 3
        )
        assert (
            value(resumes, "relay_resumes_total", result="gap")
            - value(before, "relay_resumes_total", result="gap")
            == 1
        )
        assert value(resumes, "relay_browser_connections", events="relay") == 2

        # ComfyUI drops the relay's socket: the relay reconnects and counts it.
        await emulator.drop_sockets()
        await resumed.wait_for(lambda e: e["type"] == "relay.upstream" and e["state"] == "down")
        await resumed.wait_for(lambda e: e["type"] == "relay.upstream" and e["state"] == "connected")
        reconnected = await scrape(http)
        assert (
            value(reconnected, "relay_upstream_reconnects_total")
            - value(before, "relay_upstream_reconnects_total")
            == 1
        )
        assert value(reconnected, "relay_upstream_failures_total") >= 1
        await resumed.close()
        await stale.close()
        gone = await scrape(http)
        assert value(gone, "relay_browser_connections", events="relay") == 0


async def test_rejected_prompt_is_counted(relay: RunningRelay, relay_http: httpx.AsyncClient) -> None:
    """A graph ComfyUI refuses is counted as rejected, under the custom-graph label."""
    graph = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    before = await scrape(relay_http)
    response = await relay_http.post("/prompt", json={"prompt": graph, "client_id": "rejected"})
    assert response.status_code == 400
    after = await scrape(relay_http)
    key = {"status": "rejected", "workflow": "custom"}
    assert value(after, "relay_prompts_total", **key) - value(before, "relay_prompts_total", **key) == 1


async def test_slow_socket_counters() -> None:
    """Frames coalesced and dropped for a stalled socket, and its closing, reach the scrape."""
    config = RelayConfig(eta_file="")
    metrics = Metrics()
    backends = Backends(config, metrics)
    session = ClientSession("slow", config, backends, metrics=metrics)
    metrics.watch(lambda: live_state([session]))
    socket = FakeSocket()
    subscriber = Subscriber(cast(WebSocket, socket), mode="relay", limit=8)
    session.channel.add(subscriber)
    subscriber.start()
    socket.flowing.clear()
    try:
        for number in range(40):
            session.channel.publish(progress(number, node=str(number % 12)))
        await settle()
        live = parse(metrics.render().decode())
        assert value(live, "relay_events_coalesced_total") + value(live, "relay_events_dropped_total") > 0
        assert value(live, "relay_subscriber_queue_frames") == subscriber.queued > 0
        assert value(live, "relay_subscriber_queue_frames_max") == subscriber.queued
        # Events that must not be dropped overflow the queue: the socket is closed as too slow.
        for number in range(20):
            session.channel.publish(step(str(number)))
        await settle()
        socket.flowing.set()
        async with asyncio.timeout(5):
            while socket.closed_with is None:
                await asyncio.sleep(0.01)
        session.channel.discard(subscriber)
        counted = (subscriber.coalesced, subscriber.dropped)
        metrics.retire(
            coalesced=subscriber.coalesced, dropped=subscriber.dropped, overflowed=subscriber.overflowed
        )
        after = parse(metrics.render().decode())
        assert value(after, "relay_slow_sockets_closed_total") == 1
        assert value(after, "relay_events_coalesced_total") == counted[0]
        assert value(after, "relay_events_dropped_total") == counted[1]
        assert value(after, "relay_browser_connections", events="relay") == 0
    finally:
        subscriber.stop()
        await backends.aclose()


async def test_unknown_route_is_labelled_unmatched(
    relay: RunningRelay, relay_http: httpx.AsyncClient
) -> None:
    """Arbitrary paths do not become label values: they all count as one 'unmatched' route."""
    for path in ("/nope", "/nope/again", "/../etc/passwd"):
        assert (await relay_http.get(path)).status_code == 404
    samples = await scrape(relay_http)
    assert value(samples, "relay_http_requests_total", route="unmatched", method="GET", status="404") == 3
    routes = {dict(labels).get("route") for name, labels in samples if name == "relay_http_requests_total"}
    assert not any(str(route).startswith("/nope") for route in routes)


def test_metric_names_follow_prometheus_conventions() -> None:
    """Counters end in _total, durations are in seconds, and no label can hold a client or prompt id."""
    metrics = Metrics()
    families: list[Any] = list(metrics.registry.collect())
    assert families
    for family in families:
        # The relay's own, and the process and collector figures under their standard names.
        assert family.name.startswith(("relay_", "process_", "python_gc_"))
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds")
        for sample in family.samples:
            assert not {"client_id", "prompt_id", "path"} & set(sample.labels)


async def test_metrics_need_no_token(emulator: RunningEmulator) -> None:
    """With a token set, probes and the scrape still answer without one (Prometheus and kubelet have none)."""
    token = "metrics-test-token-0123456789"
    async with (
        run_relay(relay_config(emulator, token=token)) as relay,
        httpx.AsyncClient(base_url=relay.url) as http,
    ):
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get("/queue")).status_code == 401


async def test_idle_sessions_are_dropped_and_garbage_collected(emulator: RunningEmulator) -> None:
    """A client gone for RELAY_SESSION_TTL has its session dropped (relay_clients back to 0),
    and the cycle collector's full pass runs every RELAY_GC_INTERVAL (python_gc_collections_total),
    so what closed connections leave behind does not pile up (bench/soak.py measures it)."""
    config = relay_config(emulator, session_ttl=0.2, gc_interval=0.2)
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, 50, 100)  # as a relay process sets them: full passes come only from the relay
    try:
        await _drop_and_collect(config)
    finally:
        gc.set_threshold(*thresholds)


async def _drop_and_collect(config: RelayConfig) -> None:
    async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
        tab = await open_tab(relay.ws_url, "clientId=fleeting")
        await tab.wait_type("relay.hello")
        assert value(await scrape(http), "relay_clients") == 1
        await tab.close()
        full = {"generation": "2"}
        passes = value(await scrape(http), "python_gc_collections_total", **full)
        async with asyncio.timeout(20):
            while True:
                now = await scrape(http)
                if (
                    value(now, "relay_clients") == 0
                    and value(now, "python_gc_collections_total", **full) > passes
                ):
                    break
                await asyncio.sleep(0.05)
