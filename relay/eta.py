"""How long steps take: learned from finished steps, kept in a file, used for ``eta``.

Durations are learned per pipeline (a workflow's name, or a fingerprint of an unknown graph's
nodes) and node id, as a moving average so that a slower or faster GPU is picked up within a
few runs. A step that reports progress (a sampler) is also learned per iteration, so a run with
more sampling steps, or one half-way through its sampler, is estimated by its iterations left.
Only time spent executing counts: the wait in ComfyUI's queue is not part of any step.

An estimate exists only when every step still to run has been seen finishing before; the
relay sends no ``eta`` rather than a guess.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

__all__ = ["Durations", "StepTime", "default_file", "durations_file"]

log = structlog.get_logger("relay.eta")

_WEIGHT = 0.4  # of the newest run in the moving average
_VERSION = 1
# Pipelines remembered; past this the one updated longest ago is forgotten (ad-hoc graphs
# each get a key of their own, and the file must not grow without end).
_MAX_PIPELINES = 256
# Between pipeline and node in the entries shared through Redis.
_SEP = "\x1f"


def default_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "comfy-relay" / "durations.json"


def durations_file(setting: str) -> Path | None:
    """RELAY_ETA_FILE as a path: "default" for the user's state folder, "" for none."""
    if setting == "default":
        return default_file()
    return Path(setting) if setting else None


@dataclass(slots=True)
class StepTime:
    seconds: float  # a whole run of the step
    per_iteration: float | None = None  # for steps that report progress
    runs: int = 1


class Durations:
    """Learned step durations, by pipeline key and node id."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._steps: dict[str, dict[str, StepTime]] = {}
        self._dirty = False
        # Steps learned here since they were last shared with the other relays (Redis).
        self._changed: set[tuple[str, str]] = set()
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("step durations not read; starting afresh", path=str(path), error=str(exc))
            return
        pipelines = data.get("pipelines") if isinstance(data, dict) else None
        for key, nodes in (pipelines or {}).items():
            if not isinstance(nodes, dict):
                continue
            for node, entry in nodes.items():
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    per = entry.get("per_iteration")
                    self._steps.setdefault(key, {})[node] = StepTime(
                        float(entry["seconds"]), float(per) if per is not None else None, int(entry["runs"])
                    )

    def record(self, key: str, node: str, seconds: float, iterations: int | None = None) -> None:
        """A step finished after ``seconds`` of running (``iterations`` of progress, if it had some)."""
        if seconds < 0:
            return
        per = seconds / iterations if iterations else None
        nodes = self._steps.pop(key, {})
        self._steps[key] = nodes  # the most recently updated pipeline goes last
        while len(self._steps) > _MAX_PIPELINES:
            del self._steps[next(iter(self._steps))]
        known = nodes.get(node)
        if known is None:
            nodes[node] = StepTime(seconds, per)
        else:
            known.seconds += _WEIGHT * (seconds - known.seconds)
            if per is not None:
                known.per_iteration = (
                    per
                    if known.per_iteration is None
                    else (known.per_iteration + _WEIGHT * (per - known.per_iteration))
                )
            known.runs += 1
        self._dirty = True
        self._changed.add((key, node))

    def take_changed(self) -> dict[str, str]:
        """The steps learned since the last call, as shared entries (``pipeline<US>node`` ->
        JSON), for the other relays."""
        changed, self._changed = self._changed, set()
        entries = {}
        for key, node in changed:
            known = self.step(key, node)
            if known is not None:
                entries[f"{key}{_SEP}{node}"] = orjson.dumps(
                    {
                        "seconds": round(known.seconds, 4),
                        "per_iteration": known.per_iteration,
                        "runs": known.runs,
                    }
                ).decode()
        return entries

    def record_changed(self, key: str, node: str) -> None:
        """Share this step again next time (sharing it failed)."""
        self._changed.add((key, node))

    def merge(self, entries: Mapping[str, str], *, skip: Iterable[str] = ()) -> int:
        """Take what the other relays learned (shared entries); ``skip`` the ones just shared
        from here. Returns how many steps changed."""
        skipped = set(skip)
        merged = 0
        for field_name, text in entries.items():
            key, sep, node = field_name.partition(_SEP)
            if not sep or field_name in skipped or (key, node) in self._changed:
                continue
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                entry = orjson.loads(text)
                per = entry.get("per_iteration")
                shared = StepTime(
                    float(entry["seconds"]), float(per) if per is not None else None, int(entry["runs"])
                )
                nodes = self._steps.setdefault(key, {})
                if nodes.get(node) != shared:
                    nodes[node] = shared
                    merged += 1
        while len(self._steps) > _MAX_PIPELINES:
            del self._steps[next(iter(self._steps))]
        if merged:
            self._dirty = True
        return merged

    def step(self, key: str, node: str) -> StepTime | None:
        return self._steps.get(key, {}).get(node)

    def remaining(
        self,
        key: str,
        pending: Iterable[tuple[str, int | None]],
        current: tuple[str, float, float, int | None] | None,
    ) -> float | None:
        """Seconds left: ``pending`` steps (node, iterations expected) and the ``current`` one
        (node, seconds it has run, its progress fraction, iterations it reported). None if any is unknown.
        """
        total = 0.0
        for node, iterations in pending:
            known = self.step(key, node)
            if known is None:
                return None
            total += known.per_iteration * iterations if iterations and known.per_iteration else known.seconds
        if current is not None:
            node, ran, fraction, iterations = current
            known = self.step(key, node)
            if known is None:
                return None
            if iterations and known.per_iteration and fraction > 0:
                left = known.per_iteration * iterations * (1 - fraction)
            else:
                left = known.seconds - ran
            total += max(0.0, left)
        return round(total, 1)

    def export(self) -> dict[str, Any] | None:
        """What was learned, as the file holds it, if anything changed since the last export.

        A plain copy: it can be written from another thread while learning goes on.
        """
        if self.path is None or not self._dirty:
            return None
        self._dirty = False
        return {
            "version": _VERSION,
            "pipelines": {
                key: {
                    node: {"seconds": round(t.seconds, 4), "per_iteration": t.per_iteration, "runs": t.runs}
                    for node, t in nodes.items()
                }
                for key, nodes in self._steps.items()
            },
        }

    def write(self, data: dict[str, Any]) -> bool:
        """Write an export atomically (blocking: call it off the event loop). False if it failed."""
        if self.path is None:
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "wb", dir=self.path.parent, delete=False, suffix=".tmp"
            ) as handle:
                handle.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
            os.replace(handle.name, self.path)
        except OSError as exc:
            log.warning("step durations not saved", path=str(self.path), error=str(exc))
            self._dirty = True  # try again at the next save
            return False
        return True

    def save(self) -> None:
        """Write what was learned, if anything changed; a failure is logged, not raised."""
        data = self.export()
        if data is not None:
            self.write(data)
