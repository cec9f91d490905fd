"""The translator, fed the recorded traces as plain data (no server, no sockets, no clock)."""

from __future__ import annotations

import json
from typing import Any

from relay.plans import build_plan
from relay.protocol import BinaryEvent
from relay.translator import Plan, StepSpec, Translator, humanize
from tests.tracekit import TRACES, Frame, load_trace

OUTPUT_CLASSES = {
    name for name, info in json.loads((TRACES / "13-endpoints.object_info.json").read_text()).items()
    if info["output_node"]
} | {"NoUIOutput"}  # fmt: skip


def file_url(ref: Any) -> str:
    return f"/view?filename={ref['filename']}&type={ref['type']}"


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
            events += translator.accept(prompt_id, record["body_json"]["number"], now)
        elif record["kind"] == "ws_recv" and record["ws"] == ws:
            frame = Frame.from_record(record)
            if frame.message is not None:
                events += translator.feed(frame.message, now)
            elif frame.event == BinaryEvent.TEXT:
                events += translator.text(frame.node_id or "", frame.text or "", now)
            else:
                prompt_id = (frame.metadata or {}).get("prompt_id")
                node = (frame.metadata or {}).get("node_id")
                events += translator.preview(prompt_id, node, "image/jpeg", "/previews/x", now)
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
    translator.feed({"type": "execution_start", "data": {"prompt_id": "p"}}, 1.0)
    translator.feed({"type": "execution_cached", "data": {"nodes": ["1"], "prompt_id": "p"}}, 1.0)
    first = translator.feed({"type": "executing", "data": {"node": "2", "prompt_id": "p"}}, 1.1)
    assert [e["state"] for e in first] == ["running"]
    # The socket dropped and came back: the server repeats the running node, without prompt_id.
    assert translator.feed({"type": "executing", "data": {"node": "2"}}, 5.0) == []
    progress = translator.feed(
        {"type": "progress", "data": {"value": 7, "max": 15, "node": "2", "prompt_id": "p"}}, 5.1
    )
    assert progress[0]["index"] == 2


def test_frames_racing_the_post_answer_wait_for_it() -> None:
    """Events that arrive before ComfyUI answered the POST come out after relay.queued, in order."""
    translator = Translator(file_url=file_url)
    translator.register("p", Plan((StepSpec("1", "SaveImage", "save"),)), 0.0)
    assert translator.feed({"type": "execution_start", "data": {"prompt_id": "p"}}, 0.1) == []
    assert translator.feed({"type": "execution_cached", "data": {"nodes": [], "prompt_id": "p"}}, 0.1) == []
    events = translator.accept("p", 3, 0.2)
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
    recovered = translator.recover("ok", history_ok, 3.0)
    assert [e["type"] for e in recovered] == ["relay.output", "relay.done"]
    assert recovered[-1]["recovered"] is True
    assert recovered[-1]["status"] == "success"
    failed = translator.recover("bad", history_bad, 3.0)
    assert failed[-1]["status"] == "error"
    assert failed[-1]["error"]["exception_type"] == "RuntimeError"
    lost = translator.lost("gone", "ComfyUI restarted", 3.0)
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
        assert translator.feed(message, 0.1) == []
    assert translator.text("2", "step 1/3", 0.2) == []
    events = translator.accept("p", 1, 0.3)
    assert [e["type"] for e in events] == ["relay.queued", "relay.started", "relay.step", "relay.text"]
    assert events[-1]["text"] == "step 1/3"
