"""The proxied ComfyUI API through the relay: streaming, validation, errors and header hygiene."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
from collections.abc import AsyncIterator
from urllib.parse import unquote

import httpx
import pytest

from relay.emulator import RunningEmulator
from relay.emulator.config import ComfyVersion
from relay.server import RunningRelay, run_relay
from tests.conftest import relay_config
from tests.relay_client import open_tab
from tests.test_relay_events import submit
from tests.tracekit import TRACES, load_trace


def reached(emulator: RunningEmulator, path: str) -> list[str]:
    """Queries of the requests for ``path`` that got to the emulator."""
    return [query for _, seen, query, _ in emulator.state.requests if seen == path]


async def test_view_streams_files_byte_for_byte(
    relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """Small and large files come through identical, with ComfyUI's type, disposition and validators."""
    output = emulator.state.folders.output
    for name, size in (("small.png", 4096), ("large.bin", 48 * 1024 * 1024)):
        data = os.urandom(size)
        (output / name).write_bytes(data)
        async with relay_http.stream("GET", "/view", params={"filename": name, "type": "output"}) as response:
            assert response.status_code == 200
            digest = hashlib.sha256()
            async for chunk in response.aiter_raw():
                digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest(), name
        assert response.headers["content-disposition"] == f'filename="{name}"'
        assert int(response.headers["content-length"]) == size
    assert response.headers["content-type"] == "application/octet-stream"
    assert "etag" in response.headers


