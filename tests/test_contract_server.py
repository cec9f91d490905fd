"""Contract: the rest of the server surface (scenarios 13 and 15).

Information endpoints, the node catalogue's published specs, the /api mirror, the Origin
check, WebSocket edges (compression, oversize frames, client oddities, log streaming), the
upload limit, and the CORS / compression / upload-size server flags.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from relay.emulator import EmulatorConfig, RunningEmulator, run_emulator
from relay.emulator.config import ComfyVersion
from tests.driver import Session, of_type
from tests.test_contract_http import PROBE_PNG, content_type, replay
from tests.tracekit import TRACES, load_trace, normalize, shape


@pytest.fixture
def comfyui_version() -> ComfyVersion:
    """Held to the recordings of a real 0.3.64 server."""
    return "0.3.64"


CLIENT = "relayprobe-fixed-client-0001"


def recorded(trace_name: str, method: str, path: str) -> dict[str, Any]:
    matches = load_trace(trace_name).http(method, path)
    assert matches, f"{method} {path} not in trace {trace_name}"
    return matches[0]


def without_prose(value: Any) -> Any:
    """Drop tooltips and descriptions: ComfyUI's wording is not part of the contract."""
    if isinstance(value, dict):
        return {
            k: without_prose(v)
            for k, v in value.items()
            if k not in ("tooltip", "description", "output_tooltips")
        }
    if isinstance(value, list):
        return [without_prose(v) for v in value]
    return value


def file_lists_as_kind(info: dict[str, Any], dynamic: set[str]) -> dict[str, Any]:
    """Replace combo lists that depend on the server's files (models, inputs) by a marker."""
    result = json.loads(json.dumps(info))
    for group in result["input"].values():
        if not isinstance(group, dict):
            continue
        for name, spec in group.items():
            if name in dynamic and isinstance(spec, list) and isinstance(spec[0], list):
                spec[0] = "<file list>"
            if isinstance(spec, list) and len(spec) == 2 and spec[1] == {}:
                spec.pop()  # ["X", {}] and ["X"] mean the same; tooltips were all it had
    return result


_FILE_COMBOS = {"ckpt_name", "vae_name", "unet_name", "lora_name", "control_net_name", "image"}


async def test_13_object_info_matches_recorded_specs(session: Session) -> None:
    """Every node type both servers know publishes the same inputs, outputs and flags."""
    ours = (await session.http.get("/object_info")).json()
    theirs = json.loads((TRACES / "13-endpoints.object_info.json").read_text())
    common = sorted(set(ours) & set(theirs))
    assert len(common) >= 20
    for name in common:
        a = file_lists_as_kind(without_prose(ours[name]), _FILE_COMBOS)
        b = file_lists_as_kind(without_prose(theirs[name]), _FILE_COMBOS)
        assert a == b, name
    single = (await session.http.get("/object_info/EmptyImage")).json()
    assert single == json.loads((TRACES / "13-endpoints.object_info_EmptyImage.json").read_text())
    assert (await session.http.get("/object_info/NoSuchNode")).json() == {}


async def test_13_information_endpoints(session: Session) -> None:
    """Status codes, content types and bodies of the informational routes (trace 13)."""
    http = session.http
    exact = [
        "/prompt",
        "/features",
        "/embeddings",
        "/models",
        "/models/not_a_folder",
        "/users",
        "/settings",
        "/i18n",
        "/workflow_templates",
        "/userdata?dir=workflows",
        "/does-not-exist",
        "/api/internal/folder_paths",
        "/api/index.html",
        "/api/api/prompt",
        "/view_metadata/checkpoints?filename=x.safetensors",
    ]
    for path in exact:
        record = recorded("13", "GET", path)
        response = await http.get(path)
        assert response.status_code == record["status"], path
        assert content_type(response.headers) == content_type(record["response_headers"]), path
        body = record.get("body_json", record.get("body_text"))
        if path == "/models":
            # The recorded server had no custom nodes; the emulated node packs add their folders after.
            assert response.json()[: len(body)] == body
            assert set(response.json()[len(body) :]) == {"gguf", "ultralytics", "animatediff_models"}
        elif record["status"] == 200 and content_type(response.headers).startswith("application/json"):
            assert response.json() == body, path
        elif body is not None:
            assert response.text == body, path
    for path in ("/system_stats", "/internal/folder_paths"):
        record = recorded("13", "GET", path)
        response = await http.get(path)
        assert response.status_code == 200
        if path == "/system_stats":
            assert shape(response.json()) == shape(record["body_json"])
        else:
            stock = set(recorded("13", "GET", "/models")["body_json"])
            assert set(response.json()) == stock | {"gguf", "ultralytics", "animatediff_models"}
    for path in ("/models/checkpoints", "/extensions", "/internal/files/output"):
        response = await http.get(path)
        assert response.status_code == 200
        assert isinstance(response.json(), list), path
    index = await http.get("/")
    assert index.headers["content-type"].startswith("text/html")
    assert (index.headers["cache-control"], index.headers["pragma"], index.headers["expires"]) == (
        "no-cache",
        "no-cache",
        "0",
    )
    assert (await http.post("/free", json={"unload_models": True, "free_memory": True})).status_code == 200
    crashed = await http.post("/free", content=b"")
    assert crashed.status_code == 500
    assert crashed.headers["connection"] == "close"
    assert (await http.post("/history", json={"delete": ["no-such-id"]})).status_code == 200


