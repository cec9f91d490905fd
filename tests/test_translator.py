"""The translator, fed the recorded traces as plain data (no server, no sockets, no clock)."""

from __future__ import annotations

import json
from typing import Any

import orjson

from relay.eta import Durations
from relay.events import Event, fields
from relay.i18n import Localized
from relay.plans import build_plan
from relay.protocol import (
    BinaryEvent,
    ImageFormat,
    encode_preview,
    encode_preview_with_metadata,
    encode_text,
)
from relay.translator import Delivery, Plan, StepSpec, StepTiming, Translation, Translator, humanize
from tests.tracekit import TRACES, Frame, load_trace

OUTPUT_CLASSES = {
    name for name, info in json.loads((TRACES / "13-endpoints.object_info.json").read_text()).items()
    if info["output_node"]
} | {"NoUIOutput"}  # fmt: skip


def file_url(ref: Any, prompt_id: str = "") -> str:
    return f"/view?filename={ref['filename']}&type={ref['type']}"


def plain(translation: Translation) -> list[dict[str, Any]]:
    """The events as a client reads them (without the envelope's seq, ts and client id)."""
    return [as_dict(event) for event in translation.events]


def as_dict(event: Event) -> dict[str, Any]:
    return {"type": event.type, **fields(event)}


def wire(frame: Frame) -> str | bytes:
    """The recorded frame as ComfyUI sent it (a binary frame's image is not recorded: a stand-in)."""
    if frame.message is not None:
        return orjson.dumps(frame.message).decode()
    if frame.event == BinaryEvent.TEXT:
        return encode_text(frame.node_id or "", frame.text or "")
    if frame.event == BinaryEvent.PREVIEW_IMAGE_WITH_METADATA:
        return encode_preview_with_metadata(b"\xff\xd8 image", frame.metadata or {})
    return encode_preview(b"\xff\xd8 image", ImageFormat.JPEG)


def feed(translator: Translator, message: dict[str, Any], now: float) -> list[dict[str, Any]]:
    return plain(translator.frame(orjson.dumps(message).decode(), now))


def replay(trace_name: str, ws: str = "A", client_id: str | None = None) -> list[dict[str, Any]]:
    """Feed one socket's recorded frames to a translator, registering prompts as the relay would.

    With ``client_id``, only that client's prompts are registered (the relay knows only the
    prompts its client submitted through it).
    """
    trace = load_trace(trace_name)
    translator = Translator(file_url=file_url)
    events: list[dict[str, Any]] = []
    for record in trace.records:
        now = record["t"]
        if record["kind"] == "http" and record["method"] == "POST" and record["path"].endswith("/prompt"):
            body = record["request"].get("json")
            if record["status"] != 200 or not isinstance(body, dict):
                continue
            if client_id is not None and body.get("client_id") != client_id:
                continue
            prompt_id = record["body_json"]["prompt_id"]
            plan = build_plan(body["prompt"], OUTPUT_CLASSES, targets=body.get("partial_execution_targets"))
            # The recorder sent the POST at t_sent; the relay registers before forwarding.
            translator.register(prompt_id, plan, record["t_sent"])
            events += plain(translator.accept(prompt_id, record["body_json"]["number"], now))
        elif record["kind"] == "ws_recv" and record["ws"] == ws:
            events += plain(translator.frame(wire(Frame.from_record(record)), now))
    return events


