"""Reading the recorded ComfyUI traces and comparing message sequences with them.

A trace (``shared/comfyui/traces/NN-name.jsonl``) is one JSON record per line: WebSocket
frames received and sent (``ws_recv``/``ws_send``), connects and closes, HTTP exchanges and
notes. This module turns frames into short tokens (``executing(2)``, ``BIN1(JPEG)``,
``progress_state{1:f,2:r}``) so that whole sequences compare at a glance, normalises ids,
timestamps and file counters, and reduces JSON values to their shapes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from relay.protocol import BinaryEvent, decode_binary_frame

__all__ = [
    "TRACES",
    "Frame",
    "Trace",
    "binary_facts",
    "fold_progress",
    "load_trace",
    "long_graph",
    "normalize",
    "shape",
    "split_status",
    "token",
]


def _traces_dir() -> Path:
    override = os.environ.get("COMFY_TRACES")
    if override:
        return Path(override)
    # CI clones the repository with the shared folder beside it.
    return Path(__file__).resolve().parents[2] / "shared" / "comfyui" / "traces"


TRACES = _traces_dir()


@dataclass(frozen=True, slots=True)
class Frame:
    """A received WebSocket frame: a JSON message, or a binary frame's header facts."""

    message: dict[str, Any] | None = None
    event: int | None = None
    second: int | None = None
    metadata: dict[str, Any] | None = None
    node_id: str | None = None
    text: str | None = None
    image_format: str | None = None
    image_size: tuple[int, int] | None = None
    length: int = 0

    @property
    def type(self) -> str:
        return self.message["type"] if self.message is not None else f"BIN{self.event}"

    @property
    def data(self) -> Any:
        return self.message["data"] if self.message is not None else None

    @classmethod
    def from_wire(cls, payload: str | bytes) -> Frame:
        if isinstance(payload, str):
            return cls(message=json.loads(payload), length=len(payload))
        decoded = decode_binary_frame(payload)
        second = int.from_bytes(payload[4:8], "big")
        fmt = None
        if decoded.event is BinaryEvent.PREVIEW_IMAGE:
            fmt = "JPEG" if decoded.mime == "image/jpeg" else "PNG"
        size = None
        if decoded.image:
            with Image.open(io.BytesIO(decoded.image)) as picture:
                size = picture.size
        return cls(
            event=int(decoded.event),
            second=second,
            metadata=decoded.metadata,
            node_id=decoded.node_id or None,
            text=decoded.text or None,
            image_format=fmt,
            image_size=size,
            length=len(payload),
        )

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Frame:
        if "json" in record:
            return cls(message=record["json"], length=record.get("frame_len", 0))
        binary = record["binary_frame"]
        decoded = binary.get("decoded", {})
        fmt = decoded.get("pil_format") if binary["first_u32_be"] == 1 else None
        return cls(
            event=binary["first_u32_be"],
            second=binary["second_u32_be"],
            metadata=decoded.get("metadata"),
            node_id=decoded.get("node_id"),
            text=decoded.get("text"),
            image_format=fmt,
            image_size=tuple(decoded["size"]) if "size" in decoded else None,
            length=binary["length"],
        )


def token(frame: Frame) -> str:
    """A short, comparable name for a frame."""
    if frame.message is None:
        if frame.event == 1:
            return f"BIN1({frame.image_format})"
        if frame.event == 4:
            image_type = (frame.metadata or {}).get("image_type", "?")
            return f"BIN4({image_type})"
        return f"TEXT({frame.node_id})"
    kind, data = frame.type, frame.data
    if kind == "status":
        suffix = "+sid" if "sid" in data else ""
        return f"status[{data['status']['exec_info']['queue_remaining']}]{suffix}"
    if kind == "executing":
        node = data.get("node")
        replay = "" if "prompt_id" in data else "!"  # the reconnect replay has no prompt_id
        return f"executing({'null' if node is None else node}){replay}"
    if kind == "executed":
        return f"executed({data['node']})"
    if kind == "progress":
        return f"progress({data['node']} {data['value']}/{data['max']})"
    if kind == "progress_state":
        states = ",".join(f"{node}:{entry['state'][0]}" for node, entry in data["nodes"].items())
        return f"progress_state{{{states}}}"
    if kind == "execution_cached":
        return f"execution_cached[{','.join(data['nodes'])}]"
    return kind


def binary_facts(frame: Frame) -> tuple[Any, ...]:
    """What must match between two binary frames: layout, format, size, metadata keys, text."""
    keys = tuple(frame.metadata) if frame.metadata is not None else None
    return (frame.event, frame.image_format, frame.image_size, keys, frame.node_id, frame.text)