async def test_13_api_prefix_and_api_socket(session: Session) -> None:
    """/api mirrors every public route, /api/ws runs a whole prompt, /internal is not mirrored."""
    trace = load_trace("13")
    http = session.http
    for path in ("/system_stats", "/prompt", "/queue", "/features", "/object_info/EmptyImage", "/embeddings"):
        plain, mirrored = await http.get(path), await http.get("/api" + path)
        assert mirrored.status_code == 200
        if path != "/system_stats":  # free memory changes between two calls
            assert mirrored.json() == plain.json(), path
    assert (await http.get("/api/")).status_code == 200

    a = await session.connect("A", CLIENT)
    response = await http.post(
        "/api/prompt", json={"prompt": trace.workflow("api-prefix"), "client_id": CLIENT}
    )
    assert response.status_code == 200
    await a.wait_done(response.json()["prompt_id"])
    history = (await http.get(f"/api/history/{response.json()['prompt_id']}")).json()
    assert list(history) == [response.json()["prompt_id"]]

    api_socket = await session.connect("APIWS", "relayprobe-apiws-13", path="/api/ws")
    prompt_id = await session.submit(trace.workflow("api-ws"), "relayprobe-apiws-13")
    await api_socket.wait_done(prompt_id)
    assert api_socket.tokens() == trace.tokens("APIWS")


async def test_13_origin_check(session: Session, emulator: RunningEmulator) -> None:
    """A loopback Host with a different Origin gets an empty 403, over HTTP and WebSocket."""
    trace = load_trace("13")
    host = f"127.0.0.1:{emulator.port}"
    for record in trace.http():
        headers = record["request"].get("headers", {})
        if "Origin" not in headers:
            continue
        # The recorded server listened on 8188; the same rule holds on our port.
        fixed = {k: v.replace("127.0.0.1:8188", host) for k, v in headers.items()}
        response = await replay(session.http, {**record, "request": {**record["request"], "headers": fixed}})
        assert response.status_code == record["status"], (record["note"], fixed)
        if record["status"] == 403:
            assert response.content == b""
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            f"{session.ws_base}/ws?clientId=evil", additional_headers={"Origin": "http://evil.example"}
        )
    assert refused.value.response.status_code == 403
    same_origin = await websockets.connect(
        f"{session.ws_base}/ws?clientId=fine", additional_headers={"Origin": f"http://{host}"}
    )
    await same_origin.close()


