"""Webhooks to a real local HTTP receiver (uvicorn on port 0), checked with the Standard
Webhooks reference verifier."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.config import ConfigError, RelayConfig
from relay.emulator import RunningEmulator
from relay.emulator.config import ComfyVersion
from relay.server import run_relay
from relay.serving import InLoopServer
from relay.webhooks import host_allowed, sign, signing_key
from tests.conftest import relay_config
from tests.relay_client import open_tab
from tests.s3_server import S3Server
from tests.test_storage import storage_settings

TEXT2IMG = json.loads(resources.files("relay.emulator").joinpath("examples/text2img.json").read_text())
SECRET = "whsec_" + base64.b64encode(b"comfy-relay webhook test key 32b").decode()


@pytest.fixture
def comfyui_version() -> ComfyVersion:
    """Webhooks read only the relay's own events: one ComfyUI version is enough."""
    return "current"


@dataclass
class Arrival:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def message(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """Records every POST; answers with the next status of ``statuses`` (then 200), and holds
    each request while ``hold`` is set until it is released."""

    statuses: list[int] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)
    hold: asyncio.Event | None = None
    # Requests to keep unanswered (until the receiver stops), from the first one.
    stall_first: int = 0
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    holding: int = 0
    answered: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    server: InLoopServer | None = None

    async def handle(self, request: Request) -> Response:
        arrival = Arrival(request.url.path, dict(request.headers), await request.body())
        self.arrivals.append(arrival)
        self.changed.set()
        if len(self.arrivals) <= self.stall_first:
            await self.stalled.wait()
        if self.hold is not None:
            self.holding += 1
            self.changed.set()
            await self.hold.wait()
            self.holding -= 1
        status = self.statuses.pop(0) if self.statuses else 200
        self.answered += 1
        headers = {"location": f"{self.url}/elsewhere"} if status in (301, 302, 307, 308) else {}
        return Response(b"", status_code=status, headers=headers)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    async def wait_for(self, predicate: Callable[[list[Arrival]], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.arrivals):
                self.changed.clear()
                await self.changed.wait()

    def of(self, kind: str) -> list[Arrival]:
        return [a for a in self.arrivals if a.message["type"] == kind]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiving = Receiver()

    def build(port: int) -> tuple[Starlette, uvicorn.Server]:
        app = Starlette(routes=[Route("/{path:path}", receiving.handle, methods=["POST"])])
        return app, uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    receiving.server = InLoopServer("127.0.0.1", 0, build, name="webhook-receiver")
    await receiving.server.start()
    try:
        yield receiving
    finally:
        if receiving.hold is not None:
            receiving.hold.set()
        receiving.stalled.set()
        await receiving.server.stop()


def hook_settings(**more: Any) -> dict[str, Any]:
    return {"webhook_secret": SECRET, "webhook_allowed_hosts": "127.0.0.1", "webhook_backoff": 0.01, **more}


async def submit(http: httpx.AsyncClient, client_id: str, **extra: Any) -> str:
    answer = await http.post(
        "/prompt", json={"prompt": TEXT2IMG, "client_id": client_id, "extra_data": extra}
    )
    assert answer.status_code == 200, answer.text
    prompt_id: str = answer.json()["prompt_id"]
    return prompt_id


def verified(arrival: Arrival) -> dict[str, Any]:
    """The payload, once the reference implementation accepts its signature."""
    payload: dict[str, Any] = Webhook(SECRET).verify(arrival.body, arrival.headers)
    return payload


async def test_done_webhook_is_signed_as_the_spec_says(emulator: RunningEmulator, receiver: Receiver) -> None:
    """A prompt's webhook_url gets prompt.done with the relay.done fields and the client id;
    the reference verifier accepts the signature, and a tampered body is refused."""
    async with run_relay(relay_config(emulator, **hook_settings())) as relay, \
            httpx.AsyncClient(base_url=relay.url) as http:  # fmt: skip
        tab = await open_tab(relay.ws_url, "clientId=backend")
        prompt_id = await submit(http, "backend", webhook_url=f"{receiver.url}/hooks/comfy?k=1")
        done = await tab.wait_done(prompt_id)
        await receiver.wait_for(lambda arrivals: len(arrivals) >= 1)
        await tab.close()
    (arrival,) = receiver.arrivals  # the relay has stopped: nothing else was on its way
    assert arrival.path == "/hooks/comfy"
    payload = verified(arrival)
    assert payload["type"] == "prompt.done"
    data = payload["data"]
    assert data["client_id"] == "backend"
    assert data["prompt_id"] == prompt_id
    assert data["status"] == "success"
    assert data["outputs"] == done["outputs"]
    assert arrival.headers["webhook-id"].startswith("msg_")
    assert arrival.headers["content-type"] == "application/json"
    # The spec's algorithm, by hand: v1,base64(HMAC-SHA256(key, id.timestamp.body)).
    headers = arrival.headers
    expected = sign(
        signing_key(SECRET), headers["webhook-id"], int(headers["webhook-timestamp"]), arrival.body
    )
    assert arrival.headers["webhook-signature"] == expected
    tampered = arrival.body.replace(b"success", b"failure")
    with pytest.raises(Exception, match=r"(?i)signature"):
        Webhook(SECRET).verify(tampered, arrival.headers)


async def test_failed_tries_are_retried_with_the_same_id(
    emulator: RunningEmulator, receiver: Receiver
) -> None:
    """Two 500s, then 200: three tries of one message, one webhook-id, each freshly signed."""
    receiver.statuses = [500, 500]
    async with run_relay(relay_config(emulator, **hook_settings())) as relay, \
            httpx.AsyncClient(base_url=relay.url) as http:  # fmt: skip
        await submit(http, "retry", webhook_url=f"{receiver.url}/hook")
        await receiver.wait_for(lambda arrivals: len(arrivals) >= 3)
        metrics = relay.state.metrics.webhook_deliveries
        async with asyncio.timeout(10):
            while metrics.labels("delivered")._value.get() < 1:
                await asyncio.sleep(0.01)
        assert metrics.labels("retried")._value.get() == 2
    assert len({a.headers["webhook-id"] for a in receiver.arrivals}) == 1
    for arrival in receiver.arrivals:
        assert verified(arrival)["type"] == "prompt.done"


async def test_undeliverable_goes_to_the_dead_letter_log(
    emulator: RunningEmulator, receiver: Receiver, tmp_path: Path
) -> None:
    """A receiver that always fails (here by redirecting, which is not followed) gets
    webhook_attempts tries; then the message is written to the dead-letter file, whole."""
    receiver.statuses = [307] * 10
    dead = tmp_path / "dead.jsonl"
    settings = hook_settings(webhook_attempts=3, webhook_dead_letter=str(dead))
    async with (
        run_relay(relay_config(emulator, **settings)) as relay,
        httpx.AsyncClient(base_url=relay.url) as http,
    ):
        prompt_id = await submit(http, "doomed", webhook_url=f"{receiver.url}/hook")
        counter = relay.state.metrics.webhook_deliveries.labels("dead")
        async with asyncio.timeout(20):
            while counter._value.get() < 1:
                await asyncio.sleep(0.01)
    assert [a.path for a in receiver.arrivals] == ["/hook"] * 3  # the redirect was never followed
    (record,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert record["attempts"] == 3
    assert record["error"] == "HTTP 307"
    assert record["webhook_id"] == receiver.arrivals[0].headers["webhook-id"]
    assert record["body"]["data"]["prompt_id"] == prompt_id


async def test_hosts_outside_the_allow_list_are_refused(
    emulator: RunningEmulator, receiver: Receiver
) -> None:
    """A webhook_url whose host is not allowed is a 400 and never called; the same receiver
    under its allowed name then gets exactly the allowed prompt's message."""
    port = receiver.url.rsplit(":", 1)[1]
    async with run_relay(relay_config(emulator, **hook_settings())) as relay, \
            httpx.AsyncClient(base_url=relay.url) as http:  # fmt: skip
        for url in (f"http://localhost:{port}/hook", f"http://127.0.0.1.nip.io:{port}/hook",
                    f"http://user:pw@127.0.0.1:{port}/hook", f"ftp://127.0.0.1:{port}/hook", 42):  # fmt: skip
            body = {"prompt": TEXT2IMG, "client_id": "nosy", "extra_data": {"webhook_url": url}}
            answer = await http.post("/prompt", json=body)
            assert answer.status_code == 400, url
            assert answer.json()["error"]["type"] in ("webhook_not_allowed", "invalid_webhook")
        allowed = await submit(http, "nosy", webhook_url=f"{receiver.url}/allowed")
        await receiver.wait_for(lambda arrivals: len(arrivals) >= 1)
    assert [(a.path, a.message["data"]["prompt_id"]) for a in receiver.arrivals] == [("/allowed", allowed)]


async def test_a_slow_receiver_does_not_slow_events(emulator: RunningEmulator, receiver: Receiver) -> None:
    """While the receiver holds every webhook request unanswered, the prompt's events, step
    webhooks asked for, still reach the tab to relay.done; released, every message arrives."""
    receiver.hold = asyncio.Event()
    async with run_relay(relay_config(emulator, **hook_settings())) as relay, \
            httpx.AsyncClient(base_url=relay.url) as http:  # fmt: skip
        tab = await open_tab(relay.ws_url, "clientId=patient")
        prompt_id = await submit(http, "patient", webhook_url=f"{receiver.url}/hook", webhook_steps=True)
        done = await tab.wait_done(prompt_id)
        assert receiver.holding >= 1  # held requests were open all along
        assert receiver.answered == 0
        receiver.hold.set()
        await receiver.wait_for(lambda arrivals: any(a.message["type"] == "prompt.done" for a in arrivals))
        await tab.close()
        steps = [
            e
            for e in tab.of("relay.step", prompt_id)
            if e["state"] in ("running", "done") and "activity" not in e
        ]
        await receiver.wait_for(lambda arrivals: len(receiver.of("prompt.step")) >= len(steps))
    step_messages = [verified(a)["data"] for a in receiver.of("prompt.step")]
    assert sorted((m["node"], m["state"]) for m in step_messages) == sorted(
        (e["node"], e["state"]) for e in steps
    )
    assert verified(receiver.of("prompt.done")[0])["data"]["elapsed"] == done["elapsed"]


async def test_global_url_hears_every_prompt(emulator: RunningEmulator, receiver: Receiver) -> None:
    """RELAY_WEBHOOK_URL is told of every prompt's end, asked for or not, once per prompt even
    when the prompt names the same URL."""
    settings = hook_settings(webhook_url=f"{receiver.url}/all")
    async with (
        run_relay(relay_config(emulator, **settings)) as relay,
        httpx.AsyncClient(base_url=relay.url) as http,
    ):
        first = await submit(http, "alpha")
        second = await submit(http, "beta", webhook_url=f"{receiver.url}/all")
        await receiver.wait_for(lambda arrivals: len(arrivals) >= 2)
    assert sorted(a.message["data"]["prompt_id"] for a in receiver.arrivals) == sorted([first, second])


async def test_stored_files_are_told_to_the_webhook(
    emulator: RunningEmulator, receiver: Receiver, s3_server: S3Server
) -> None:
    """With storage, prompt.done announces the keys and prompt.stored follows once every file
    has settled, with each file's presigned URL (which fetches it)."""
    prefix = f"w-{uuid.uuid4().hex[:8]}"
    settings = {**hook_settings(), **storage_settings(s3_server, prefix)}
    async with (
        run_relay(relay_config(emulator, **settings)) as relay,
        httpx.AsyncClient(base_url=relay.url) as http,
    ):
        prompt_id = await submit(http, "keeper", store=True, webhook_url=f"{receiver.url}/hook")
        await receiver.wait_for(lambda arrivals: any(a.message["type"] == "prompt.stored" for a in arrivals))
    done = verified(receiver.of("prompt.done")[0])["data"]
    stored = verified(receiver.of("prompt.stored")[0])["data"]
    assert done["storage"]["state"] == "storing"
    assert stored["prompt_id"] == prompt_id
    assert stored["failed"] == 0
    assert stored["stored"] == len(stored["files"]) == len(done["storage"]["files"])
    async with httpx.AsyncClient() as plain:
        for entry in stored["files"]:
            assert (await plain.get(entry["url"])).status_code == 200


def test_host_allow_list() -> None:
    hosts = ("hooks.example.com", "*.internal.example", "api.example.org:8443")
    assert host_allowed("https://hooks.example.com/x", hosts)
    assert host_allowed("http://HOOKS.example.com:9000/x", hosts)
    assert host_allowed("https://a.b.internal.example/x", hosts)
    assert not host_allowed("https://internal.example/x", hosts)  # the wildcard is for subdomains
    assert not host_allowed("https://hooks.example.com.evil.net/x", hosts)
    assert not host_allowed("https://evilhooks.example.com/x", hosts)
    assert host_allowed("https://api.example.org:8443/x", hosts)
    assert not host_allowed("https://api.example.org/x", hosts)  # 443, not the port allowed
    assert not host_allowed("https://u:p@hooks.example.com/x", hosts)
    assert not host_allowed("file:///etc/passwd", hosts)
    assert not host_allowed("https://hooks.example.com:99999/x", hosts)


def test_webhook_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="RELAY_WEBHOOK_SECRET"):
        RelayConfig(webhook_url="https://hooks.example.com/x")
    with pytest.raises(ConfigError, match="24 bytes"):
        RelayConfig(webhook_secret="whsec_" + base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="base64"):
        RelayConfig(webhook_secret="whsec_not base64!")


async def test_a_receiver_that_never_answers_is_timed_out_and_tried_again(
    emulator: RunningEmulator, receiver: Receiver
) -> None:
    """The first try gets no answer at all: after webhook_timeout it counts as failed and the
    message is tried again, under the same id, and delivered."""
    receiver.stall_first = 1
    settings = hook_settings(webhook_timeout=0.3)
    async with (
        run_relay(relay_config(emulator, **settings)) as relay,
        httpx.AsyncClient(base_url=relay.url) as http,
    ):
        await submit(http, "stalled", webhook_url=f"{receiver.url}/hook")
        metrics = relay.state.metrics.webhook_deliveries
        async with asyncio.timeout(20):
            while metrics.labels("delivered")._value.get() < 1:
                await asyncio.sleep(0.01)
        assert metrics.labels("retried")._value.get() == 1
    assert len(receiver.arrivals) == 2
    assert len({a.headers["webhook-id"] for a in receiver.arrivals}) == 1
