"""Showing one prompt's relay events in a terminal (``comfy-relay submit --watch``).

Pure: events in, text out, no sockets and no clock (redraws are paced by the events' own
``ts``). :class:`RunView` keeps where the run stands; a renderer turns each event into
output. :class:`PlainRenderer` writes one line per step, in the ``[ 3/16] name (elapsed 2.8 s)``
form teams already print to their logs, for pipes and log files; :class:`LiveRenderer` keeps
finished steps as lines and redraws a two-line status (current step with its sampler bar, the
whole run's bar with percent and ETA) below them, for an interactive terminal.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO
from urllib.parse import urlencode, urljoin

from relay.events import file_refs

__all__ = [
    "LiveRenderer",
    "PlainRenderer",
    "Renderer",
    "RunView",
    "bar",
    "display_width",
    "duration",
    "fit",
    "output_files",
]

Event = dict[str, Any]

# ANSI control sequences for the live display.
_CLEAR_LINE = "\r\x1b[2K"
_UP = "\x1b[1A"
_HIDE_CURSOR = "\x1b[?25l"
_SHOW_CURSOR = "\x1b[?25h"

# Seconds between two redraws for progress alone; step changes redraw at once.
_REDRAW_EVERY = 0.1


# Text measurement ---------------------------------------------------------------------------


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    if char == "\ufe0f":  # emoji presentation selector: its base is drawn two cells wide
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Terminal cells ``text`` takes: Hangul and emoji take two, combining marks none."""
    width = 0
    previous = 0
    for char in text:
        if char == "\ufe0f" and previous == 1:
            width += 1  # "⚙" + VS16 is drawn as a two-cell emoji
        cell = _char_width(char)
        width += cell
        previous = cell
    return width


