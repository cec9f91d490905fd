"""Contract: running the recorded graphs gives the recorded message sequences (scenarios 01-05).

Each test replays what the recorder did on the real server, with the same client id and
graphs, against the emulator at 20x speed, and compares what each socket received with the
trace: the frame sequence as tokens, every JSON message's field shapes (ints and floats
distinct), and every binary frame's layout.
"""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from relay.emulator.config import ComfyVersion
from relay.protocol import PREVIEW_METADATA_KEYS
from tests.driver import RecordingSocket, Session, of_type
from tests.tracekit import (
    Trace,
    binary_facts,
    fold_progress,
    load_trace,
    normalize,
    shape,
    split_status,
    token,
)


@pytest.fixture
def comfyui_version() -> ComfyVersion:
    """Held to the recordings of a real 0.3.64 server."""
    return "0.3.64"


CLIENT = "relayprobe-fixed-client-0001"


def assert_same_frames(socket: RecordingSocket, trace: Trace, ws: str) -> None:
    """Same tokens, same JSON shapes frame by frame, same binary frame facts."""
    assert socket.tokens() == trace.tokens(ws)
    recorded = trace.frames(ws)
    for ours, theirs in zip(socket.frames, recorded, strict=True):
        if theirs.message is not None:
            assert shape(ours.message) == shape(theirs.message), theirs.type
        else:
            assert binary_facts(ours) == binary_facts(theirs)


def first_value(body: dict[str, object]) -> object:
    """History answers are keyed by prompt id; compare the entry."""
    assert len(body) == 1
    return next(iter(body.values()))


async def test_01_simple_graph(session: Session) -> None:
    """Graph 01 gives trace 01's messages, history, queue and /view answers."""
    trace = load_trace("01")
    a = await session.connect("A", CLIENT)
    prompt_id = await session.submit(trace.workflow(), CLIENT)
    await a.wait_done(prompt_id)
    assert_same_frames(a, trace, "A")

    history = (await session.http.get(f"/history/{prompt_id}")).json()
    recorded = trace.http("GET", f"/history/{trace.http('POST', '/prompt')[0]['body_json']['prompt_id']}")[0]
    assert shape(first_value(history)) == shape(first_value(recorded["body_json"]))
    assert normalize(first_value(history)["outputs"]) == normalize(
        first_value(recorded["body_json"])["outputs"]
    )
    assert (await session.http.get("/history/does-not-exist")).json() == {}
    assert (await session.http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}

    saved = first_value(history)["outputs"]["3"]["images"][0]
    view = await session.http.get(
        "/view", params={"filename": saved["filename"], "subfolder": "", "type": "output"}
    )
    recorded_view = trace.http("GET", "/view?filename=probe_simple_00001_.png&subfolder=&type=output")[0]
    assert view.status_code == 200
    assert {k.lower() for k in view.headers} >= {k.lower() for k, _ in recorded_view["response_headers"]}
    assert view.headers["content-type"] == "image/png"
    assert view.headers["content-disposition"] == f'filename="{saved["filename"]}"'
    with Image.open(io.BytesIO(view.content)) as picture:
        assert (picture.format, picture.size, picture.mode) == ("PNG", (64, 64), "RGB")
        assert picture.getpixel((0, 0)) == (255 - 0x33, 255 - 0x66, 255 - 0xCC)  # the inverted colour


async def test_02_legacy_previews(session: Session) -> None:
    """A socket without feature flags gets event-1 JPEG previews after each progress (trace 02)."""
    trace = load_trace("02")
    a = await session.connect("A", CLIENT)
    prompt_id = await session.submit(trace.workflow(), CLIENT)
    await a.wait_for(of_type("progress", prompt_id))
    during = (await session.http.get("/queue")).json()
    recorded_during = trace.http("GET", "/queue")[0]["body_json"]
    assert shape(during) == shape(recorded_during)
    assert (await session.http.get("/prompt")).json() == {"exec_info": {"queue_remaining": 1}}
    await a.wait_done(prompt_id)
    assert_same_frames(a, trace, "A")
    preview = next(f for f in a.frames if f.event == 1)
    assert (preview.second, preview.image_format, preview.image_size) == (1, "JPEG", (512, 512))


