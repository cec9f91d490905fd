"""Contract: HTTP answers for prompts, uploads, the queue and /view (scenarios 06, 07, 10, 12).

Recorded requests are replayed as they were sent; status codes, content types, header sets
and (normalised) bodies are compared with the recorded answers.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from relay.emulator.config import ComfyVersion
from relay.emulator.edge import SERVER_ERROR_BODY
from tests.driver import Session
from tests.tracekit import TRACES, fold_progress, load_trace, normalize, shape, split_status


@pytest.fixture
def comfyui_version() -> ComfyVersion:
    """Held to the recordings of a real 0.3.64 server."""
    return "0.3.64"


CLIENT = "relayprobe-fixed-client-0001"
PROBE_PNG = (TRACES / "07-upload.probe_upload.png").read_bytes() if TRACES.is_dir() else b""


async def replay(
    http: httpx.AsyncClient, record: dict[str, Any], files: dict[str, bytes] | None = None
) -> httpx.Response:
    """Send a recorded request again: JSON, raw body, multipart form, or nothing."""
    request = record["request"]
    headers = dict(request.get("headers", {}))
    method, path = record["method"], record["path"]
    if "json" in request:
        return await http.request(method, path, json=request["json"], headers=headers)
    if "raw_body" in request:
        return await http.request(method, path, content=request["raw_body"].encode(), headers=headers)
    if "form" in request:
        data: dict[str, str] = {}
        parts: list[tuple[str, tuple[str, bytes, str]]] = []
        for field in request["form"]:
            if "filename" in field:
                content = (files or {}).get(field["sha256"], b"\x00" * field["bytes"])
                parts.append((field["name"], (field["filename"], content, field["content_type"])))
            else:
                data[field["name"]] = field["value"]
        return await http.request(method, path, data=data, files=parts, headers=headers)
    return await http.request(method, path, headers=headers)


def content_type(headers: Any) -> str | None:
    for name, value in headers.items() if hasattr(headers, "items") else headers:
        if name.lower() == "content-type":
            return str(value)
    return None


def recorded_body(record: dict[str, Any]) -> Any:
    return record.get("body_json", record.get("body_text"))


def assert_same_answer(
    response: httpx.Response, record: dict[str, Any], *, compare_body: bool = True
) -> None:
    assert response.status_code == record["status"], (record["path"], response.text)
    assert content_type(response.headers) == content_type(record["response_headers"]), record["path"]
    if response.status_code == 500:
        assert response.content == SERVER_ERROR_BODY
        assert response.headers["connection"] == "close"
        return
    if not compare_body:
        return
    body = recorded_body(record)
    if isinstance(body, (dict, list)):
        assert normalize(response.json()) == normalize(body), record["path"]
    elif body is not None:
        assert response.text == body, record["path"]


async def test_06_invalid_prompts(session: Session) -> None:
    """Every invalid prompt of trace 06 gets the recorded status and body; a partly valid one runs."""
    trace = load_trace("06")
    a = await session.connect("A", CLIENT)
    accepted = None
    for record in trace.http("POST", "/prompt"):
        response = await replay(session.http, record)
        if response.status_code == 200:
            accepted = response.json()
            expected = record["body_json"]
            assert normalize(accepted["node_errors"]) == normalize(expected["node_errors"])
            assert set(accepted) == set(expected)
            await a.wait_done(accepted["prompt_id"])
            continue
        assert_same_answer(response, record)
        if response.status_code == 400 and "exception_during_validation" in response.text:
            extra = response.json()["node_errors"]["2"]["errors"][0]["extra_info"]
            assert extra["exception_type"] == "KeyError"
            assert all(isinstance(line, str) for line in extra["traceback"])
    assert accepted is not None
    # Every parsed POST consumed a number: the accepted prompt came after seven rejections.
    assert accepted["number"] == 7
    ours, _ = split_status(a.tokens())
    theirs, _ = split_status(trace.tokens("A"))
    assert ours == theirs
    recorded_get = trace.http("GET", "/prompt")[0]
    assert_same_answer(await session.http.get("/prompt"), recorded_get)


def upload_files() -> dict[str, bytes]:
    """The uploaded contents by their recorded sha256; only the first file was kept as is."""
    different = bytearray(PROBE_PNG)
    different[-5] ^= 0xFF
    files = {
        hashlib.sha256(PROBE_PNG).hexdigest(): PROBE_PNG,
        "a3c84fe4824541d366fc99a2afcc6a02c1aa51a020d631ccd149d38189b19405": bytes(different),
        "9384fe2b3946f89579862e24fa63a6eac81f503af5c42eb7dc67b651f324aaf0": b"hello, not an image\n",
    }
    assert (
        hashlib.sha256(PROBE_PNG).hexdigest()
        == "d255472c59a2846d92c39a594296344e83315514f181e21552bc9418ddb98bd7"
    )
    assert hashlib.sha256(
        files["9384fe2b3946f89579862e24fa63a6eac81f503af5c42eb7dc67b651f324aaf0"]
    ).hexdigest() == ("9384fe2b3946f89579862e24fa63a6eac81f503af5c42eb7dc67b651f324aaf0")
    return files


async def test_07_uploads_and_load_image(session: Session) -> None:
    """Trace 07: dedup naming, subfolders, temp/output types, traversal 400s, 500s, LoadImage runs."""
    trace = load_trace("07")
    a = await session.connect("A", CLIENT)
    files = upload_files()
    for record in trace.records_of("http"):
        if record["path"] in ("/upload/image", "/api/upload/image"):
            assert_same_answer(await replay(session.http, record, files), record)
        elif record["path"].startswith("/view"):
            response = await replay(session.http, record)
            assert_same_answer(response, record, compare_body=False)
            if "notes.txt" in record["path"]:
                assert response.text == record["body_text"]
        elif record["method"] == "POST" and record["path"] == "/prompt":
            response = await replay(session.http, record)
            if record["status"] == 200:
                await a.wait_done(response.json()["prompt_id"])
            else:
                assert_same_answer(response, record)
    assert a.tokens() == trace.tokens("A")
    stored = session.http.get("/view", params={"filename": "probe_upload (1).png", "type": "input"})
    assert (await stored).content == files["a3c84fe4824541d366fc99a2afcc6a02c1aa51a020d631ccd149d38189b19405"]
    scaled = next(f.data["output"]["images"][0] for f in a.frames if f.type == "executed")
    picture = await session.http.get("/view", params={"filename": scaled["filename"], "type": "output"})
    with Image.open(io.BytesIO(picture.content)) as image:
        assert image.size == (64, 48)


async def test_10_queue_operations(slow_session: Session) -> None:
    """Trace 10: heap-ordered pending list, delete, clear, front, number, custom and duplicate ids."""
    session = slow_session
    http = session.http
    trace = load_trace("10")
    # The recorded server had the blocker's EmptyImage cached from the previous scenario and
    # was at prompt number 36. A prelude run sets up the cache; parsed POSTs advance the count.
    await session.submit(trace.workflow("after"))
    await session.wait_idle()
    for _ in range(35):
        assert (await http.post("/prompt", json={})).status_code == 400
    a = await session.connect("A", CLIENT)
    ids: dict[str, str] = {}  # recorded prompt id -> ours

    for record in trace.records_of("http"):
        path, method, note = record["path"], record["method"], record.get("note", "")
        if method == "POST" and path == "/prompt":
            response = await replay(http, record)
            ours = response.json()
            assert ours["number"] == record["body_json"]["number"]
            ids[record["body_json"]["prompt_id"]] = ours["prompt_id"]
        elif method == "POST" and path.endswith("/queue"):
            body = record["request"].get("json")
            if isinstance(body, dict) and "delete" in body:
                request = {**record, "request": {"json": {"delete": [ids.get(i, i) for i in body["delete"]]}}}
                assert_same_answer(await replay(http, request), record)
            else:
                assert_same_answer(await replay(http, record), record)
        elif method == "GET" and path == "/queue":
            if note == "both queued?":
                continue  # depends on whether the first short run already finished
            if note == "at the end":
                await session.wait_idle()
            ours = (await http.get("/queue")).json()
            theirs = record["body_json"]
            # Pending is the raw heap array: its numbers must come in the recorded order.
            assert [item[0] for item in ours["queue_pending"]] == [
                item[0] for item in theirs["queue_pending"]
            ], note
            assert [item[0] for item in ours["queue_running"]] == [
                item[0] for item in theirs["queue_running"]
            ], note
            assert shape(ours) == shape(theirs)
        elif method == "GET" and path.startswith("/history/"):
            await session.wait_idle()
            recorded_id = path.removeprefix("/history/")
            ours = (await http.get(f"/history/{ids.get(recorded_id, recorded_id)}")).json()
            assert shape(ours) == shape(record["body_json"])
            if ours:
                assert (
                    next(iter(ours.values()))["prompt"][0]
                    == next(iter(record["body_json"].values()))["prompt"][0]
                )
        elif method == "GET" and path.startswith("/history?"):
            ours = (await http.get(path)).json()
            assert len(ours) == len(record["body_json"])
            if "offset" not in path:
                # The last two entries, a duplicate id keeping its first place with its last run.
                assert [e["prompt"][0] for e in ours.values()] == [
                    e["prompt"][0] for e in record["body_json"].values()
                ]
        elif method == "GET" and path == "/prompt":
            assert (await http.get("/prompt")).json() == record["body_json"]

    await session.wait_idle()
    ours, our_status = split_status(a.tokens())
    theirs, their_status = split_status(trace.tokens("A"))
    assert fold_progress(ours) == fold_progress(theirs)
    assert our_status == their_status


async def test_12_view_edge_cases(session: Session) -> None:
    """Trace 12: defaults, annotations, basenames, 400/403/404 rules, previews, channels, Range, 304."""
    trace = load_trace("12")
    a = await session.connect("A", CLIENT)
    prompt_id = await session.submit(load_trace("01").workflow(), CLIENT)
    await a.wait_done(prompt_id)
    temp_name = next(f.data["output"]["images"][0]["filename"] for f in a.frames if f.type == "executed")
    for extra in ({}, {"subfolder": "probe_sub"}):
        files = {"image": ("probe_upload.png", PROBE_PNG, "image/png")}
        assert (
            await session.http.post("/upload/image", files=files, data={"overwrite": "true", **extra})
        ).is_success
    notes = {"image": ("notes.txt", b"hello, not an image\n", "text/plain")}
    assert (await session.http.post("/upload/image", files=notes, data={"overwrite": "true"})).is_success

    validators: dict[str, str] = {}
    for record in trace.records_of("http"):
        path = record["path"].replace("ComfyUI_temp_pahqc_00001_.png", temp_name)
        headers = dict(record["request"].get("headers", {}))
        if "If-None-Match" in headers:
            headers["If-None-Match"] = validators["etag"]
        if "If-Modified-Since" in headers:
            headers["If-Modified-Since"] = validators["last-modified"]
        response = await session.http.request(record["method"], path, headers=headers)
        note = record.get("note")
        assert response.status_code == record["status"], (path, note)
        recorded_names = {name.lower() for name, _ in record["response_headers"]} - {"date", "server"}
        assert set(response.headers) - {"date", "server"} == recorded_names, (path, note)
        assert content_type(response.headers) == content_type(record["response_headers"]), note
        if response.status_code == 200 and "etag" in response.headers:
            validators = {
                "etag": response.headers["etag"],
                "last-modified": response.headers["last-modified"],
            }
        info = record.get("image_info")
        if info and "pil_format" in info and response.status_code == 200:
            with Image.open(io.BytesIO(response.content)) as picture:
                assert [picture.format, list(picture.size), picture.mode] == [
                    info["pil_format"],
                    info["size"],
                    info["mode"],
                ], note
        if response.status_code == 206:
            assert response.headers["content-range"].startswith("bytes 0-15/")
            assert len(response.content) == 16
        if record["method"] == "HEAD":
            assert response.content == b""
            assert int(response.headers["content-length"]) > 0
