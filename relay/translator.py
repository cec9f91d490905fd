"""ComfyUI's frames in, step-indexed relay events out: one client's translation state.

Pure: every upstream frame (text or binary, as received) and the current time go in; a
:class:`Translation` comes out, holding typed events (:mod:`relay.events`) and what the
wiring must do besides publishing them: forward the raw frame to ``events=comfy|all``
subscribers, keep a preview image, learn a step's duration. No awaits, no clocks, no sockets,
no files. Every rule about whose frame is whose lives here.

Step semantics (the contract in ``docs/events.md``):

* ``total`` is the number of nodes ComfyUI will consider for the run: the nodes feeding the
  output nodes it will execute. A node that runs without being predicted is added.
* Cached nodes count as completed from the start and take the first indexes; after them,
  ``index`` is the 1-based position in the order steps began.
* ``percent`` counts completed steps plus the running node's fraction, over ``total``.
* ``elapsed`` is measured from ``execution_start``; the wait in the queue is ``queued_for``.

Only prompts that were registered here produce events: frames about other prompts (ComfyUI
broadcasts some of them to every socket) are dropped, so no client sees another's work. A
message type the relay does not know (a newer ComfyUI's, a custom node's) produces no event;
it is named in the translation and forwarded raw when it concerns nobody's prompt or this
client's.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from relay.events import (
    Done,
    Event,
    Output,
    Preview,
    Progress,
    Queue,
    Queued,
    Snapshot,
    Started,
    Step,
    Text,
    file_refs,
    history_outcome,
)
from relay.i18n import Localized
from relay.i18n import Text as Name
from relay.protocol import BinaryEvent, ImageFormat, ProtocolError, decode_binary_frame, encode_preview

__all__ = [
    "Delivery",
    "Estimates",
    "Forward",
    "Plan",
    "PreviewImage",
    "StepSpec",
    "StepTiming",
    "Translation",
    "Translator",
    "humanize",
]


class Estimates(Protocol):
    """Learned step durations, read for ``eta`` (relay.eta.Durations)."""

    def remaining(
        self,
        key: str,
        pending: Iterable[tuple[str, int | None]],
        current: tuple[str, float, float, int | None] | None,
    ) -> float | None: ...


Phase = Literal["registered", "queued", "running", "finished"]

_FINISHED_RUNS_KEPT = 64


def humanize(class_type: str) -> str:
    """A readable name for a class type: ``VAEDecode`` -> ``VAE Decode``."""
    # Split before a capital that follows a lower-case letter, and after an acronym of two or
    # more capitals ("VAE|Decode"), but keep a single leading capital ("KSampler").
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z]{2})(?=[A-Z][a-z])", " ", class_type)
    return spaced.replace("_", " ").strip() or class_type


@dataclass(frozen=True, slots=True)
class StepSpec:
    node: str
    class_type: str
    name: Name  # a workflow's names are Localized: written in each tab's language
    iterations: int | None = None  # progress steps expected (a sampler's ``steps`` input)


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a prompt's results go besides its client's sockets (asked for at submission)."""

    store: bool = False  # its output files to S3-compatible storage
    webhook_url: str | None = None  # a URL told of its end (and steps, with webhook_steps)
    webhook_steps: bool = False

    def data(self) -> dict[str, Any]:
        return {"store": self.store, "webhook_url": self.webhook_url, "webhook_steps": self.webhook_steps}

    @classmethod
    def from_data(cls, data: Any) -> Delivery | None:
        if not isinstance(data, dict):
            return None
        url = data.get("webhook_url")
        return cls(
            data.get("store") is True,
            url if isinstance(url, str) else None,
            data.get("webhook_steps") is True,
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """The steps a prompt is expected to run, in order, and every other node of its graph."""

    steps: tuple[StepSpec, ...]
    others: Mapping[str, StepSpec] = field(default_factory=dict)
    workflow: str | None = None
    # Under which the relay learns its step durations (the workflow, or the graph's nodes).
    timing_key: str | None = None
    delivery: Delivery | None = None


@dataclass(slots=True)
class _Step:
    spec: StepSpec
    index: int | None = None
    state: str = "pending"  # pending, cached, running, done, error, interrupted
    started: float | None = None
    duration: float | None = None
    iterations: int | None = None  # as its progress reported them
    activity: str | None = None  # what the running step spends its time on ("loading")

    def public(self) -> dict[str, Any]:
        public = {
            "node": self.spec.node,
            "class_type": self.spec.class_type,
            "name": self.spec.name,
            "index": self.index,
            "state": self.state,
            "duration": self.duration,
        }
        if self.activity is not None and self.state == "running":
            public["activity"] = self.activity
        return public


@dataclass(slots=True)
class _Run:
    prompt_id: str
    plan: Plan
    registered_at: float
    steps: OrderedDict[str, _Step]
    phase: Phase = "registered"
    number: float | int | None = None
    queued_at: float | None = None
    started_at: float | None = None
    started_sent: bool = False
    next_index: int = 1
    current: str | None = None
    fraction: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    held: list[tuple[str, Any, float]] = field(default_factory=list)
    preview_version: int = 0
    status: str | None = None
    ended_at: float | None = None

    @property
    def total(self) -> int:
        return len(self.steps)

    @property
    def completed(self) -> int:
        return sum(1 for s in self.steps.values() if s.state in ("done", "cached"))

    def percent(self) -> float:
        if not self.steps:
            return 100.0 if self.phase == "finished" else 0.0
        value = (self.completed + self.fraction) / self.total * 100
        return round(min(100.0, value), 1)

    def elapsed(self, now: float) -> float:
        if self.started_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else now
        return round(max(0.0, end - self.started_at), 3)


# What a frame asks of the wiring besides publishing events -----------------------------------

Key = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Forward:
    """The frame as ComfyUI sent it, for this client's ``events=comfy|all`` subscribers."""

    payload: str | bytes
    # Frames of the same key replace one another for a subscriber that fell behind.
    key: Key | None = None
    # The event-1 form of an event-4 preview, for clients that did not negotiate metadata.
    legacy: bytes | None = None


@dataclass(frozen=True, slots=True)
class PreviewImage:
    """A live preview to keep, to be served at the URL its ``relay.preview`` names."""

    prompt_id: str
    node: str
    mime: str
    data: bytes


@dataclass(frozen=True, slots=True)
class StepTiming:
    """A step ran this long: what the ETA learns from (``iterations`` when it reported progress)."""

    timing_key: str
    node: str
    seconds: float
    iterations: int | None


@dataclass(slots=True)
class Translation:
    events: list[Event] = field(default_factory=list)
    forward: Forward | None = None
    preview: PreviewImage | None = None
    timings: list[StepTiming] = field(default_factory=list)
    # ComfyUI announced its queue (a prompt may have ended somewhere).
    queue_status: bool = False
    # The type of a JSON message this relay does not know (a newer ComfyUI, a custom node).
    unknown: str | None = None


# The JSON message types the relay understands; others pass to raw subscribers untouched.
KNOWN_MESSAGES = frozenset(
    {"status", "feature_flags", "executing", "executed", "execution_start", "execution_cached",
     "execution_success", "execution_error", "execution_interrupted", "progress", "progress_state", "logs"}
)  # fmt: skip


class Translator:
    """Per-client translation state: the prompts this client submitted through the relay."""

    def __init__(
        self,
        *,
        file_url: Callable[[Mapping[str, Any], str], str],
        preview_url: Callable[[str, str, int], str] = lambda prompt, node, version: "",
        durations: Estimates | None = None,
    ) -> None:
        self._file_url = file_url
        self._preview_url = preview_url
        # Read for ``eta``; what runs teach is handed out as StepTiming, never written here.
        self._durations = durations
        self._runs: dict[str, _Run] = {}
        self._finished: OrderedDict[str, _Run] = OrderedDict()
        self._timings: list[StepTiming] = []
        self.running: str | None = None
        self.queue_remaining: int | None = None
        self.metadata_supported = False

    def knows(self, prompt_id: str) -> bool:
        """Whether the prompt is one of this client's (running, waiting, or recently ended)."""
        return prompt_id in self._runs or prompt_id in self._finished

    def plan_of(self, prompt_id: str) -> Plan | None:
        """The plan of a prompt running, waiting, or recently ended."""
        run = self._runs.get(prompt_id) or self._finished.get(prompt_id)
        return run.plan if run is not None else None

    def current_node(self, prompt_id: str) -> str | None:
        run = self._runs.get(prompt_id)
        return run.current if run is not None else None

    def _out(self, events: list[Event], **more: Any) -> Translation:
        timings, self._timings = self._timings, []
        return Translation(events, timings=timings, **more)

    # Registration (from the relay's own POST /prompt) -------------------------------------

    def register(self, prompt_id: str, plan: Plan, now: float) -> None:
        """Know a prompt before ComfyUI does, so no event can arrive for an unknown prompt."""
        steps = OrderedDict((spec.node, _Step(spec)) for spec in plan.steps)
        self._runs[prompt_id] = _Run(prompt_id, plan, now, steps)

    def accept(
        self, prompt_id: str, number: float | int | None, now: float, plan: Plan | None = None
    ) -> Translation:
        """ComfyUI accepted the prompt: announce it, then replay frames that raced the answer."""
        run = self._runs.get(prompt_id)
        if run is None or run.phase != "registered":
            return Translation()
        if plan is not None:
            run.plan = plan
            run.steps = OrderedDict((spec.node, _Step(spec)) for spec in plan.steps)
        run.phase = "queued"
        run.number = number
        run.queued_at = now
        steps = [{"node": s.node, "class_type": s.class_type, "name": s.name} for s in run.plan.steps]
        events: list[Event] = [Queued(prompt_id, number, run.total, steps, run.plan.workflow)]
        held, run.held = run.held, []
        for kind, payload, at in held:
            events += self._dispatch(kind, payload, at)
        return self._out(events)

    def reject(self, prompt_id: str) -> None:
        """ComfyUI refused the prompt (or could not be reached): forget it, no events."""
        self._runs.pop(prompt_id, None)

    # Frames from the upstream socket -------------------------------------------------------

    def frame(self, frame: str | bytes, now: float) -> Translation:
        """One frame as ComfyUI sent it: JSON text, or a binary preview or progress text."""
        if isinstance(frame, str):
            return self._text_frame(frame, now)
        return self._binary_frame(frame, now)

    def _text_frame(self, frame: str, now: float) -> Translation:
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return Translation()
        if not isinstance(message, dict):
            return Translation()
        message_type = message.get("type")
        forward = None
        if self._is_ours(message):  # judged before the message changes what is running
            key = (message_type, None, None) if message_type in ("progress", "progress_state") else None
            forward = Forward(frame, key)
        events = self._dispatch("json", message, now)
        unknown = None if message_type in KNOWN_MESSAGES else str(message_type)[:100]
        return self._out(events, forward=forward, queue_status=message_type == "status", unknown=unknown)

    def _is_ours(self, message: Mapping[str, Any]) -> bool:
        """Whether a raw ComfyUI message may be forwarded to this client's raw subscribers."""
        message_type = message.get("type")
        if message_type == "feature_flags":
            return False  # the reply to the relay's own negotiation
        if message_type == "status":
            return True  # queue size only, no content
        data = message.get("data")
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        if prompt_id is None:
            if message_type not in KNOWN_MESSAGES:
                return True  # news for every socket (asset scans...): nobody's prompt in it
            return message_type == "executing" and self.running is not None
        return self.knows(str(prompt_id))

    def _binary_frame(self, frame: bytes, now: float) -> Translation:
        try:
            decoded = decode_binary_frame(frame)
        except ProtocolError:
            return Translation()
        if decoded.event is BinaryEvent.TEXT:
            # ComfyUI sends progress text to every socket: ours only while our prompt runs.
            if self.running is None:
                return Translation()
            events = self._dispatch("text", (decoded.node_id, decoded.text), now)
            return self._out(events, forward=Forward(frame))
        metadata = decoded.metadata or {}
        with_metadata = decoded.event is BinaryEvent.PREVIEW_IMAGE_WITH_METADATA
        prompt_id = metadata.get("prompt_id") if with_metadata else None
        if prompt_id is None:
            # A legacy preview: ours only if our prompt runs and the server has no metadata.
            if self.metadata_supported or self.running is None:
                return Translation()
            prompt_id = self.running
        if not isinstance(prompt_id, str) or not self.knows(prompt_id):
            return Translation()
        node = str(metadata.get("node_id") or self.current_node(prompt_id) or "")
        legacy = None
        if with_metadata:
            with contextlib.suppress(ProtocolError):
                legacy = encode_preview(decoded.image, ImageFormat.from_mime(decoded.mime))
        events = self._dispatch("preview", (prompt_id, node, decoded.mime), now)
        return self._out(
            events,
            forward=Forward(frame, ("preview", prompt_id, node), legacy),
            preview=PreviewImage(prompt_id, node, decoded.mime, decoded.image),
        )

    def _dispatch(self, kind: str, payload: Any, now: float) -> list[Event]:
        prompt_id = self._prompt_of(kind, payload)
        if prompt_id is None:
            return self._global(kind, payload)
        run = self._runs.get(prompt_id)
        if run is None:
            return []
        if run.phase == "registered":
            # ComfyUI ran faster than it answered the POST: hold frames until it has. A held
            # start already makes the prompt the running one, so frames without a prompt id
            # (progress text, reconnect replays) are attributed, and held, in order too.
            run.held.append((kind, payload, now))
            if kind == "json" and payload.get("type") == "execution_start":
                self.running = run.prompt_id
            return []
        if kind == "text":
            node, text = payload
            return [Text(run.prompt_id, node, text)]
        if kind == "preview":
            _, node, mime = payload
            run.preview_version += 1
            node = node or run.current
            url = self._preview_url(run.prompt_id, node or "", run.preview_version)
            return [Preview(run.prompt_id, node, mime, url, run.preview_version)]
        return self._message(run, payload, now)

    def _prompt_of(self, kind: str, payload: Any) -> str | None:
        if kind == "text":
            return self.running
        if kind == "preview":
            prompt_id: Any = payload[0]
            return prompt_id if isinstance(prompt_id, str) else None
        data = payload.get("data")
        if not isinstance(data, dict):
            return None
        prompt_id = data.get("prompt_id")
        if prompt_id is None and payload.get("type") == "executing" and data.get("node") is not None:
            return self.running  # the replay a reconnecting socket gets: no prompt_id
        return prompt_id if isinstance(prompt_id, str) else None

    def _global(self, kind: str, payload: Any) -> list[Event]:
        if kind != "json":
            return []
        message_type, data = payload.get("type"), payload.get("data")
        if not isinstance(data, dict):
            return []
        if message_type == "feature_flags":
            self.metadata_supported = bool(data.get("supports_preview_metadata"))
        elif message_type == "status":
            try:
                remaining = int(data["status"]["exec_info"]["queue_remaining"])
            except (KeyError, TypeError, ValueError):
                return []
            if remaining != self.queue_remaining:
                self.queue_remaining = remaining
                return [Queue(remaining)]
        return []

    def _message(self, run: _Run, message: Mapping[str, Any], now: float) -> list[Event]:
        message_type = message.get("type")
        data: dict[str, Any] = message["data"]
        if run.phase == "finished":
            return []
        if message_type == "execution_start":
            run.phase = "running"
            run.started_at = now
            self.running = run.prompt_id
            return []
        if message_type == "execution_cached":
            nodes = data.get("nodes")
            cached = [str(n) for n in nodes] if isinstance(nodes, list) else []
            return self._started(run, cached, now)
        if message_type == "executing":
            node = data.get("node")
            if node is None:
                return self._ended_without_result(run, now)
            return self._executing(run, str(node), now)
        if message_type == "progress":
            return self._progress(run, data, now)
        if message_type == "progress_state":
            nodes = data.get("nodes")
            events: list[Event] = []
            if isinstance(nodes, dict):
                for node, entry in nodes.items():
                    if not isinstance(entry, dict):
                        continue
                    if entry.get("state") == "finished":
                        events += self._finish_step(run, str(node), now)
                    elif entry.get("state") == "running":
                        events += self._activity(run, str(node), entry.get("activity"), now)
            return events
        if message_type == "executed":
            return self._executed(run, data, now)
        if message_type == "execution_success":
            events = self._finish_step(run, run.current, now) if run.current else []
            run.fraction = 0.0
            return events + self._done(run, "success", now)
        if message_type == "execution_error":
            return self._failed(run, data, now)
        if message_type == "execution_interrupted":
            node = data.get("node_id")
            step = run.steps.get(str(node)) if node is not None else None
            if step is not None and step.state == "running":
                step.state = "interrupted"
                step.duration = round(now - (step.started or now), 3)
            run.fraction = 0.0
            error = {
                "node": node,
                "class_type": data.get("node_type"),
                "exception_type": None,
                "message": "interrupted",
            }
            return self._done(run, "interrupted", now, error=error)
        return []

    # Transitions ---------------------------------------------------------------------------

    def _started(self, run: _Run, cached_nodes: list[str], now: float) -> list[Event]:
        if run.started_sent:
            return []
        if run.started_at is None:
            run.started_at = now
            run.phase = "running"
            self.running = run.prompt_id
        cached_set = set(cached_nodes)
        cached = [node for node in run.steps if node in cached_set]
        for node in cached:
            step = run.steps[node]
            step.state = "cached"
            step.index = run.next_index
            step.duration = 0.0
            run.next_index += 1
        run.started_sent = True
        queued_for = round(max(0.0, (run.started_at or now) - (run.queued_at or run.registered_at)), 3)
        return [Started(run.prompt_id, run.total, cached, run.completed, queued_for, self._eta(run, now))]

    def _step_for(self, run: _Run, node: str) -> _Step:
        step = run.steps.get(node)
        if step is None:
            # A node that runs without being predicted (an expansion, or unknown output classes).
            spec = run.plan.others.get(node) or StepSpec(node, "unknown", f"node {node}")
            step = run.steps[node] = _Step(spec)
        return step

    def _executing(self, run: _Run, node: str, now: float) -> list[Event]:
        events = [] if run.started_sent else self._started(run, [], now)
        if run.current == node and run.steps.get(node) is not None and run.steps[node].state == "running":
            return events  # the replay after a reconnect repeats the running node
        if run.current is not None:
            events += self._finish_step(run, run.current, now)
        step = self._step_for(run, node)
        if step.state not in ("pending",):
            return events
        step.state = "running"
        step.index = run.next_index
        step.started = now
        run.next_index += 1
        run.current = node
        run.fraction = 0.0
        events.append(self._step_event(run, step, now))
        return events

    def _finish_step(self, run: _Run, node: str | None, now: float) -> list[Event]:
        if node is None:
            return []
        step = run.steps.get(node)
        if step is None or step.state != "running":
            return []
        step.state = "done"
        step.duration = round(now - (step.started or now), 3)
        if run.plan.timing_key is not None:
            iterations = step.iterations if step.iterations and step.iterations > 1 else None
            self._timings.append(StepTiming(run.plan.timing_key, node, step.duration, iterations))
        if run.current == node:
            run.current = None
            run.fraction = 0.0
        return [self._step_event(run, step, now)]

    def _activity(self, run: _Run, node: str, activity: Any, now: float) -> list[Event]:
        """A running step's activity changed (current ComfyUI): announce the step again with it."""
        step = run.steps.get(node)
        activity = activity if isinstance(activity, str) and activity else None
        if step is None or step.state != "running" or step.activity == activity:
            return []
        step.activity = activity
        return [self._step_event(run, step, now)]

    def _progress(self, run: _Run, data: Mapping[str, Any], now: float) -> list[Event]:
        node = data.get("node")
        value, maximum = data.get("value"), data.get("max")
        if node is None or not isinstance(value, (int, float)) or not isinstance(maximum, (int, float)):
            return []
        events: list[Event] = []
        node = str(node)
        step = run.steps.get(node)
        if step is None or step.state == "pending":
            events += self._executing(run, node, now)
            step = run.steps[node]
        if step.state != "running":
            return events
        run.fraction = max(0.0, min(1.0, value / maximum)) if maximum > 0 else 0.0
        step.iterations = int(maximum)
        events.append(
            Progress(
                run.prompt_id,
                node,
                step.index,
                run.total,
                value,
                maximum,
                run.percent(),
                run.elapsed(now),
                self._eta(run, now),
            )
        )
        return events

    def _executed(self, run: _Run, data: Mapping[str, Any], now: float) -> list[Event]:
        node = data.get("node")
        if node is None:
            return []
        node = str(node)
        output = data.get("output")
        run.outputs[node] = output
        return [Output(run.prompt_id, node, output, self._files(output, run.prompt_id))]

    def _failed(self, run: _Run, data: Mapping[str, Any], now: float) -> list[Event]:
        node = data.get("node_id")
        events: list[Event] = []
        step = run.steps.get(str(node)) if node is not None else None
        if step is not None and step.state in ("running", "pending"):
            if step.state == "pending":
                step.index = run.next_index
                run.next_index += 1
            step.state = "error"
            step.duration = round(now - (step.started or now), 3)
            events.append(self._step_event(run, step, now))
        run.fraction = 0.0
        message = data.get("exception_message")
        error = {
            "node": node,
            "class_type": data.get("node_type"),
            "exception_type": data.get("exception_type"),
            "message": message.strip() if isinstance(message, str) else message,
        }
        return events + self._done(run, "error", now, error=error)

    def _ended_without_result(self, run: _Run, now: float) -> list[Event]:
        """``executing`` with ``node: null`` normally follows the result; alone, it is one."""
        if run.phase != "running":
            return []
        events = self._finish_step(run, run.current, now)
        return events + self._done(run, "success", now)

    def _done(
        self,
        run: _Run,
        status: str,
        now: float,
        *,
        error: dict[str, Any] | None = None,
        recovered: bool = False,
    ) -> list[Event]:
        run.phase = "finished"
        run.status = status
        run.ended_at = now
        if self.running == run.prompt_id:
            self.running = None
        percent = 100.0 if status == "success" else run.percent()
        done = Done(
            run.prompt_id,
            status,
            run.elapsed(now),
            run.total,
            run.completed,
            percent,
            run.outputs,
            recovered,
            error,
        )
        self._retire(run)
        return [done]

    def _retire(self, run: _Run) -> None:
        self._runs.pop(run.prompt_id, None)
        self._finished[run.prompt_id] = run
        while len(self._finished) > _FINISHED_RUNS_KEPT:
            self._finished.popitem(last=False)

    # Recovery after a lost connection ----------------------------------------------------

    def active(self) -> list[str]:
        """Prompts accepted by ComfyUI that have not ended (what a reconnect must reconcile)."""
        return [pid for pid, run in self._runs.items() if run.phase in ("queued", "running")]

    def recover(self, prompt_id: str, history: Mapping[str, Any], now: float) -> Translation:
        """Close a prompt from its /history entry: it finished while we were not listening."""
        run = self._runs.get(prompt_id)
        if run is None or run.phase not in ("queued", "running"):
            return Translation()
        events: list[Event] = []
        outputs = history.get("outputs")
        if isinstance(outputs, dict):
            for node, output in outputs.items():
                if node not in run.outputs:
                    run.outputs[node] = output
                    events.append(Output(run.prompt_id, node, output, self._files(output, run.prompt_id)))
        status, error = history_outcome(history)
        failed_node = error.get("node") if error is not None else None
        self._settle(run, "done" if status == "success" else status, failed_node)
        return self._out(events + self._done(run, status, now, error=error, recovered=True))

    def lost(self, prompt_id: str, reason: str, now: float) -> Translation:
        """ComfyUI no longer knows the prompt (it restarted): say so, never leave it open."""
        run = self._runs.get(prompt_id)
        if run is None or run.phase not in ("queued", "running"):
            return Translation()
        error = {"node": None, "class_type": None, "exception_type": "PromptLost", "message": reason}
        return self._out(self._done(run, "error", now, error=error, recovered=True))

    def cancelled(self, prompt_id: str, now: float) -> Translation:
        """The prompt was removed from ComfyUI's queue before it started: it ends ``cancelled``."""
        run = self._runs.get(prompt_id)
        if run is None or run.phase != "queued":
            return Translation()
        error = {"node": None, "class_type": None, "exception_type": None,
                 "message": "removed from ComfyUI's queue before it ran"}  # fmt: skip
        return self._out(self._done(run, "cancelled", now, error=error))

    def queued(self) -> list[str]:
        """Prompts accepted and waiting in ComfyUI's queue (not started)."""
        return [pid for pid, run in self._runs.items() if run.phase == "queued"]

    def _settle(self, run: _Run, state: str, failed_node: Any) -> None:
        """After a recovery: steps we never saw end are completed, or the failure marked."""
        for node, step in run.steps.items():
            if failed_node is not None and node == str(failed_node):
                step.state = state
            elif state == "done" and step.state in ("pending", "running"):
                step.state = "done"
        run.fraction = 0.0
        run.current = None

    # Handing a prompt to another relay -----------------------------------------------------

    def export(self, prompt_id: str, now: float, wall: float) -> dict[str, Any] | None:
        """A prompt in flight as plain data, for another relay to :meth:`adopt` (times as wall
        clock: ``now`` is this clock's time at the wall-clock time ``wall``)."""
        run = self._runs.get(prompt_id)
        if run is None or run.phase not in ("queued", "running"):
            return None

        def at(moment: float | None) -> float | None:
            return None if moment is None else round(wall - (now - moment), 3)

        return {
            "plan": _plan_data(run.plan),
            "phase": run.phase,
            "number": run.number,
            "registered_at": at(run.registered_at),
            "queued_at": at(run.queued_at),
            "started_at": at(run.started_at),
            "started_sent": run.started_sent,
            "next_index": run.next_index,
            "current": run.current,
            "outputs": run.outputs,
            "preview_version": run.preview_version,
            "steps": [
                [step.spec.node, step.index, step.state, at(step.started), step.duration, step.iterations]
                for step in run.steps.values()
            ],
        }

    def adopt(self, prompt_id: str, data: Mapping[str, Any], now: float, wall: float) -> bool:
        """Take over a prompt another relay was following (see :meth:`export`); False when the
        data is unusable. Its next events continue where the other relay's stopped."""
        if prompt_id in self._runs:
            return True
        try:
            plan = _plan_from(data["plan"])

            def at(moment: Any) -> float | None:
                return None if moment is None else now - (wall - float(moment))

            steps: OrderedDict[str, _Step] = OrderedDict()
            specs = {spec.node: spec for spec in plan.steps} | dict(plan.others)
            for node, index, state, started, duration, iterations in data["steps"]:
                spec = specs.get(node) or StepSpec(node, "unknown", f"node {node}")
                steps[node] = _Step(spec, index, state, at(started), duration, iterations)
            run = _Run(prompt_id, plan, at(data["registered_at"]) or now, steps)
            run.phase = data["phase"]
            run.number = data.get("number")
            run.queued_at = at(data.get("queued_at"))
            run.started_at = at(data.get("started_at"))
            run.started_sent = bool(data.get("started_sent"))
            run.next_index = int(data["next_index"])
            run.current = data.get("current")
            run.outputs = dict(data.get("outputs") or {})
            run.preview_version = int(data.get("preview_version") or 0)
        except (KeyError, TypeError, ValueError):
            return False
        if run.phase not in ("queued", "running"):
            return False
        self._runs[prompt_id] = run
        if run.phase == "running":
            self.running = prompt_id
        return True

    # Snapshots -------------------------------------------------------------------------

    def snapshot(self, prompt_id: str, now: float) -> Snapshot | None:
        """The current state of a prompt, for a client that could not resume from the buffer."""
        run = self._runs.get(prompt_id) or self._finished.get(prompt_id)
        if run is None:
            return None
        return Snapshot(
            run.prompt_id,
            run.phase,
            run.status,
            run.number,
            run.total,
            run.completed,
            run.percent(),
            run.elapsed(now),
            run.current,
            [step.public() for step in run.steps.values()],
            run.outputs,
        )

    # Helpers --------------------------------------------------------------------------

    def _step_event(self, run: _Run, step: _Step, now: float) -> Step:
        return Step(
            run.prompt_id,
            step.spec.node,
            step.spec.class_type,
            step.spec.name,
            step.index,
            run.total,
            step.state,
            run.elapsed(now),
            run.percent(),
            step.duration if step.state in ("done", "error") else None,
            self._eta(run, now) if step.state in ("running", "done") else None,
            step.activity if step.state == "running" else None,
        )

    def _eta(self, run: _Run, now: float) -> float | None:
        """Seconds left when every step still to run has a learned duration, else None."""
        if self._durations is None or run.plan.timing_key is None:
            return None
        pending = [(s.spec.node, s.spec.iterations) for s in run.steps.values() if s.state == "pending"]
        current = None
        step = run.steps.get(run.current) if run.current is not None else None
        if step is not None and step.state == "running":
            ran = now - (step.started if step.started is not None else now)
            current = (step.spec.node, ran, run.fraction, step.iterations or step.spec.iterations)
        return self._durations.remaining(run.plan.timing_key, pending, current)

    def _files(self, output: Any, prompt_id: str) -> list[dict[str, Any]]:
        return [
            {**ref, "kind": kind, "url": self._file_url(ref, prompt_id)} for kind, ref in file_refs(output)
        ]


def _name_data(name: Name) -> Any:
    return {"texts": name.texts, "default": name.default} if isinstance(name, Localized) else name


def _name_from(data: Any) -> Name:
    return Localized(data["texts"], data["default"]) if isinstance(data, dict) else str(data)


def _spec_data(spec: StepSpec) -> list[Any]:
    return [spec.node, spec.class_type, _name_data(spec.name), spec.iterations]


def _spec_from(data: list[Any]) -> StepSpec:
    node, class_type, name, iterations = data
    return StepSpec(str(node), str(class_type), _name_from(name), iterations)


def _plan_data(plan: Plan) -> dict[str, Any]:
    return {
        "steps": [_spec_data(spec) for spec in plan.steps],
        "others": [_spec_data(spec) for spec in plan.others.values()],
        "workflow": plan.workflow,
        "timing_key": plan.timing_key,
        "delivery": plan.delivery.data() if plan.delivery is not None else None,
    }


def _plan_from(data: Mapping[str, Any]) -> Plan:
    others = {spec.node: spec for spec in map(_spec_from, data["others"])}
    delivery = Delivery.from_data(data.get("delivery"))
    return Plan(
        tuple(map(_spec_from, data["steps"])), others, data.get("workflow"), data.get("timing_key"), delivery
    )