async def test_02b_feature_flags_previews_with_metadata(session: Session) -> None:
    """feature_flags as first message: a reply, then event-4 previews carrying the prompt id (trace 02b)."""
    # Trace 02b ran right after 02, whose EmptyImage it reuses from the cache.
    await session.submit(load_trace("02").workflow())
    await session.wait_idle()
    trace = load_trace("02b")
    a = await session.connect("A", CLIENT, feature_flags=True)
    await a.wait_for(of_type("feature_flags"))
    prompt_id = await session.submit(trace.workflow(), CLIENT)
    await a.wait_done(prompt_id)
    assert_same_frames(a, trace, "A")
    reply = next(f for f in a.frames if f.type == "feature_flags")
    assert reply.data == {"supports_preview_metadata": True, "max_upload_size": 104857600}
    previews = [f for f in a.frames if f.event == 4]
    assert len(previews) == 8
    for frame in previews:
        assert tuple(frame.metadata or {}) == PREVIEW_METADATA_KEYS
        assert frame.metadata is not None
        assert frame.metadata["prompt_id"] == prompt_id
        assert frame.second == 166  # the metadata length the real server sent for the same ids
    # A second feature_flags message is ignored: no reply.
    before = len(a.frames)
    await a.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    await asyncio.sleep(0.3)
    assert len(a.frames) == before


async def test_02c_png_previews_progress_text_and_websocket_save(session: Session) -> None:
    """PNG previews, progress text broadcast to an observer, SaveImageWebsocket frames (trace 02c)."""
    trace = load_trace("02c")
    a = await session.connect("A", CLIENT)
    observer = await session.connect("O", "relayprobe-observer-02c")
    prompt_id = await session.submit(trace.workflow(), CLIENT)
    await a.wait_done(prompt_id)
    await observer.wait_for(
        lambda f: f.type == "status" and f.data["status"]["exec_info"]["queue_remaining"] == 0
    )
    assert_same_frames(a, trace, "A")
    assert_same_frames(observer, trace, "O")
    full_size = [f for f in a.frames if f.event == 1][-1]
    assert (full_size.image_format, full_size.image_size) == ("PNG", (96, 64))


async def test_03_cache_full_and_partial(session: Session) -> None:
    """Resubmits hit the cache: fully, then all but a changed SaveImage, then not after a root change (03)."""
    trace = load_trace("03")
    a = await session.connect("A", CLIENT)
    for graph in (
        trace.workflow(),
        trace.workflow(),
        trace.workflow("partial"),
        trace.workflow("root-changed"),
    ):
        prompt_id = await session.submit(graph, CLIENT)
        await a.wait_done(prompt_id)
    assert_same_frames(a, trace, "A")
    executed = [f.data["output"] for f in a.frames if f.type == "executed"]
    # The fully cached run re-sends the first run's files, it does not write new ones.
    assert normalize(executed[2]) == normalize(executed[0])
    assert executed[3]["images"][0]["filename"] == executed[1]["images"][0]["filename"]


async def test_04_interrupts(session: Session) -> None:
    """Global, targeted (pending, unknown, running), non-JSON and idle interrupts behave as in trace 04."""
    trace = load_trace("04")
    a = await session.connect("A", CLIENT)
    http = session.http

    # 4a: global interrupt with no body after three progress messages.
    first = await session.submit(trace.workflow(), CLIENT)
    await a.wait_for(of_type("progress", first), count=3)
    assert (await http.post("/interrupt")).status_code == 200
    await a.wait_done(first)

    # 4b: B runs, C waits. Interrupting C (pending) or an unknown id changes nothing.
    b = await session.submit(trace.workflow("B"), CLIENT)
    c = await session.submit(trace.workflow("C"), CLIENT)
    await a.wait_for(of_type("progress", b), count=2)
    assert (await http.post("/interrupt", json={"prompt_id": c})).status_code == 200
    await a.wait_for(of_type("progress", b), count=6)
    assert (
        await http.post("/interrupt", json={"prompt_id": "00000000-not-a-real-prompt"})
    ).status_code == 200
    assert (await http.post("/interrupt", json={"prompt_id": b})).status_code == 200
    await a.wait_done(b)
    await a.wait_for(of_type("progress", c), count=2)
    bad = await http.post("/interrupt", content=b"this is not json", headers={"Content-Type": "text/plain"})
    assert bad.status_code == 200
    await a.wait_done(c)

    # 4c: an interrupt while idle does not touch the next prompt.
    assert (await http.post("/interrupt", json={})).status_code == 200
    last = await session.submit(trace.workflow("D-after-idle-interrupt"), CLIENT)
    await a.wait_done(last)

    ours, our_status = split_status(a.tokens())
    theirs, their_status = split_status(trace.tokens("A"))
    assert fold_progress(ours) == fold_progress(theirs)
    assert our_status == their_status
    interrupted = [f.data for f in a.frames if f.type == "execution_interrupted"]
    recorded = [f.data for f in trace.frames("A") if f.type == "execution_interrupted"]
    assert [shape(d) for d in interrupted] == [shape(d) for d in recorded]
    assert [(d["node_id"], d["node_type"], d["executed"]) for d in interrupted] == [
        (d["node_id"], d["node_type"], d["executed"]) for d in recorded
    ]
    history = (await http.get(f"/history/{b}")).json()[b]
    assert history["status"]["status_str"] == "error"
    assert history["status"]["completed"] is False
    assert [m[0] for m in history["status"]["messages"]][-1] == "execution_interrupted"
    assert (await http.get(f"/history/{last}")).json()[last]["status"]["status_str"] == "success"


