"""The relay's public event vocabulary: what a client reads on ``/ws``, as typed values.

One frozen dataclass per event type, its fields in the order they are written; one encoder
(:func:`envelope`) that gives every event the same envelope, ``type, seq, ts, client_id``,
followed by its fields. ``docs/events.md`` is the contract in prose; this module is the same
contract in code, and the only relay module a client (``comfy-relay submit``) depends on.

Fields listed in an event's ``optional`` are left out when they are None (``eta`` when the
relay has no estimate, ``duration`` on a running step, ``error`` on success); every other
field is always present, None included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Detached",
    "Done",
    "Error",
    "Event",
    "Hello",
    "Output",
    "Preview",
    "Progress",
    "Queue",
    "Queued",
    "Snapshot",
    "Started",
    "Step",
    "Stored",
    "Text",
    "Upstream",
    "envelope",
    "fields",
    "file_refs",
    "history_outcome",
]


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every relay event."""

    type: ClassVar[str]
    # Fields left out when None.
    optional: ClassVar[frozenset[str]] = frozenset()
    # Only the newest one per (type, prompt, node) matters to a client that fell behind.
    coalesces: ClassVar[bool] = False


# Connection ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Event):
    type = "relay.hello"
    upstream: str
    resumed: bool
    version: str
    epoch: str
    assigned: bool
    missed: int | None


@dataclass(frozen=True, slots=True)
class Error(Event):
    type = "relay.error"
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Upstream(Event):
    type = "relay.upstream"
    optional = frozenset({"backend"})
    state: str
    attempt: int
    reason: str | None
    # With several ComfyUI backends: which one this socket goes to.
    backend: str | None = None


@dataclass(frozen=True, slots=True)
class Queue(Event):
    type = "relay.queue"
    coalesces = True
    remaining: int


# A prompt's run --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Queued(Event):
    type = "relay.queued"
    optional = frozenset({"workflow", "backend"})
    prompt_id: str
    number: float | int | None
    total: int
    steps: list[dict[str, Any]]
    workflow: str | None = None
    # With several ComfyUI backends: the one the prompt went to.
    backend: str | None = None


@dataclass(frozen=True, slots=True)
class Started(Event):
    type = "relay.started"
    optional = frozenset({"eta"})
    prompt_id: str
    total: int
    cached: list[str]
    completed: int
    queued_for: float
    eta: float | None = None


@dataclass(frozen=True, slots=True)
class Step(Event):
    type = "relay.step"
    optional = frozenset({"duration", "eta", "activity"})
    prompt_id: str
    node: str
    class_type: str
    name: Any  # str, or i18n.Localized: written in each tab's language
    index: int | None
    total: int
    state: str  # running, done, error
    elapsed: float
    percent: float
    duration: float | None = None
    eta: float | None = None
    # What a running step spends its time on, when ComfyUI says ("loading"). A running step
    # is announced again whenever it changes; without the field it is doing nothing special.
    activity: str | None = None


@dataclass(frozen=True, slots=True)
class Progress(Event):
    type = "relay.progress"
    optional = frozenset({"eta"})
    coalesces = True
    prompt_id: str
    node: str
    index: int | None
    total: int
    value: float | int
    max: float | int
    percent: float
    elapsed: float
    eta: float | None = None


@dataclass(frozen=True, slots=True)
class Preview(Event):
    type = "relay.preview"
    coalesces = True
    prompt_id: str
    node: str | None
    mime: str
    url: str
    version: int


@dataclass(frozen=True, slots=True)
class Text(Event):
    type = "relay.text"
    prompt_id: str
    node: str
    text: str