async def test_view_range_conditional_head_and_previews(
    relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """Range gives 206, a matching ETag 304, HEAD headers only; preview= re-encodes as ComfyUI does."""
    tab_graph = load_trace("01").workflow()
    tab = await open_tab(relay_http.base_url.copy_with(scheme="ws", path="/ws").__str__(), "clientId=viewer")
    prompt_id = await submit(relay_http, tab_graph, "viewer")
    done = await tab.wait_done(prompt_id)
    saved = done["outputs"]["3"]["images"][0]
    params = {"filename": saved["filename"], "type": "output", "subfolder": ""}
    full = await relay_http.get("/view", params=params)
    assert full.headers["content-type"] == "image/png"
    part = await relay_http.get("/view", params=params, headers={"Range": "bytes=0-15"})
    assert part.status_code == 206
    assert part.content == full.content[:16]
    assert part.headers["content-range"] == f"bytes 0-15/{len(full.content)}"
    cached = await relay_http.get("/view", params=params, headers={"If-None-Match": full.headers["etag"]})
    assert (cached.status_code, cached.content) == (304, b"")
    head = await relay_http.head("/view", params=params)
    assert (head.status_code, head.content, head.headers["content-length"]) == (
        200,
        b"",
        str(len(full.content)),
    )
    webp = await relay_http.get("/view", params={**params, "preview": "webp;90"})
    assert webp.headers["content-type"] == "image/webp"
    assert (
        await relay_http.get("/view", params={"filename": "nope.png"})
    ).status_code == 404  # ComfyUI's own
    await tab.close()


async def test_traversal_attempts_never_reach_comfyui(
    relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """Every refused /view of traces 12 (and subfolder escapes of 07) gets a 400 JSON error from the relay."""
    refused = [
        r for r in load_trace("12").http("GET") if r["status"] in (400, 403) and r["path"].startswith("/view")
    ]
    assert len(refused) >= 6
    for record in refused:
        query = record["path"].partition("?")[2]
        if query == "filename=":
            continue  # an empty filename is not an escape; ComfyUI's own 400 comes back
        response = await relay_http.get(f"/view?{query}")
        assert response.status_code == 400, record["path"]
        assert response.json()["error"]["type"] in ("bad_filename", "bad_subfolder", "bad_type")
    for escape in ("../escape", "/abs", "a/../../b", "..\\\\win"):
        response = await relay_http.get("/view", params={"filename": "x.png", "subfolder": escape})
        assert response.status_code == 400, escape
    leaked = [unquote(q) for q in reached(emulator, "/view")]
    assert not [q for q in leaked if ".." in q or "etc" in q or "bogus" in q], leaked


async def test_malformed_bodies_are_refused_before_comfyui(
    relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """Bodies ComfyUI answers with its 500 page get a 400 JSON error from the relay instead."""
    for path in ("/queue", "/history", "/free", "/api/queue"):
        for body in (b"", b"not json", b"[1]"):
            response = await relay_http.post(path, content=body)
            assert response.status_code == 400, (path, body)
            assert response.json()["error"]["type"] == "invalid_body"
    assert (await relay_http.post("/interrupt", content=b"[1, 2]")).status_code == 400
    assert reached(emulator, "/queue") == []
    assert (await relay_http.post("/interrupt")).status_code == 200  # no body: a global interrupt
    assert (await relay_http.post("/free", json={"unload_models": True})).status_code == 200


async def test_queue_in_run_order_and_api_prefix(
    relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """GET /queue lists pending prompts in the order they will run; /api/... serves the same."""
    trace = load_trace("10")
    async with httpx.AsyncClient(base_url=emulator.url) as comfy:
        await comfy.post("/prompt", json={"prompt": _slow(trace.workflow("blocker"))})
        # Trace 10's pattern: three plain, one in front, one with number 1.5, one plain.
        for extra in ({}, {}, {}, {"front": True}, {"number": 1.5}, {}):
            await comfy.post("/prompt", json={"prompt": trace.workflow("p1"), **extra})
        heap = [item[0] for item in (await comfy.get("/queue")).json()["queue_pending"]]
        for path in ("/queue", "/api/queue"):
            ordered = [item[0] for item in (await relay_http.get(path)).json()["queue_pending"]]
            assert ordered == sorted(heap)
        assert heap != sorted(heap)  # ComfyUI's own answer is a heap, not run order
        await comfy.post("/queue", json={"clear": True})
        await comfy.post("/interrupt")
    for path in (
        "/api/object_info/EmptyImage",
        "/api/features",
        "/api/system_stats",
        "/history",
        "/api/prompt",
    ):
        assert (await relay_http.get(path)).status_code == 200, path


def _slow(graph: dict[str, object]) -> dict[str, object]:
    graph["2"]["inputs"]["steps"] = 200  # type: ignore[index]
    return graph


async def test_browser_origin_and_cookies_are_not_forwarded(
    relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """ComfyUI would answer 403 to a foreign Origin on its loopback address; the relay does not pass it on."""
    headers = {
        "Origin": "http://app.example",
        "Referer": "http://app.example/page",
        "Cookie": "session=secret",
    }
    (emulator.state.folders.output / "seen.png").write_bytes(b"x" * 10)
    # One route on the shared httpx client, and /view on the download path.
    for path, query in (("/object_info/EmptyImage", {}), ("/view", {"filename": "seen.png"})):
        response = await relay_http.get(path, params=query, headers=headers)
        assert response.status_code == 200, path
        _, _, _, seen = next(r for r in reversed(emulator.state.requests) if r[1] == path)
        assert "origin" not in seen
        assert "referer" not in seen
        assert "cookie" not in seen
        assert seen.get("user-agent")  # other headers do go through


async def test_unreachable_and_stalled_comfyui(emulator: RunningEmulator) -> None:
    """ComfyUI down: 502 JSON. ComfyUI accepting but never answering: 504 JSON. Never a traceback."""
    async with (
        run_relay(relay_config(emulator, http_read_timeout=0.5)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        await emulator.stop()
        for path in ("/queue", "/view?filename=a.png"):
            down = await http.get(path)
            assert down.status_code == 502, path
            assert down.json()["error"]["type"] == "upstream_unavailable"
        await emulator.start()

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    try:
        config = relay_config(emulator, comfyui_url=f"http://127.0.0.1:{port}", http_read_timeout=0.5)
        async with run_relay(config) as stalled, httpx.AsyncClient(base_url=stalled.url, timeout=30) as http:
            for path in ("/system_stats", "/view?filename=a.png"):
                response = await http.get(path)
                assert response.status_code == 504, path
                assert response.json()["error"]["type"] == "upstream_timeout"
                assert "Traceback" not in response.text
    finally:
        silent.close()
    await asyncio.sleep(0)


PNG = (TRACES / "07-upload.probe_upload.png").read_bytes()


async def test_upload_round_trip_and_dedup(
    relay: RunningRelay, relay_http: httpx.AsyncClient, comfyui_version: ComfyVersion
) -> None:
    """An upload through the relay lands in ComfyUI's input folder and a LoadImage graph uses it."""
    first = await relay_http.post("/upload/image", files={"image": ("portrait.png", PNG, "image/png")})
    answer = first.json()
    asset = answer.pop("asset", None)  # current ComfyUI registers every upload as an asset
    assert answer == {"name": "portrait.png", "subfolder": "", "type": "input"}
    if comfyui_version == "current":
        assert asset["name"] == "portrait.png"
        assert re.fullmatch(r"blake3:[0-9a-f]{64}", asset["asset_hash"])
        by_hash = await relay_http.get("/view", params={"filename": asset["asset_hash"]})
        assert by_hash.content == PNG  # /view serves it by its hash too
    else:
        assert asset is None
    other = PNG[:-5] + bytes(5)
    second = await relay_http.post("/api/upload/image", files={"image": ("portrait.png", other, "image/png")})
    assert second.json()["name"] == "portrait (1).png"  # ComfyUI's own naming comes back
    tab = await open_tab(relay.ws_url, "clientId=uploader")
    graph = load_trace("07").workflow()
    graph["1"]["inputs"]["image"] = "portrait.png"
    done = await tab.wait_done(await submit(relay_http, graph, "uploader"))
    assert done["status"] == "success"
    mask = await relay_http.post(
        "/upload/mask",
        files={"image": ("mask.png", PNG, "image/png")},
        data={"original_ref": '{"filename": "portrait.png", "subfolder": "", "type": "input"}'},
    )
    assert mask.status_code == 200
    await tab.close()


async def test_unsafe_uploads_never_reach_comfyui(
    relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """Trace 07's traversal names, an unknown type, a text 'image' and a JSON body are refused with 400."""
    cases = [
        ({"image": ("../evil.png", PNG, "image/png")}, {}, "bad_filename"),
        ({"image": ("sub/../../evil2.png", PNG, "image/png")}, {}, "bad_filename"),
        ({"image": ("ok.png", PNG, "image/png")}, {"subfolder": "../escape"}, "bad_subfolder"),
        ({"image": ("ok.png", PNG, "image/png")}, {"type": "bogus"}, "bad_type"),
        ({}, {"image": "just a string field"}, "invalid_upload"),
        ({"file": ("ok.png", PNG, "image/png")}, {}, "invalid_upload"),
    ]
    for files, data, kind in cases:
        response = await relay_http.post("/upload/image", files=files or None, data=data)
        assert response.status_code == 400, (files, data)
        assert response.json()["error"]["type"] == kind
    as_json = await relay_http.post("/upload/image", json={"image": "x"})
    assert as_json.json()["error"]["type"] == "invalid_upload"
    bad_ref = await relay_http.post(
        "/upload/mask",
        data={"original_ref": '{"filename": "../x.png"}'},
        files={"image": ("m.png", PNG, "image/png")},
    )
    assert bad_ref.json()["error"]["type"] == "bad_filename"
    assert reached(emulator, "/upload/image") == []
    assert reached(emulator, "/upload/mask") == []


@pytest.mark.parametrize(
    ("late_part", "kind"),
    [
        (b'Content-Disposition: form-data; name="subfolder"\r\n\r\n../../escape', "bad_subfolder"),
        # ComfyUI fails with a 500 on a field it reads as text that came as a file (found by fuzzing).
        (b'Content-Disposition: form-data; name="subfolder"; filename="x.png"\r\n\r\nx', "invalid_upload"),
        # A second image part: ComfyUI takes the first, other servers the last (found by fuzzing).
        (b'Content-Disposition: form-data; name="image"; filename="...."\r\n\r\nx', "invalid_upload"),
        (b'Content-Disposition: form-data; name="extra"; filename="../../x.png"\r\n\r\nx', "bad_filename"),
    ],
)
async def test_unsafe_field_after_the_file_aborts_the_upload(
    relay_http: httpx.AsyncClient, emulator: RunningEmulator, late_part: bytes, kind: str
) -> None:
    """A browser may send subfolder after the file: the relay stops mid-way and ComfyUI stores nothing."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="late.png"\r\n'
        + b"Content-Type: image/png\r\n\r\n"
        + PNG * 200
        + b"\r\n--b\r\n"
        + late_part
        + b"\r\n--b--\r\n"
    )
    response = await relay_http.post(
        "/upload/image", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == kind
    # A later upload on a new request has landed: the aborted one is over at ComfyUI by then.
    later = await relay_http.post("/upload/image", files={"image": ("later.png", PNG, "image/png")})
    assert later.status_code == 200, later.text
    assert (emulator.state.folders.input / "later.png").exists()
    assert not any(emulator.state.folders.input.rglob("late.png"))
    assert not (emulator.state.folders.input.parent / "escape").exists()


async def test_upload_limit(emulator: RunningEmulator) -> None:
    """Over RELAY_MAX_UPLOAD_BYTES: 413 JSON, declared or streamed, and ComfyUI never sees it."""
    async with (
        run_relay(relay_config(emulator, max_upload_bytes=1024 * 1024)) as relay,
        httpx.AsyncClient(base_url=relay.url, timeout=30) as http,
    ):
        big = os.urandom(2 * 1024 * 1024)
        declared = await http.post("/upload/image", files={"image": ("big.png", big, "image/png")})
        assert declared.status_code == 413
        assert declared.json()["error"]["type"] == "payload_too_large"

        async def chunked() -> AsyncIterator[bytes]:
            boundary = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="b.png"\r\n\r\n'
            yield boundary
            for _ in range(32):
                yield bytes(64 * 1024)
            yield b"\r\n--xyz--\r\n"

        streamed = await http.post(
            "/upload/image", content=chunked(), headers={"Content-Type": "multipart/form-data; boundary=xyz"}
        )
        assert streamed.status_code == 413
        small = await http.post("/upload/image", files={"image": ("small.png", PNG, "image/png")})
        assert small.status_code == 200
    # The declared one never reached ComfyUI; the streamed one was cut off and left nothing behind.
    assert len(reached(emulator, "/upload/image")) == 2
    stored = sorted(p.name for p in emulator.state.folders.input.iterdir())
    assert stored == ["example.png", "small.png"]  # example.png: shipped in the input folder


async def test_only_the_named_routes_reach_comfyui(
    relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """ComfyUI's routes a front end does not need (user files, settings, internals, the
    manager) are not proxied: a JSON 404, and ComfyUI never hears of the request."""
    paths = ["/userdata", "/api/userdata/workflows%2Fx.json", "/settings", "/api/settings/x",
             "/internal/logs", "/api/internal/folder_paths", "/extensions",
             "/api/manager/reboot"]  # fmt: skip
    for path in paths:
        for method in ("GET", "POST"):
            answer = await relay_http.request(method, path, content=b"{}")
            assert answer.status_code in (404, 405), (method, path, answer.status_code)
            assert answer.json()["error"]["type"] in ("not_found", "method_not_allowed")
    seen = {path for _, path, _, _ in emulator.state.requests}
    private = ("/userdata", "/api/userdata", "/settings", "/api/settings", "/internal", "/api/internal",
               "/extensions", "/api/manager")  # fmt: skip
    assert not any(p.startswith(private) for p in seen), seen