async def test_05_execution_error(session: Session) -> None:
    """A failing node sends execution_error with the recorded fields; a resubmit fails again (trace 05)."""
    trace = load_trace("05")
    a = await session.connect("A", CLIENT)
    prompt_ids = []
    for _ in range(2):
        prompt_ids.append(await session.submit(trace.workflow(), CLIENT))
        await a.wait_done(prompt_ids[-1])
    assert_same_frames(a, trace, "A")
    errors = [f.data for f in a.frames if f.type == "execution_error"]
    recorded = [f.data for f in trace.frames("A") if f.type == "execution_error"]
    for ours, theirs in zip(errors, recorded, strict=True):
        assert set(ours) == set(theirs)
        assert ours["exception_message"] == theirs["exception_message"]
        assert ours["exception_type"] == theirs["exception_type"]
        # The server takes both lists from sets: compare them as sets.
        assert set(ours["executed"]) == set(theirs["executed"])
        assert set(ours["current_outputs"]) == set(theirs["current_outputs"])
        assert set(ours["current_inputs"]) == set(theirs["current_inputs"])
    # The recorder fetched the first run's history; its outputs hold what ran before the failure.
    history = (await session.http.get(f"/history/{prompt_ids[0]}")).json()[prompt_ids[0]]
    recorded_history = first_value(trace.http("GET")[0]["body_json"])
    assert shape(history) == shape(recorded_history)
    assert normalize(history["outputs"]) == normalize(recorded_history["outputs"])
    assert (history["status"]["status_str"], history["status"]["completed"]) == ("error", False)


async def test_14_large_binary_frames(session: Session) -> None:
    """SaveImageWebsocket of a 1024x1024 noise image sends one frame of several MB (trace 14)."""
    trace = load_trace("14")
    a = await session.connect("A", CLIENT)
    prompt_id = await session.submit(trace.workflow(), CLIENT)
    await a.wait_done(prompt_id)
    f = await session.connect("F", "relayprobe-ff-14", feature_flags=True)
    await f.wait_for(of_type("feature_flags"))
    prompt_id = await session.submit(trace.workflow("feature-flags"), "relayprobe-ff-14")
    await f.wait_done(prompt_id)
    ours_a, _ = split_status(a.tokens())
    assert ours_a == split_status(trace.tokens("A"))[0]
    assert f.tokens() == trace.tokens("F")
    for socket, event in ((a, 1), (f, 4)):
        frame = next(fr for fr in socket.frames if fr.event == event)
        assert frame.image_size == (1024, 1024)
        # Noise does not compress: well over the 1 MiB a default websockets client accepts.
        assert frame.length > 2_000_000


async def test_partial_execution_targets_run_only_that_output(session: Session) -> None:
    """PROTOCOL.md §4 from scenario 11 (not in the shared traces): only the targeted output runs."""
    graph = {
        "20": {
            "class_type": "EmptyImage",
            "inputs": {"width": 48, "height": 48, "batch_size": 2, "color": 255},
        },
        "21": {"class_type": "ImageBlur", "inputs": {"image": ["20", 0], "blur_radius": 2, "sigma": 2.0}},
        "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "probe_par_b"}},
        "23": {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}},
    }
    a = await session.connect("A", CLIENT)
    prompt_id = await session.submit(graph, CLIENT, partial_execution_targets=["22"])
    await a.wait_done(prompt_id)
    assert [f.data["node"] for f in a.frames if f.type == "executing" and f.data.get("node")] == [
        "20",
        "21",
        "22",
    ]
    saved = next(f.data["output"] for f in a.frames if f.type == "executed")
    assert len(saved["images"]) == 2  # one file per image of the batch
    queued = (await session.http.get(f"/history/{prompt_id}")).json()[prompt_id]["prompt"][4]
    assert queued == ["22"]


async def test_output_node_without_ui(session: Session) -> None:
    """PROTOCOL.md §3 from scenario 16: no executed when fresh, executed with output null when cached."""
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7}},
        "2": {"class_type": "NoUIOutput", "inputs": {"image": ["1", 0]}},
    }
    a = await session.connect("A", CLIENT)
    for _ in range(2):
        prompt_id = await session.submit(graph, CLIENT)
        await a.wait_done(prompt_id)
    executed = [f.data for f in a.frames if f.type == "executed"]
    assert len(executed) == 1
    assert executed[0]["node"] == "2"
    assert executed[0]["output"] is None
    started = [token(f) for f in a.frames if f.type == "execution_cached"]
    assert started == ["execution_cached[]", "execution_cached[1,2]"]