def kinds(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for event in events:
        kind = event["type"].removeprefix("relay.")
        if kind == "step":
            kind = f"step {event['index']}/{event['total']} {event['node']} {event['state']}"
        elif kind == "done":
            kind = f"done {event['status']}"
        out.append(kind)
    return out


def test_simple_graph_steps() -> None:
    """Trace 01: four steps numbered in run order, each started then done, then success at 100%."""
    events = replay("01")
    assert kinds(events) == [
        "queue",  # the status a socket gets on connect
        "queued",
        "queue",
        "started",
        "step 1/4 1 running", "step 1/4 1 done",
        "step 2/4 4 running", "output", "step 2/4 4 done",
        "step 3/4 2 running", "step 3/4 2 done",
        "step 4/4 3 running", "output", "step 4/4 3 done",
        "done success",
        "queue",
    ]  # fmt: skip
    queued = events[1]
    assert [s["node"] for s in queued["steps"]] == ["1", "4", "2", "3"]
    assert [s["name"] for s in queued["steps"]] == [
        "Empty Image",
        "Preview Image",
        "Image Invert",
        "Save Image",
    ]
    done = events[-2]
    assert (done["completed"], done["total"], done["percent"]) == (4, 4, 100.0)
    assert done["outputs"]["3"]["images"][0]["filename"] == "probe_simple_00001_.png"
    output = next(e for e in events if e["type"] == "relay.output" and e["node"] == "3")
    assert output["files"] == [
        {"filename": "probe_simple_00001_.png", "subfolder": "", "type": "output", "kind": "images",
         "url": "/view?filename=probe_simple_00001_.png&type=output"}
    ]  # fmt: skip


def test_progress_percent_and_elapsed() -> None:
    """Trace 02: sampler progress moves percent from 1/3 towards 2/3 and elapsed grows with time."""
    events = replay("02")
    progress = [e for e in events if e["type"] == "relay.progress"]
    assert [(p["value"], p["max"]) for p in progress] == [(i, 8) for i in range(1, 9)]
    assert [p["percent"] for p in progress] == [round((1 + i / 8) / 3 * 100, 1) for i in range(1, 9)]
    elapsed = [p["elapsed"] for p in progress]
    assert elapsed == sorted(elapsed)
    assert 1.3 < elapsed[-1] < 1.8  # eight steps of 0.2 s
    assert all(p["index"] == 2 and p["total"] == 3 for p in progress)
    step_done = next(
        e for e in events if e["type"] == "relay.step" and e["node"] == "2" and e["state"] == "done"
    )
    assert 1.5 < step_done["duration"] < 1.8


def test_previews_with_metadata_belong_to_their_prompt() -> None:
    """Trace 02b: event-4 previews become versioned relay.preview events for the running node."""
    events = replay("02b")
    previews = [e for e in events if e["type"] == "relay.preview"]
    assert [p["version"] for p in previews] == list(range(1, 9))
    assert {p["node"] for p in previews} == {"2"}
    started = next(e for e in events if e["type"] == "relay.started")
    assert (started["cached"], started["completed"], started["total"]) == (["1"], 1, 3)


def test_cached_reruns() -> None:
    """Trace 03: a fully cached run completes every step at start; a partial one runs only the rest."""
    events = replay("03")
    started = [e for e in events if e["type"] == "relay.started"]
    assert [(s["cached"], s["completed"]) for s in started] == [
        ([], 0), (["1", "4", "2", "3"], 4), (["1", "4", "2"], 3), ([], 0)
    ]  # fmt: skip
    done = [e for e in events if e["type"] == "relay.done"]
    assert all(d["status"] == "success" and d["completed"] == 4 for d in done)
    third_steps = [
        e for e in events if e["type"] == "relay.step" and e["prompt_id"] == started[2]["prompt_id"]
    ]
    assert [(s["node"], s["index"], s["state"]) for s in third_steps] == [
        ("3", 4, "running"),
        ("3", 4, "done"),
    ]


def test_error_and_interrupt() -> None:
    """Traces 05 and 04: a failing node ends in a step error and done(error); interrupts end interrupted."""
    errors = [
        e for e in replay("05") if e["type"] in ("relay.step", "relay.done") and e.get("state") != "done"
    ]
    failed = [e for e in errors if e["type"] == "relay.done"]
    assert [d["status"] for d in failed] == ["error", "error"]
    assert failed[0]["error"] == {
        "node": "2",
        "class_type": "FailAfter",
        "exception_type": "RuntimeError",
        "message": "deliberate failure from FailAfter (probe)",
    }
    assert [e["node"] for e in errors if e.get("state") == "error"] == ["2", "2"]
    interrupted = [e for e in replay("04") if e["type"] == "relay.done"]
    assert [d["status"] for d in interrupted] == ["interrupted", "interrupted", "interrupted", "success"]


def test_foreign_prompts_produce_nothing() -> None:
    """Trace 09, socket T: broadcasts of other clients' prompts never become events."""
    events = replay("09", ws="T", client_id="relayprobe-fixed-client-0001")
    assert {e["type"] for e in events} <= {"relay.queue"}


def test_reconnect_replay_continues_the_running_step() -> None:
    """Trace 08, socket C: the 'executing' replay without prompt_id maps to our running prompt."""
    translator = Translator(file_url=file_url)
    plan = Plan(
        (
            StepSpec("1", "EmptyImage", "a"),
            StepSpec("2", "SlowProgress", "b"),
            StepSpec("3", "SaveImage", "c"),
        )
    )
    translator.register("p", plan, 0.0)
    translator.accept("p", 1, 0.0)
    feed(translator, {"type": "execution_start", "data": {"prompt_id": "p"}}, 1.0)
    feed(translator, {"type": "execution_cached", "data": {"nodes": ["1"], "prompt_id": "p"}}, 1.0)
    first = feed(translator, {"type": "executing", "data": {"node": "2", "prompt_id": "p"}}, 1.1)
    assert [e["state"] for e in first] == ["running"]
    # The socket dropped and came back: the server repeats the running node, without prompt_id.
    assert feed(translator, {"type": "executing", "data": {"node": "2"}}, 5.0) == []
    progress = feed(
        translator, {"type": "progress", "data": {"value": 7, "max": 15, "node": "2", "prompt_id": "p"}}, 5.1
    )
    assert progress[0]["index"] == 2


def test_frames_racing_the_post_answer_wait_for_it() -> None:
    """Events that arrive before ComfyUI answered the POST come out after relay.queued, in order."""
    translator = Translator(file_url=file_url)
    translator.register("p", Plan((StepSpec("1", "SaveImage", "save"),)), 0.0)
    assert feed(translator, {"type": "execution_start", "data": {"prompt_id": "p"}}, 0.1) == []
    assert feed(translator, {"type": "execution_cached", "data": {"nodes": [], "prompt_id": "p"}}, 0.1) == []
    events = plain(translator.accept("p", 3, 0.2))
    assert [e["type"] for e in events] == ["relay.queued", "relay.started"]


def test_recovery_from_history_and_lost_prompts() -> None:
    """After a reconnect, history closes finished prompts and unknown ones are reported lost."""
    translator = Translator(file_url=file_url)
    for prompt_id in ("ok", "bad", "gone"):
        translator.register(prompt_id, Plan((StepSpec("9", "SaveImage", "save"),)), 0.0)
        translator.accept(prompt_id, 1, 0.0)
    saved = {"images": [{"filename": "x.png", "subfolder": "", "type": "output"}]}
    success = {"status_str": "success", "completed": True, "messages": [["execution_success", {}]]}
    history_ok = {"outputs": {"9": saved}, "status": success}
    history_bad = next(iter(load_trace("05").http("GET")[0]["body_json"].values()))
    recovered = plain(translator.recover("ok", history_ok, 3.0))
    assert [e["type"] for e in recovered] == ["relay.output", "relay.done"]
    assert recovered[-1]["recovered"] is True
    assert recovered[-1]["status"] == "success"
    failed = plain(translator.recover("bad", history_bad, 3.0))
    assert failed[-1]["status"] == "error"
    assert failed[-1]["error"]["exception_type"] == "RuntimeError"
    lost = plain(translator.lost("gone", "ComfyUI restarted", 3.0))
    assert lost[0]["error"]["exception_type"] == "PromptLost"
    assert translator.active() == []


def test_humanize_class_types() -> None:
    """Class types read as words, keeping acronyms together."""
    assert humanize("VAEDecode") == "VAE Decode"
    assert humanize("CLIPTextEncode") == "CLIP Text Encode"
    assert humanize("KSampler") == "KSampler"
    assert humanize("EmptyLatentImage") == "Empty Latent Image"
    assert humanize("ADE_LoadAnimateDiffModel") == "ADE Load Animate Diff Model"


def test_text_racing_the_post_answer_is_kept() -> None:
    """Progress text of a run that finished before ComfyUI answered the POST is not lost."""
    translator = Translator(file_url=file_url)
    translator.register(
        "p", Plan((StepSpec("2", "SlowProgress", "slow"), StepSpec("3", "SaveImage", "save"))), 0.0
    )
    for message in (
        {"type": "execution_start", "data": {"prompt_id": "p"}},
        {"type": "execution_cached", "data": {"nodes": [], "prompt_id": "p"}},
        {"type": "executing", "data": {"node": "2", "prompt_id": "p"}},
    ):
        assert feed(translator, message, 0.1) == []
    assert plain(translator.frame(encode_text("2", "step 1/3"), 0.2)) == []
    events = plain(translator.accept("p", 1, 0.3))
    assert [e["type"] for e in events] == ["relay.queued", "relay.started", "relay.step", "relay.text"]
    assert events[-1]["text"] == "step 1/3"


def started_translator() -> Translator:
    translator = Translator(
        file_url=file_url,
        preview_url=lambda prompt, node, version: f"/previews/c/{prompt}/{node}?v={version}",
    )
    plan = Plan((StepSpec("1", "KSampler", "sample"), StepSpec("2", "SaveImage", "save")), timing_key="wf")
    translator.register("p", plan, 0.0)
    translator.accept("p", 1, 0.0)
    for message in (
        {"type": "execution_start", "data": {"prompt_id": "p"}},
        {"type": "execution_cached", "data": {"nodes": [], "prompt_id": "p"}},
        {"type": "executing", "data": {"node": "1", "prompt_id": "p"}},
    ):
        translator.frame(orjson.dumps(message).decode(), 0.5)
    return translator


def text_frame(message_type: str, **data: Any) -> str:
    return orjson.dumps({"type": message_type, "data": data}).decode()


def test_whose_frame_is_decided_by_the_translator() -> None:
    """Raw frames are forwarded only when they are this client's; the queue status always is."""
    translator = started_translator()
    status = text_frame("status", status={"exec_info": {"queue_remaining": 2}})
    out = translator.frame(status, 1.0)
    assert out.forward is not None
    assert out.forward.payload == status
    assert out.forward.key is None
    assert out.queue_status
    assert plain(out) == [{"type": "relay.queue", "remaining": 2}]

    progress = text_frame("progress", value=1, max=4, node="1", prompt_id="p")
    out = translator.frame(progress, 1.1)
    assert out.forward is not None
    assert out.forward.key == ("progress", None, None)
    assert [e["type"] for e in plain(out)] == ["relay.progress"]

    foreign = text_frame("executing", node="1", prompt_id="someone-else")
    out = translator.frame(foreign, 1.2)
    assert (out.forward, out.events) == (None, [])
    assert translator.frame(text_frame("feature_flags", supports_preview_metadata=True), 1.3).forward is None

    image = b"\xff\xd8 jpeg"
    preview = encode_preview_with_metadata(
        image, {"node_id": "1", "prompt_id": "p", "image_type": "image/jpeg"}
    )
    out = translator.frame(preview, 1.4)
    assert out.preview is not None
    assert (out.preview.prompt_id, out.preview.node, out.preview.data) == (
        "p",
        "1",
        image,
    )
    assert out.forward is not None
    assert out.forward.key == ("preview", "p", "1")
    assert out.forward.legacy is not None
    assert out.forward.legacy.endswith(image)
    assert plain(out) == [
        {"type": "relay.preview", "prompt_id": "p", "node": "1", "mime": "image/jpeg",
         "url": "/previews/c/p/1?v=1", "version": 1}
    ]  # fmt: skip
    other = encode_preview_with_metadata(image, {"node_id": "1", "prompt_id": "someone-else"})
    out = translator.frame(other, 1.5)
    assert (out.forward, out.preview, out.events) == (None, None, [])
    assert translator.frame(b"\x00\x00", 1.6).events == []  # not a frame at all: nothing, no error


def test_progress_text_belongs_to_whoever_runs() -> None:
    """ComfyUI sends progress text to every socket: it is ours only while our prompt runs."""
    idle = Translator(file_url=file_url)
    out = idle.frame(encode_text("1", "loading"), 0.0)
    assert (out.forward, out.events) == (None, [])
    out = started_translator().frame(encode_text("1", "loading"), 1.0)
    assert out.forward is not None
    assert plain(out) == [{"type": "relay.text", "prompt_id": "p", "node": "1", "text": "loading"}]


def test_step_durations_come_out_as_data() -> None:
    """What a finished step teaches the ETA is handed out, never written into the durations."""
    durations = Durations()
    translator = Translator(file_url=file_url, durations=durations)
    plan = Plan((StepSpec("1", "KSampler", "sample"),), timing_key="wf")
    translator.register("p", plan, 0.0)
    translator.accept("p", 1, 0.0)
    translator.frame(text_frame("execution_start", prompt_id="p"), 1.0)
    translator.frame(text_frame("executing", node="1", prompt_id="p"), 1.0)
    translator.frame(text_frame("progress", value=10, max=20, node="1", prompt_id="p"), 2.0)
    out = translator.frame(text_frame("execution_success", prompt_id="p"), 3.0)
    assert out.timings == [StepTiming("wf", "1", 2.0, 20)]
    assert [e["type"] for e in plain(out)] == ["relay.step", "relay.done"]
    assert durations.step("wf", "1") is None


def test_a_prompt_handed_to_another_translator_goes_on_where_it_stopped() -> None:
    """Exported mid-run (as plain JSON) and adopted by a translator with a clock of its own (the
    relay taking over), a prompt's next events are exactly those the first translator would have
    sent: step indexes, percent, elapsed, durations and names all continue."""
    trace = load_trace("02")
    posted = next(r for r in trace.records if r["kind"] == "http" and r["path"].endswith("/prompt"))
    body, prompt_id = posted["request"]["json"], posted["body_json"]["prompt_id"]
    plan = build_plan(body["prompt"], OUTPUT_CLASSES)
    names = {
        spec.node: Localized({"en": f"step {spec.node}", "ko": f"단계 {spec.node}"}, "ko")
        for spec in plan.steps
    }
    wanted = Delivery(store=True, webhook_url="https://hooks.example.com/x", webhook_steps=True)
    plan = Plan(
        tuple(StepSpec(s.node, s.class_type, names[s.node], s.iterations) for s in plan.steps),
        plan.others,
        delivery=wanted,
    )
    frames = [
        (r["t"], wire(Frame.from_record(r)))
        for r in trace.records
        if r["kind"] == "ws_recv" and r["ws"] == "A"
    ]

    def start(translator: Translator) -> None:
        translator.register(prompt_id, plan, posted["t_sent"])
        translator.accept(prompt_id, posted["body_json"]["number"], posted["t"])

    whole = Translator(file_url=file_url)
    start(whole)
    expected = [e for now, frame in frames for e in plain(whole.frame(frame, now))]
    first, wall = Translator(file_url=file_url), 1_800_000_000.0  # wall clock = monotonic + wall
    start(first)
    before: list[dict[str, Any]] = []
    cut = 0
    for cut, (now, frame) in enumerate(frames, 1):  # noqa: B007 - cut is read after the loop
        before += plain(first.frame(frame, now))
        if sum(e["type"] == "relay.step" and e["state"] == "done" for e in before) == 2:
            break
    record = orjson.loads(orjson.dumps(first.export(prompt_id, now, now + wall)))
    second, skew = Translator(file_url=file_url), 12_345.0  # the other relay's monotonic clock
    assert second.adopt(prompt_id, record, now + skew, now + wall)
    adopted = second.plan_of(prompt_id)
    assert adopted is not None
    assert adopted.delivery == wanted  # what the prompt asked for (storage, webhook) goes along
    after = [e for later, frame in frames[cut:] for e in plain(second.frame(frame, later + skew))]
    assert before + after == expected
    assert any(e["type"] == "relay.step" and e["index"] > 2 for e in after)
    step = next(e for e in after if e["type"] == "relay.step")
    assert isinstance(step["name"], Localized)
    assert step["name"].pick("en") == f"step {step['node']}"


def test_plans_of_graphs_comfyui_will_refuse_do_not_fail() -> None:
    """Found by tests/fuzz: a link to a node the graph lacks (ComfyUI's own 400 follows) made
    planning fail with a KeyError, and the relay answered 500. Such links and inputs that are
    not an object now lead nowhere."""
    dangling = {
        "": {"class_type": "KSampler", "inputs": {}},
        "00": {"class_type": "SaveImage", "inputs": {"": ["0", None]}},
    }
    assert [s.node for s in build_plan(dangling, {"SaveImage"}).steps] == ["00"]
    assert [
        s.node for s in build_plan({"1": {"class_type": "SaveImage", "inputs": 5}}, {"SaveImage"}).steps
    ] == ["1"]