async def test_13_websocket_edges(session: Session) -> None:
    """Compression if offered; client junk ignored; pings answered; logs streamed; >4 MiB closes 1009."""
    a = await session.connect("A", CLIENT)
    assert a.connection.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
    plain = await session.connect("NOCOMP", "relayprobe-nocomp", compression=None)
    assert "Sec-WebSocket-Extensions" not in plain.connection.response.headers

    http = session.http
    assert (
        await http.patch("/internal/logs/subscribe", json={"enabled": True, "clientId": CLIENT})
    ).status_code == 200
    assert (await http.post("/prompt", json={})).status_code == 400
    logs = await a.wait_for(of_type("logs"))
    recorded_logs = next(f for f in load_trace("13").frames("A") if f.type == "logs")
    assert shape(logs.data) == shape(recorded_logs.data)
    assert logs.data["entries"][0]["m"] == "got prompt\n"
    await http.patch("/internal/logs/subscribe", json={"enabled": False, "clientId": CLIENT})

    before = len(a.frames)
    await a.connection.send("this is not json")
    await a.connection.send(b"\x00\x01binary")
    pong = await a.connection.ping()
    async with asyncio.timeout(5):
        await pong
    await asyncio.sleep(0.2)
    assert len(a.frames) == before
    assert not a.closed.is_set()

    big = await session.connect("BIG", "relayprobe-big-13")
    await big.connection.send("x" * (5 * 1024 * 1024 + 24))
    async with asyncio.timeout(10):
        await big.closed.wait()
    assert big.connection.close_code == 1009


async def test_13_upload_over_the_default_limit(session: Session) -> None:
    """An upload just over 100 MiB is refused with the server's 413 text (trace 13)."""
    record = recorded("13", "POST", "/upload/image")
    size = record["request"]["form"][0]["bytes"]
    response = await session.http.post(
        "/upload/image", files={"image": ("big.png", b"\x00" * size, "image/png")}
    )
    assert response.status_code == 413
    assert response.text == record["body_text"]
    assert content_type(response.headers) == content_type(record["response_headers"])


@pytest.fixture
async def flagged() -> AsyncIterator[tuple[RunningEmulator, Session]]:
    """The server of trace 15: --enable-cors-header --enable-compress-response-body --max-upload-size 1."""
    config = EmulatorConfig(
        comfyui_version="0.3.64",
        port=0,
        speed=20,
        cors_origin="*",
        compress_responses=True,
        max_upload_size_mb=1.0,
    )
    async with run_emulator(config) as emulator, httpx.AsyncClient(base_url=emulator.url, timeout=30) as http:
        session = Session(emulator.url, http)
        try:
            yield emulator, session
        finally:
            await session.close()


async def test_15_cors_compression_and_upload_size(flagged: tuple[RunningEmulator, Session]) -> None:
    """Trace 15: CORS headers everywhere but 413, deflate/gzip for JSON only, float upload size."""
    _, session = flagged
    trace = load_trace("15")
    a = await session.connect("A", CLIENT, feature_flags=True)
    reply = await a.wait_for(of_type("feature_flags"))
    assert reply.data == {"supports_preview_metadata": True, "max_upload_size": 1048576.0}
    assert isinstance(reply.data["max_upload_size"], float)

    # The recorded server still had trace 07's upload in its input folder.
    upload = {"image": ("probe_upload.png", PROBE_PNG, "image/png")}
    assert (await session.http.post("/upload/image", files=upload)).status_code == 200
    files = {"695d7252bb8d93681fb69a375dc26ce7bf022ef39566afc11522a91b9e9f9080": PROBE_PNG}
    for record in trace.http():
        if record["path"] == "/prompt" and record["method"] == "POST":
            response = await replay(session.http, record)
            await a.wait_done(response.json()["prompt_id"])
        else:
            response = await replay(session.http, record, files)
        names = {name.lower() for name, _ in record["response_headers"]} - {"date", "server"}
        ours = set(response.headers) - {"date", "server"}
        if record["path"] == "/does-not-exist":
            ours |= {"transfer-encoding"} if "content-length" in ours else set()
            ours -= {"content-length"}
        assert response.status_code == record["status"], record["path"]
        assert ours == names, (record["path"], record.get("note"))
        for name, value in record["response_headers"]:
            if name.lower().startswith("access-control") or name.lower() == "content-encoding":
                assert response.headers[name] == value, (record["path"], name)
        body = record.get("body_json", record.get("body_text"))
        if isinstance(body, dict) and record["status"] == 200 and "history" not in record["path"]:
            assert normalize(response.json()) == normalize(body), record["path"]
        if record["status"] == 413:
            assert response.text == body
    assert a.tokens() == trace.tokens("A")

    evil = await session.connect("EVILWS", "relayprobe-evil-15", headers={"Origin": "http://evil.example"})
    assert evil.tokens() == trace.tokens("EVILWS")
