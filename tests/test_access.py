"""Access rules on a real relay: the token, browser origins, connection and request limits."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from PIL import Image
from starlette.types import Message, Receive, Scope, Send

from relay.access import AccessControl
from relay.config import ConfigError, RelayConfig
from relay.emulator import RunningEmulator
from relay.metrics import Metrics
from relay.server import run_relay
from tests.conftest import relay_config
from tests.relay_client import Tab, open_tab
from tests.tracekit import load_trace

TOKEN = "test-token-abcdefghijklmnop"


async def refused(url: str, **kwargs: Any) -> tuple[int | None, dict[str, Any]]:
    """Open a socket the relay should refuse: the close code and the relay.error frame before it."""
    async with websockets.connect(url, **kwargs) as socket:
        frame = await asyncio.wait_for(socket.recv(), 5)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(socket.recv(), 5)
        return socket.close_code, json.loads(frame)


async def greeted(url: str, query: str, **kwargs: Any) -> Tab:
    tab = await open_tab(url, query, **kwargs)
    await tab.wait_type("relay.hello")
    return tab


# Token -------------------------------------------------------------------------------------


async def test_off_by_default(relay: Any, relay_http: httpx.AsyncClient) -> None:
    """Without RELAY_TOKEN nothing asks for one: plain requests and sockets are served."""
    assert (await relay_http.get("/queue")).status_code == 200
    tab = await greeted(relay.ws_url, "clientId=open")
    await tab.close()


async def test_token_on_http(emulator: RunningEmulator) -> None:
    """With a token, HTTP needs it as a bearer header or ?token=; the page's files and probes do not."""
    async with (
        run_relay(relay_config(emulator, token=TOKEN)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=10) as http,
    ):
        missing = await http.get("/queue")
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "unauthorized"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert (
            await http.get("/queue", headers={"Authorization": "Bearer wrong-token-0123456789"})
        ).status_code == 401
        assert (await http.get("/queue", params={"token": "wrong"})).status_code == 401
        assert (await http.get("/queue", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200
        assert (await http.get("/queue", params={"token": TOKEN})).status_code == 200
        graph = {"prompt": load_trace("01").workflow(), "client_id": "tok"}
        assert (await http.post("/prompt", json=graph)).status_code == 401
        async with httpx.AsyncClient(base_url=emulator.url) as comfy:
            queue = (await comfy.get("/queue")).json()
            assert queue["queue_running"] == queue["queue_pending"] == []
            assert (await comfy.get("/history")).json() == {}
        accepted = await http.post("/prompt", json=graph, headers={"Authorization": f"Bearer {TOKEN}"})
        assert accepted.status_code == 200, accepted.text
        for open_path in ("/", "/static/relay-client.js", "/healthz", "/readyz", "/metrics"):
            assert (await http.get(open_path)).status_code == 200, open_path
        refusals = (await http.get("/metrics")).text
        assert 'relay_refused_total{reason="unauthorized"} 4.0' in refusals


async def test_token_on_sockets(emulator: RunningEmulator) -> None:
    """A socket needs the token as ?token=, a bearer header or the token subprotocol; else 4401."""
    async with run_relay(relay_config(emulator, token=TOKEN)) as relay:
        code, error = await refused(relay.ws_url + "?clientId=t")
        assert code == 4401
        assert error == {"type": "relay.error", "code": "unauthorized", "message": error["message"]}
        code, _ = await refused(relay.ws_url + "?clientId=t&token=not-the-token-0123456")
        assert code == 4401
        code, _ = await refused(
            relay.ws_url + "?clientId=t",
            subprotocols=["comfy-relay", "comfy-relay.token.wrong-token-0123456789"],
        )
        assert code == 4401

        by_query = await greeted(relay.ws_url, f"clientId=t&token={TOKEN}")
        by_header = await greeted(
            relay.ws_url, "clientId=t", additional_headers={"Authorization": f"Bearer {TOKEN}"}
        )
        by_protocol = await greeted(
            relay.ws_url, "clientId=t", subprotocols=["comfy-relay", f"comfy-relay.token.{TOKEN}"]
        )
        # The relay selects its own protocol name, never echoing the token back.
        assert by_protocol.connection.subprotocol == "comfy-relay"
        for tab in (by_query, by_header, by_protocol):
            await tab.close()


async def test_token_is_taken_out_before_forwarding() -> None:
    """A token in the query or Authorization header is removed before the request goes on (to ComfyUI)."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = AccessControl(app, config=RelayConfig(token=TOKEN), metrics=Metrics())
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    scope: Scope = {
        "type": "http", "method": "GET", "path": "/view",
        "query_string": f"filename=a.png&token={TOKEN}&type=output".encode(),
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode()), (b"accept", b"*/*")],
    }  # fmt: skip
    await guard(scope, receive, send)
    assert sent[0]["status"] == 200
    forwarded = seen[0]
    assert TOKEN.encode() not in forwarded["query_string"]
    assert forwarded["query_string"] == b"filename=a.png&type=output"
    assert forwarded["headers"] == [(b"accept", b"*/*")]

    # A wrong bearer beside the right query token is not passed on either: guesses stay here.
    wrong: Scope = {
        "type": "http", "method": "GET", "path": "/view", "query_string": f"token={TOKEN}".encode(),
        "headers": [(b"authorization", b"Bearer not-the-token-at-all"), (b"accept", b"*/*")],
    }  # fmt: skip
    await guard(wrong, receive, send)
    assert seen[1]["headers"] == [(b"accept", b"*/*")]


def test_weak_or_unusable_tokens_are_refused_at_start() -> None:
    """A short token, or one that cannot travel in a URL or subprotocol, stops the relay from starting."""
    for bad in ("short", "has space in it 0123456789", "semi;colon;0123456789abc"):
        with pytest.raises(ConfigError, match="RELAY_TOKEN"):
            RelayConfig(token=bad)
    with pytest.raises(ConfigError, match="not an origin"):
        RelayConfig(allowed_origins="https://app.example/path")


# Origins -----------------------------------------------------------------------------------


async def test_same_origin_only_by_default(relay: Any, emulator: RunningEmulator) -> None:
    """Sockets and state-changing requests from another site's page are refused; the relay's own pass."""
    own = relay.url
    tab = await greeted(relay.ws_url, "clientId=o", origin=own)
    await tab.close()
    code, error = await refused(relay.ws_url + "?clientId=o", origin="https://evil.example")
    assert code == 4403
    assert error["code"] == "origin_not_allowed"
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        graph = {"prompt": load_trace("01").workflow(), "client_id": "o"}
        cross = await http.post("/prompt", json=graph, headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403
        assert cross.json()["error"]["type"] == "origin_not_allowed"
        queue = (await http.get("/queue")).json()
        assert queue["queue_running"] == queue["queue_pending"] == []
        # A read from another origin is answered, but without CORS headers the browser keeps it from the page.
        read = await http.get("/queue", headers={"Origin": "https://evil.example"})
        assert read.status_code == 200
        assert "access-control-allow-origin" not in read.headers
        # Behind an ingress the browser's host may arrive as X-Forwarded-Host.
        forwarded = await http.post(
            "/interrupt",
            json={},
            headers={"Origin": "https://relay.example", "X-Forwarded-Host": "relay.example"},
        )
        assert forwarded.status_code == 200
        # Tools that are not browsers send no Origin and are not affected.
        assert (await http.post("/interrupt", json={})).status_code == 200


async def test_a_repeated_origin_or_host_is_refused(relay: Any, emulator: RunningEmulator) -> None:
    """Two Origin (or Host, or X-Forwarded-Host) headers could be read one way here and another
    by a proxy in front: refused, 400 and 4400, whatever the copies say (found by fuzzing: the
    first Origin alone was checked)."""
    own = relay.url
    # The WebSocket layer itself refuses a handshake with two Origin headers (HTTP 400).
    with pytest.raises(websockets.InvalidStatus) as handshake:
        await websockets.connect(
            relay.ws_url + "?clientId=o",
            additional_headers=[("Origin", own), ("Origin", "https://evil.example")],
        )
    assert handshake.value.response.status_code == 400
    code, error = await refused(
        relay.ws_url + "?clientId=o",
        additional_headers=[("X-Forwarded-Host", "a"), ("X-Forwarded-Host", "b")],
    )
    assert (code, error["code"]) == (4400, "duplicate_header")
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    head = (f"POST /interrupt HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\nOrigin: {own}\r\n"
            "X-Forwarded-Host: a\r\nX-Forwarded-Host: b\r\nContent-Length: 2\r\n"
            "Connection: close\r\n\r\n{}")  # fmt: skip
    writer.write(head.encode())
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 400 Bad Request"
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["type"] == "duplicate_header"
    assert not any(path == "/interrupt" for _, path, _, _ in emulator.state.requests)


async def test_allowed_origins_get_sockets_and_cors(emulator: RunningEmulator) -> None:
    """Listed origins may open sockets and get CORS answers (preflight included); others may not."""
    app = "http://app.example:5173"
    async with (
        run_relay(relay_config(emulator, allowed_origins=f"{app}, https://other.example")) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=10) as http,
    ):
        tab = await greeted(relay.ws_url, "clientId=c", origin=app)
        await tab.close()
        code, _ = await refused(relay.ws_url + "?clientId=c", origin="https://evil.example")
        assert code == 4403

        preflight = await http.options(
            "/prompt",
            headers={
                "Origin": app,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == app
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        denied = await http.options(
            "/prompt", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert denied.status_code == 400
        assert "access-control-allow-origin" not in denied.headers

        simple = await http.get("/workflows", headers={"Origin": app})
        assert simple.headers["access-control-allow-origin"] == app
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
        graph = {"prompt": load_trace("01").workflow(), "client_id": "c"}
        assert (await http.post("/prompt", json=graph, headers={"Origin": app})).status_code == 200
        assert (
            await http.post("/prompt", json=graph, headers={"Origin": "https://evil.example"})
        ).status_code == 403


# Limits ------------------------------------------------------------------------------------


async def test_connection_limits(emulator: RunningEmulator) -> None:
    """Past the per-client or the total limit a socket is closed with 4429; /readyz says the relay is full."""
    config = relay_config(emulator, max_connections=3, max_connections_per_client=2)
    async with run_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        first = await greeted(relay.ws_url, "clientId=a")
        second = await greeted(relay.ws_url, "clientId=a")
        code, error = await refused(relay.ws_url + "?clientId=a")
        assert code == 4429
        assert error["code"] == "too_many_connections"
        assert "client id" in error["message"]
        # Another client is not affected by a's limit.
        other = await greeted(relay.ws_url, "clientId=b")
        # The relay is now full: a fourth socket from anyone is refused, and readiness says so.
        code, error = await refused(relay.ws_url + "?clientId=c")
        assert code == 4429
        assert "too many open sockets" in error["message"]
        full = await http.get("/readyz")
        assert full.status_code == 503
        assert full.json()["reason"] == "at_capacity"
        # The sockets already open keep working.
        await first.close()
        async with asyncio.timeout(5):
            while (await http.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.05)
        again = await greeted(relay.ws_url, "clientId=a")
        metrics = (await http.get("/metrics")).text
        assert 'relay_refused_total{reason="connections_per_client"} 1.0' in metrics
        assert 'relay_refused_total{reason="connections_total"} 1.0' in metrics
        for tab in (second, other, again):
            await tab.close()


async def test_request_limit_answers_429(emulator: RunningEmulator) -> None:
    """One request in progress and a limit of one: the next gets 429 with Retry-After; probes still answer."""
    release = asyncio.Event()
    head_sent = asyncio.Event()
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "teal").save(png, format="PNG")
    boundary = "limit-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="slow.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def slow_body() -> AsyncIterator[bytes]:
        yield head
        head_sent.set()
        await release.wait()
        yield png.getvalue() + tail

    async with (
        run_relay(relay_config(emulator, max_http_requests=1)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=10) as http,
    ):
        upload = asyncio.create_task(
            http.post(
                "/upload/image",
                content=slow_body(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
        )
        # The upload's headers are on the wire before the first probe: it holds the only slot.
        await head_sent.wait()
        async with asyncio.timeout(5):
            while True:
                assert not upload.done(), "the upload ended early"
                busy = await http.get("/queue")
                if busy.status_code == 429:
                    break
                await asyncio.sleep(0.02)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "too_many_requests"
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200
        release.set()
        assert (await upload).status_code == 200
        assert (await http.get("/queue")).status_code == 200