@dataclass(frozen=True, slots=True)
class Output(Event):
    type = "relay.output"
    prompt_id: str
    node: str
    output: Any
    files: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Detached(Event):
    type = "relay.detached"
    prompt_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Done(Event):
    type = "relay.done"
    optional = frozenset({"error", "storage"})
    prompt_id: str
    status: str  # success, error, interrupted, cancelled
    elapsed: float
    total: int
    completed: int
    percent: float
    outputs: dict[str, Any]
    recovered: bool
    error: dict[str, Any] | None = None
    # When the prompt's files go to storage: {"state": "storing", "bucket", "files": [{node,
    # filename, kind, key, url, expires}]}, each then told by a relay.stored (the URL works once
    # it has). Storing never holds this back.
    storage: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Stored(Event):
    """One output file of an ended prompt, copied to storage (``stored``) or given up on
    (``failed``, with the error); ``remaining`` of the prompt's files are still on their way."""

    type = "relay.stored"
    optional = frozenset({"url", "expires", "size", "content_type", "error"})
    prompt_id: str
    node: str
    filename: str
    kind: str
    key: str
    state: str  # stored, failed
    attempts: int
    remaining: int
    url: str | None = None  # presigned GET, valid until ``expires`` (Unix seconds)
    expires: float | None = None
    size: int | None = None
    content_type: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot(Event):
    type = "relay.snapshot"
    prompt_id: str
    phase: str
    status: str | None
    number: float | int | None
    total: int
    completed: int
    percent: float
    elapsed: float
    current: str | None
    steps: list[dict[str, Any]]
    outputs: dict[str, Any]


# The encoder -----------------------------------------------------------------------------

_NAMES: dict[type[Event], tuple[str, ...]] = {}


def fields(event: Event) -> dict[str, Any]:
    """The event's fields, in contract order, optional ones left out when None (no ``type``)."""
    kind = type(event)
    names = _NAMES.get(kind)
    if names is None:
        names = _NAMES[kind] = tuple(f.name for f in dataclasses.fields(kind))
    omit = kind.optional
    return {name: value for name in names if (value := getattr(event, name)) is not None or name not in omit}


def envelope(event: Event, *, seq: int, ts: float, client_id: str) -> dict[str, Any]:
    """The event as a client reads it: ``type``, ``seq``, ``ts``, ``client_id``, then its fields."""
    return {"type": event.type, "seq": seq, "ts": ts, "client_id": client_id, **fields(event)}


# Files in outputs, and results read from ComfyUI's history ------------------------------


# UI keys whose lists hold files ({filename, subfolder, type}), as output nodes report them:
# the files of a ``relay.output`` and of ``relay.done`` outputs.
OUTPUT_FILE_KEYS = ("images", "gifs", "video", "videos", "audio", "files", "meshes", "3d")


def file_refs(output: Any) -> list[tuple[str, dict[str, str]]]:
    """``(kind, {filename, subfolder, type})`` for each file in one node's UI output."""
    if not isinstance(output, dict):
        return []
    refs = []
    for kind in OUTPUT_FILE_KEYS:
        entries = output.get(kind)
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("filename"), str):
                ref = {
                    "filename": entry["filename"],
                    "subfolder": str(entry.get("subfolder", "")),
                    "type": str(entry.get("type", "output")),
                }
                refs.append((kind, ref))
    return refs


def history_outcome(entry: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """How a finished prompt ended, from its ``/history`` entry, in ``relay.done`` terms.

    Returns ``(status, error)``: ``status`` is ``success``, ``error`` or ``interrupted``;
    ``error`` is the ``relay.done`` error object (None on success), read from the terminal
    message ComfyUI kept. The relay ends recovered prompts with it, and a client that lost the
    relay reads a result the same way.
    """
    status_info = entry.get("status")
    messages = status_info.get("messages") if isinstance(status_info, dict) else None
    terminal = {m[0]: m[1] for m in messages or [] if isinstance(m, list) and len(m) == 2}
    if isinstance(terminal.get("execution_error"), dict):
        data = terminal["execution_error"]
        message = data.get("exception_message")
        return "error", {
            "node": data.get("node_id"),
            "class_type": data.get("node_type"),
            "exception_type": data.get("exception_type"),
            "message": message.strip() if isinstance(message, str) else message,
        }
    if isinstance(terminal.get("execution_interrupted"), dict):
        data = terminal["execution_interrupted"]
        error = {"node": data.get("node_id"), "class_type": data.get("node_type"), "exception_type": None,
                 "message": "interrupted"}  # fmt: skip
        return "interrupted", error
    return "success", None