def split_status(tokens: Iterable[str]) -> tuple[list[str], list[str]]:
    """Separate queue ``status`` broadcasts (whose position depends on timing) from the rest."""
    rest, statuses = [], []
    for item in tokens:
        (statuses if item.startswith("status[") else rest).append(item)
    return rest, statuses


def fold_progress(tokens: Iterable[str]) -> list[str]:
    """Collapse each run of progress updates into one ``progress*`` token.

    An update is a ``progress_state`` directly followed by ``progress`` or an event-4 preview,
    the ``progress`` itself, and preview and text frames. For scenarios where the number of
    updates depends on timing (an interrupt lands after however many steps fit before it).
    Apply ``split_status`` first: a status broadcast in the middle would split a run.
    """
    items = list(tokens)
    out: list[str] = []
    for index, item in enumerate(items):
        following = items[index + 1] if index + 1 < len(items) else ""
        update = item.startswith(("progress(", "BIN", "TEXT(")) or (
            item.startswith("progress_state") and following.startswith(("progress(", "BIN4"))
        )
        if not update:
            out.append(item)
        elif not out or out[-1] != "progress*":
            out.append("progress*")
    return out


@dataclass
class Trace:
    name: str
    records: list[dict[str, Any]]

    def sockets(self) -> list[str]:
        return sorted({r["ws"] for r in self.records if r["kind"] == "ws_recv"})

    def frames(self, ws: str) -> list[Frame]:
        return [Frame.from_record(r) for r in self.records if r["kind"] == "ws_recv" and r["ws"] == ws]

    def tokens(self, ws: str) -> list[str]:
        return [token(f) for f in self.frames(ws)]

    def http(self, method: str | None = None, path: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["kind"] == "http"
            and (method is None or r["method"] == method)
            and (path is None or r["path"] == path)
        ]

    def notes(self) -> list[str]:
        return [r["text"] for r in self.records if r["kind"] == "note"]

    def records_of(self, kind: str) -> Iterator[dict[str, Any]]:
        return (r for r in self.records if r["kind"] == kind)

    def workflow(self, variant: str | None = None) -> dict[str, Any]:
        suffix = f".{variant}" if variant else ""
        return json.loads((TRACES / f"{self.name}{suffix}.workflow.json").read_text())

    def binframe(self, n: int) -> bytes:
        return (TRACES / f"{self.name}.binframe{n}.bin").read_bytes()


def long_graph() -> dict[str, Any]:
    """The interrupt trace's graph with a sampler of 500 steps: a prompt that is still running
    when a test, on however busy a machine, gets round to interrupting it."""
    graph: dict[str, Any] = load_trace("04").workflow()
    graph["2"]["inputs"]["steps"] = 500
    return graph


def load_trace(prefix: str) -> Trace:
    """Load ``NN-*.jsonl`` by its scenario number or full name (``"02b"``, ``"02b-progress..."``)."""
    if not TRACES.is_dir():
        raise FileNotFoundError(
            f"recorded traces not found at {TRACES}; put the shared folder beside the repository "
            "or set COMFY_TRACES to the traces folder"
        )
    matches = sorted(TRACES.glob(f"{prefix}-*.jsonl")) or sorted(TRACES.glob(f"{prefix}.jsonl"))
    if len(matches) != 1:
        raise FileNotFoundError(f"no single trace for {prefix!r}: {matches}")
    path = matches[0]
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return Trace(path.name.removesuffix(".jsonl"), records)


def shape(value: Any) -> Any:
    """The structure of a JSON value: key sets and element types, not values.

    Ints and floats stay distinct: the server sends ``0.0/1.0`` and ``1/1`` in different places.
    """
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        shapes: list[Any] = []
        for item in value:
            s = shape(item)
            if s not in shapes:
                shapes.append(s)
        return shapes
    if value is None:
        return "null"
    return type(value).__name__


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_COUNTER = re.compile(r"_\d{5}_\.")
_TEMP = re.compile(r"ComfyUI_temp_[a-z]{5}_")


def normalize(value: Any, *, drop: frozenset[str] = frozenset({"timestamp", "traceback"})) -> Any:
    """Replace ids, timestamps, file counters and tracebacks so two runs compare equal."""
    if isinstance(value, dict):
        return {k: "<dropped>" if k in drop else normalize(v, drop=drop) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v, drop=drop) for v in value]
    if isinstance(value, str):
        value = _UUID.sub("<uuid>", value)
        value = _COUNTER.sub("_N_.", value)
        return _TEMP.sub("ComfyUI_temp_xxxxx_", value)
    return value


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