def fit(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` cells, with an ellipsis when something was cut."""
    if display_width(text) <= width:
        return text
    kept: list[str] = []
    used = 0
    for char in text:
        cell = _char_width(char)
        if used + cell > width - 1:
            break
        kept.append(char)
        used += cell
    return "".join(kept) + "…"


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))


def bar(fraction: float, width: int) -> str:
    """A bar of ``width`` cells filled to ``fraction`` (0-1), in eighths of a cell."""
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[part] if part and full < width else ""
    return "█" * full + partial + "░" * (width - full - len(partial))


def duration(seconds: float) -> str:
    """``2.8 s``, ``1 m 05 s``, ``1 h 02 m``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} m {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} m"


def output_files(outputs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The files in a prompt's outputs (node id -> UI output), each with its ``/view`` path."""
    return [
        {**ref, "kind": kind, "url": "/view?" + urlencode(ref)}
        for output in outputs.values()
        for kind, ref in file_refs(output)
    ]


# The run's state ----------------------------------------------------------------------------


@dataclass(slots=True)
class StepView:
    node: str
    name: str
    index: int | None = None
    state: str = "pending"  # pending, running, done, error, cached
    duration: float | None = None
    activity: str | None = None  # what it spends its time on while running ("loading")


@dataclass(slots=True)
class RunView:
    """Where one prompt stands, from its relay events (and snapshots after a lost socket)."""

    prompt_id: str
    total: int | None = None
    phase: str = "submitted"  # submitted, queued, running, done
    steps: dict[str, StepView] = field(default_factory=dict)
    current: str | None = None
    reannounced: bool = False
    value: int | None = None
    maximum: int | None = None
    percent: float = 0.0
    elapsed: float = 0.0
    eta: float | None = None
    queue: int | None = None
    status: str | None = None
    error: Mapping[str, Any] | None = None
    recovered: bool = False
    files: list[dict[str, Any]] = field(default_factory=list)
    # Files relay.done said go to storage, and what became of each (its relay.stored).
    storing: list[dict[str, Any]] = field(default_factory=list)
    stored: list[Event] = field(default_factory=list)

    def apply(self, event: Event) -> bool:
        """Take in an event; False when it is not about this prompt (or not shown)."""
        if self.phase == "done":
            # A second account of the end (the relay's and the history's) changes nothing;
            # where the files were stored is news.
            news = event.get("type") == "relay.stored" and event.get("prompt_id") == self.prompt_id
            if news and all(s.get("key") != event.get("key") for s in self.stored):
                self.stored.append(event)
                return True
            return False
        kind = event.get("type")
        if kind == "relay.queue":
            self.queue = event.get("remaining")
            return self.phase in ("submitted", "queued")
        if event.get("prompt_id") != self.prompt_id:
            return False
        handler = _HANDLERS.get(str(kind))
        if handler is None:
            return False
        handler(self, event)
        return True

    @property
    def finished(self) -> bool:
        """Ended, and every file it sent to storage accounted for."""
        return self.phase == "done" and not self.storing_left

    @property
    def storing_left(self) -> int:
        return max(0, len(self.storing) - len(self.stored))

    def step(self, node: Any) -> StepView:
        key = str(node)
        found = self.steps.get(key)
        if found is None:
            found = self.steps[key] = StepView(key, key)
        return found

    def _queued(self, event: Event) -> None:
        self.total = event.get("total", self.total)
        for spec in event.get("steps") or ():
            self.step(spec["node"]).name = str(spec.get("name") or spec["node"])
        if self.phase == "submitted":
            self.phase = "queued"

    def _started(self, event: Event) -> None:
        self.phase = "running"
        self.total = event.get("total", self.total)
        # Cached steps take the first indexes, in the order the event lists them.
        for index, node in enumerate(event.get("cached") or (), start=1):
            step = self.step(node)
            step.state, step.index, step.duration = "cached", index, 0.0
        self._timing(event)

    def _step(self, event: Event) -> None:
        self.phase = "running"
        step = self.step(event["node"])
        # A running step announced again: only its activity changed.
        self.reannounced = step.state == "running" and event.get("state") == "running"
        step.activity = event.get("activity") if event.get("state") == "running" else None
        step.name = str(event.get("name") or step.name)
        step.index = event.get("index", step.index)
        step.state = str(event.get("state", step.state))
        self.total = event.get("total", self.total)
        if step.state == "running":
            self.current, self.value, self.maximum = step.node, None, None
        else:
            step.duration = event.get("duration", step.duration)
            if self.current == step.node:
                self.current = None
        self._timing(event)

    def _progress(self, event: Event) -> None:
        self.current = str(event["node"])
        self.value, self.maximum = event.get("value"), event.get("max")
        self._timing(event)

    def _output(self, event: Event) -> None:
        known = {f["url"] for f in self.files}
        self.files.extend(f for f in event.get("files") or () if f.get("url") not in known)

    def _done(self, event: Event) -> None:
        self.phase = "done"
        self.status = event.get("status")
        self.error = event.get("error")
        self.recovered = bool(event.get("recovered"))
        self.current = None
        self._timing(event)
        if not self.files:
            self.files = output_files(event.get("outputs") or {})
        storage = event.get("storage")
        if isinstance(storage, dict) and isinstance(storage.get("files"), list):
            self.storing = [f for f in storage["files"] if isinstance(f, dict)]

    def _snapshot(self, event: Event) -> None:
        self.phase = str(event.get("phase") or self.phase)
        self.total = event.get("total", self.total)
        for spec in event.get("steps") or ():
            step = self.step(spec["node"])
            step.name = str(spec.get("name") or step.name)
            step.index, step.state, step.duration = spec.get("index"), spec["state"], spec.get("duration")
        self.current = event.get("current")
        self.value = self.maximum = None
        self.eta = None
        self.percent = float(event.get("percent") or 0.0)
        self.elapsed = float(event.get("elapsed") or 0.0)
        self.files = output_files(event.get("outputs") or {})

    def _timing(self, event: Event) -> None:
        if "percent" in event:
            self.percent = float(event["percent"])
        if "elapsed" in event:
            self.elapsed = float(event["elapsed"])
        self.eta = event.get("eta")

    def label(self, step: StepView) -> str:
        """``[ 3/16] name``, the index padded to the width of the total."""
        total = self.total if self.total is not None else len(self.steps)
        digits = len(str(total))
        index = "?" if step.index is None else str(step.index)
        return f"[{index:>{digits}}/{total}] {step.name}"

    def failed_step(self) -> StepView | None:
        node = (self.error or {}).get("node")
        if node is not None and str(node) in self.steps:
            return self.steps[str(node)]
        return next((s for s in self.steps.values() if s.state == "error"), None)


_HANDLERS: dict[str, Callable[[RunView, Event], None]] = {
    "relay.queued": RunView._queued,
    "relay.started": RunView._started,
    "relay.step": RunView._step,
    "relay.progress": RunView._progress,
    "relay.output": RunView._output,
    "relay.done": RunView._done,
    "relay.snapshot": RunView._snapshot,
}


# Rendering ----------------------------------------------------------------------------------


class Renderer(Protocol):
    view: RunView

    def event(self, event: Event) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


def _timing_text(view: RunView) -> str:
    parts = [f"{view.percent:.1f}%", duration(view.elapsed)]
    if view.eta is not None:
        parts.append(f"eta {duration(view.eta)}")
    return "  ".join(parts)


def _stored_line(event: Event) -> str:
    """One stored file: its presigned URL, or why it is not stored."""
    if event.get("state") == "stored":
        return f"stored: {event.get('url')}"
    return f"not stored: {event.get('key')} ({event.get('error')})"


def _ending(view: RunView, base_url: str) -> list[str]:
    """The lines that close a run: its status, what failed, and the output files' URLs."""
    lines: list[str] = []
    recovered = " (learned after reconnecting)" if view.recovered else ""
    if view.status == "success":
        lines.append(f"✓ done in {duration(view.elapsed)}{recovered}")
    else:
        failed = view.failed_step()
        where = f" at {view.label(failed)}" if failed is not None else ""
        word = {"interrupted": "interrupted", "cancelled": "cancelled"}.get(str(view.status), "failed")
        lines.append(f"✗ {word}{where} after {duration(view.elapsed)}{recovered}")
        error = view.error or {}
        if error.get("exception_type") or error.get("message"):
            message = str(error.get("message") or "").strip()
            lines.append(f"  {error.get('exception_type') or 'error'}: {message}".rstrip(": "))
    lines.extend(f"output: {urljoin(base_url, file['url'])}" for file in view.files)
    if view.storing:
        count = len(view.storing)
        lines.append(f"… storing {count} file{'s' if count != 1 else ''} in the bucket")
    return lines


class PlainRenderer:
    """One line per step start (and per quarter of a sampler's progress): for pipes and logs."""

    def __init__(self, view: RunView, out: TextIO, *, base_url: str) -> None:
        self.view = view
        self._out = out
        self._base_url = base_url
        self._quarter: dict[str, int] = {}
        self._announced_queue = False

    def _line(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def note(self, text: str) -> None:
        self._line(text)

    def event(self, event: Event) -> None:
        view = self.view
        if not view.apply(event):
            return
        kind = event["type"]
        if kind == "relay.queued":
            self._line(f"queued: {view.total} steps (prompt {view.prompt_id})")
        elif kind == "relay.queue" and view.phase == "queued" and (view.queue or 0) > 1:
            if not self._announced_queue:  # once: later changes of the count are not news enough
                self._announced_queue = True
                self._line(f"waiting in ComfyUI's queue ({view.queue} prompts queued or running)")
        elif kind == "relay.started":
            cached = [s for s in view.steps.values() if s.state == "cached"]
            waited = event.get("queued_for")
            self._line(
                "started"
                + (f" after {duration(waited)} in the queue" if waited else "")
                + (f"; {len(cached)} steps cached" if cached else "")
            )
        elif kind == "relay.step":
            self._step(event)
        elif kind == "relay.progress":
            self._progress(event)
        elif kind == "relay.snapshot":
            self._line(f"now: {view.phase}, {view.percent:.1f}% after {duration(view.elapsed)}")
        elif kind == "relay.done":
            for line in _ending(view, self._base_url):
                self._line(line)
        elif kind == "relay.stored":
            self._line(_stored_line(event))

    def _step(self, event: Event) -> None:
        view = self.view
        step = view.step(event["node"])
        if step.state == "running" and view.reannounced:
            return  # only its activity changed: one line per step here; the live view shows it
        if step.state == "running":
            eta = f", eta {duration(view.eta)}" if view.eta is not None else ""
            self._line(f"{view.label(step)} (elapsed {duration(view.elapsed)}, {view.percent:.1f}%{eta})")
        elif step.state == "error":
            self._line(f"{view.label(step)} failed after {duration(step.duration or 0.0)}")

    def _progress(self, event: Event) -> None:
        view = self.view
        value, maximum = view.value, view.maximum
        if not isinstance(value, int) or not isinstance(maximum, int) or maximum <= 0:
            return
        quarter = value * 4 // maximum
        node = str(event["node"])
        if quarter <= self._quarter.get(node, 0):
            return
        self._quarter[node] = quarter
        eta = f"  eta {duration(view.eta)}" if view.eta is not None else ""
        digits = len(str(maximum))
        count = f"{value:>{digits}}/{maximum}"
        self._line(f"        {bar(value / maximum, 20)} {count}  {view.percent:.1f}%{eta}")

    def close(self) -> None:
        self._out.flush()


class LiveRenderer:
    """Finished steps as lines, and a status redrawn in place below them: for a terminal."""

    def __init__(self, view: RunView, out: TextIO, *, base_url: str, columns: int = 80) -> None:
        self.view = view
        self._out = out
        self._base_url = base_url
        self._columns = max(40, columns)
        self._drawn = 0  # status lines on screen
        self._last_draw: float | None = None
        self._printed: set[str] = set()
        self._out.write(_HIDE_CURSOR)

    def note(self, text: str) -> None:
        self._emit([text])

    def event(self, event: Event) -> None:
        view = self.view
        if not view.apply(event):
            return
        kind = event["type"]
        lines: list[str] = []
        if kind in ("relay.step", "relay.snapshot", "relay.done", "relay.started"):
            lines = self._settled()
        if kind == "relay.done":
            lines += _ending(view, self._base_url)
            self._emit(lines, status=False)
            return
        if kind == "relay.stored":
            self._emit([_stored_line(event)], status=False)
            return
        now = event.get("ts")
        if not isinstance(now, (int, float)):
            now = None
        paced = not lines and kind in ("relay.progress", "relay.queue")
        recent = now is not None and self._last_draw is not None and now - self._last_draw < _REDRAW_EVERY
        if paced and recent:
            return
        if now is not None:
            self._last_draw = now
        self._emit(lines)

    def _settled(self) -> list[str]:
        """Lines for steps that ended (or were served from cache) and are not on screen yet."""
        lines = []
        ended = [s for s in self.view.steps.values() if s.state in ("done", "error", "cached")]
        for step in sorted(ended, key=lambda s: (s.index is None, s.index or 0)):
            if step.node in self._printed:
                continue
            self._printed.add(step.node)
            if step.state == "cached":
                lines.append(fit(f"· {self.view.label(step)}  cached", self._columns - 1))
                continue
            mark = "✓" if step.state == "done" else "✗"
            took = duration(step.duration) if step.duration is not None else ""
            label = fit(f"{mark} {self.view.label(step)}", self._columns - 12)
            lines.append(f"{_pad(label, self._columns - 12)} {took:>10}".rstrip())
        return lines

    def _status(self) -> list[str]:
        view = self.view
        width = self._columns - 1
        if view.phase in ("submitted", "queued"):
            waiting = f" ({view.queue} in ComfyUI's queue)" if view.queue else ""
            return [fit(f"… waiting to start{waiting}", width)]
        step = view.steps.get(view.current) if view.current is not None else None
        first = "▶ …"
        if step is not None:
            first = f"▶ {view.label(step)}" + (f" ({step.activity})" if step.activity else "")
            if isinstance(view.value, int) and isinstance(view.maximum, int) and view.maximum > 0:
                digits = len(str(view.maximum))
                sampler = f"  {bar(view.value / view.maximum, 12)} {view.value:>{digits}}/{view.maximum}"
                first = fit(first, width - display_width(sampler)) + sampler
        timing = _timing_text(view)
        overall = max(10, width - display_width(timing) - 3)
        return [fit(first, width), fit(f"  {bar(view.percent / 100, overall - 2)} {timing}", width)]

    def _emit(self, lines: list[str], *, status: bool = True) -> None:
        """Clear the status, print ``lines`` for good, draw the status again below them."""
        out = self._out
        if self._drawn:
            out.write(_CLEAR_LINE + (_UP + _CLEAR_LINE) * (self._drawn - 1))
        for line in lines:
            out.write(line + "\n")
        self._drawn = 0
        if status:
            current = self._status()
            out.write("\n".join(current))
            self._drawn = len(current)
        out.flush()

    def close(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._drawn = 0
        self._out.write(_SHOW_CURSOR)
        self._out.flush()
