"""Runs one prompt and emits the server's messages in the server's order (PROTOCOL.md §3-5).

Per node that runs::

    progress_state(running) executing [progress_state progress preview]... [executed] progress_state(finished)

A cached output node sends ``executed`` with its cached UI, then ``progress_state``; cached
nodes that are not outputs are not visited. Progress updates send ``progress_state, progress,
preview(event 1)`` to a legacy client and ``progress_state, preview(event 4), progress`` to one
that negotiated preview metadata. The prompt ends with ``execution_success``,
``execution_error`` or ``execution_interrupted``; the worker then sends the queue ``status``
and, last, ``executing`` with ``node: null``.

Routing follows the prompt's ``client_id``: execution messages go to that socket only, and
nowhere when there is none; progress, progress_state and previews go to that socket, or to
everybody when there is none; progress text always goes to everybody.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from relay.emulator import images
from relay.emulator.cache import CachedUI, ResultCache
from relay.emulator.nodes import Catalogue, NodeEnv, Preview
from relay.emulator.prompt_queue import QueueItem
from relay.emulator.sockets import SocketHub
from relay.graph import CycleError, ExecutionList
from relay.protocol import ImageFormat, encode_preview, encode_preview_with_metadata, encode_text

__all__ = ["Executor", "Interrupted", "RunOutcome"]

_CONVERTERS: dict[str, Any] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


class Interrupted(Exception):
    """Raised inside a node when an interrupt was requested."""


@dataclass(slots=True)
class RunOutcome:
    """What the history records for a finished prompt."""

    outputs: dict[str, Any]
    meta: dict[str, Any]
    status: dict[str, Any]


@dataclass(slots=True)
class _NodeProgress:
    value: float | int = 0
    max: float | int = 1
    state: str = "pending"
    activity: str | None = None


@dataclass(slots=True)
class _Current:
    prompt_id: str
    client_id: str | None
    node: str | None = None


@dataclass(slots=True)
class _Run:
    item: QueueItem
    progress: dict[str, _NodeProgress] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    messages: list[list[Any]] = field(default_factory=list)
    visited: list[str] = field(default_factory=list)

    @property
    def prompt_id(self) -> str:
        return self.item.prompt_id

    @property
    def client_id(self) -> str | None:
        return self.item.client_id


def _now_ms() -> int:
    return int(time.time() * 1000)


def _format_input(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _exception_type(exc: BaseException) -> str:
    kind = type(exc)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


class Executor:
    def __init__(
        self,
        *,
        catalogue: Catalogue,
        env: NodeEnv,
        cache: ResultCache,
        hub: SocketHub,
        speed: float,
        reports_activity: bool = False,
        preview_method_per_prompt: bool = False,
    ) -> None:
        # Current ComfyUI tells what a running node spends its time on; 0.3.64 does not.
        self.reports_activity = reports_activity
        # Current ComfyUI takes the preview method of each prompt from its extra_data
        # ("none": no previews for that run); 0.3.64 has only the server's own setting.
        self.preview_method_per_prompt = preview_method_per_prompt
        self.catalogue = catalogue
        self.env = env
        self.cache = cache
        self.hub = hub
        self.speed = speed
        self.current: _Current | None = None
        self._interrupt = False

    # Interrupt ---------------------------------------------------------------------------

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: global, or only if ``prompt_id`` is the running prompt."""
        if prompt_id is None or (self.current is not None and self.current.prompt_id == prompt_id):
            self._interrupt = True

    def interrupt_if_running(self, prompt_id: str) -> bool:
        """Interrupt ``prompt_id`` only if it is the one running; whether it was."""
        if self.current is None or self.current.prompt_id != prompt_id:
            return False
        self._interrupt = True
        return True

    def check_interrupt(self) -> None:
        if self._interrupt:
            self._interrupt = False
            raise Interrupted

    # Messages ----------------------------------------------------------------------------

    async def _add_message(self, run: _Run, event: str, data: dict[str, Any], *, broadcast: bool) -> None:
        data = {**data, "timestamp": _now_ms()}
        run.messages.append([event, data])
        if run.client_id is not None or broadcast:
            await self.hub.send_json(event, data, run.client_id)

    async def _to_client(self, run: _Run, event: str, data: dict[str, Any]) -> None:
        if run.client_id is not None:
            await self.hub.send_json(event, data, run.client_id)

    async def _send_progress_state(self, run: _Run) -> None:
        nodes = {
            node_id: {
                "value": p.value,
                "max": p.max,
                "state": p.state,
                "node_id": node_id,
                "prompt_id": run.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
                **({"activity": p.activity} if p.activity is not None else {}),
            }
            for node_id, p in run.progress.items()
            if p.state != "pending"
        }
        await self.hub.send_json(
            "progress_state", {"prompt_id": run.prompt_id, "nodes": nodes}, run.client_id
        )

    async def _start_progress(self, run: _Run, node_id: str) -> None:
        run.progress[node_id] = _NodeProgress(0.0, 1.0, "running")
        await self._send_progress_state(run)

    async def _finish_progress(self, run: _Run, node_id: str) -> None:
        # A node never started (a cached output) finishes as the ints 1/1, as on the wire.
        entry = run.progress.setdefault(node_id, _NodeProgress())
        entry.state = "finished"
        entry.value = entry.max
        await self._send_progress_state(run)

    async def report_activity(self, run: _Run, node_id: str, activity: str | None) -> None:
        entry = run.progress.setdefault(node_id, _NodeProgress())
        if not self.reports_activity or entry.activity == activity:
            return
        entry.activity = activity
        await self._send_progress_state(run)

    async def report_progress(
        self, run: _Run, node_id: str, value: int, total: int, preview: Preview | None
    ) -> None:
        self.check_interrupt()
        previous = run.progress.get(node_id)
        run.progress[node_id] = _NodeProgress(
            value, total, "running", previous.activity if previous is not None else None
        )
        await self._send_progress_state(run)
        frame: bytes | None = None
        with_metadata = self.hub.supports_preview_metadata(run.client_id)
        if self.preview_method_per_prompt and run.item.extra_data.get("preview_method") == "none":
            preview = None
        if preview is not None:
            fmt, picture, max_size = preview
            image_format = ImageFormat.PNG if fmt == "PNG" else ImageFormat.JPEG
            picture = images.contain(picture, max_size)
            data = images.encode(
                picture, fmt, quality=images.JPEG_PREVIEW_QUALITY, compress_level=images.PNG_PREVIEW_LEVEL
            )
            if with_metadata:
                metadata = {
                    "node_id": node_id,
                    "prompt_id": run.prompt_id,
                    "display_node_id": node_id,
                    "parent_node_id": None,
                    "real_node_id": node_id,
                    "image_type": image_format.mime,
                }
                await self.hub.send_bytes(encode_preview_with_metadata(data, metadata), run.client_id)
            else:
                frame = encode_preview(data, image_format)
        progress = {"value": value, "max": total, "prompt_id": run.prompt_id, "node": node_id}
        await self.hub.send_json("progress", progress, run.client_id)
        if frame is not None:
            await self.hub.send_bytes(frame, run.client_id)

    # Execution ---------------------------------------------------------------------------

    async def execute(self, item: QueueItem) -> RunOutcome:
        run = _Run(item)
        self._interrupt = False
        self.current = _Current(item.prompt_id, item.client_id)
        try:
            success = await self._execute(run)
        finally:
            self.current = None
        ui = self.cache.ui_for(run.visited + [n for n in item.prompt if n not in run.visited])
        status = {
            "status_str": "success" if success else "error",
            "completed": success,
            "messages": run.messages,
        }
        return RunOutcome(
            outputs={node_id: entry.output for node_id, entry in ui.items()},
            meta={node_id: entry.meta for node_id, entry in ui.items()},
            status=status,
        )

    async def _execute(self, run: _Run) -> bool:
        prompt = run.item.prompt
        await self._add_message(run, "execution_start", {"prompt_id": run.prompt_id}, broadcast=False)
        self.cache.set_prompt(prompt, self.catalogue, self.env)
        cached = [node_id for node_id in prompt if self.cache.is_cached(node_id)]
        await self._add_message(
            run, "execution_cached", {"nodes": cached, "prompt_id": run.prompt_id}, broadcast=False
        )

        plan = ExecutionList(prompt, lambda node_id: self._is_output(prompt, node_id), self.cache.is_cached)
        plan.add_outputs(run.item.outputs)
        while plan:
            try:
                node_id = plan.next_node()
            except CycleError as exc:
                await self._report_error(run, plan.remaining()[0], exc, {})
                return False
            run.visited.append(node_id)
            if not await self._run_node(run, node_id):
                return False
            plan.complete(node_id)
        await self._add_message(run, "execution_success", {"prompt_id": run.prompt_id}, broadcast=False)
        return True

    def _is_output(self, prompt: dict[str, Any], node_id: str) -> bool:
        node_type = self.catalogue.get(prompt[node_id]["class_type"])
        return node_type is not None and node_type.output_node

    async def _run_node(self, run: _Run, node_id: str) -> bool:
        """Run (or replay from cache) one node; False when the prompt must stop."""
        node = run.item.prompt[node_id]
        node_type = self.catalogue.get(node["class_type"])
        assert node_type is not None
        display = {"node": node_id, "display_node": node_id}
        if self.cache.is_cached(node_id):
            replay = self.cache.ui(node_id)
            output = replay.output if replay is not None else None
            await self._to_client(run, "executed", {**display, "output": output, "prompt_id": run.prompt_id})
            await self._finish_progress(run, node_id)
            return True

        await self._start_progress(run, node_id)
        await self._to_client(run, "executing", {**display, "prompt_id": run.prompt_id})
        assert self.current is not None
        self.current.node = node_id
        inputs = self._resolve_inputs(run.item.prompt, node_id)
        context = _NodeContext(self, run, node_id)
        try:
            self.check_interrupt()
            result = await self.cache.node_object(node_id, node_type).run(context, **inputs)
        except Interrupted:
            data = {
                "prompt_id": run.prompt_id,
                "node_id": node_id,
                "node_type": node["class_type"],
                "executed": list(run.executed),
            }
            await self._add_message(run, "execution_interrupted", data, broadcast=True)
            return False
        except Exception as exc:  # a failing node is reported to the client, as the server does
            await self._report_error(run, node_id, exc, inputs)
            return False

        cached_ui: CachedUI | None = None
        if node_type.output_node and result.ui:
            meta = {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
            cached_ui = CachedUI(result.ui, meta)
            await self._to_client(
                run, "executed", {**display, "output": result.ui, "prompt_id": run.prompt_id}
            )
        self.cache.store(node_id, result.outputs, cached_ui)
        run.executed.append(node_id)
        await self._finish_progress(run, node_id)
        return True

    async def _report_error(
        self, run: _Run, node_id: str, exc: BaseException, inputs: dict[str, Any]
    ) -> None:
        data = {
            "prompt_id": run.prompt_id,
            "node_id": node_id,
            "node_type": run.item.prompt[node_id]["class_type"],
            "executed": list(run.executed),
            # The server appends a line of tips after the message; it is empty for ordinary errors.
            "exception_message": f"{exc}\n",
            "exception_type": _exception_type(exc),
            "traceback": traceback.format_tb(exc.__traceback__),
            "current_inputs": {name: [_format_input(value)] for name, value in inputs.items()},
            "current_outputs": list(run.item.prompt),
        }
        await self._add_message(run, "execution_error", data, broadcast=False)

    def _resolve_inputs(self, prompt: dict[str, Any], node_id: str) -> dict[str, Any]:
        node = prompt[node_id]
        node_type = self.catalogue.get(node["class_type"])
        assert node_type is not None
        resolved: dict[str, Any] = {}
        for name, value in node.get("inputs", {}).items():
            spec = node_type.input_spec(name)
            if spec is None:
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                upstream = self.cache.outputs(value[0])
                assert upstream is not None, f"input {name} of node {node_id} ran before its source"
                resolved[name] = upstream[value[1]]
                continue
            raw = value["__value__"] if isinstance(value, dict) and "__value__" in value else value
            convert = _CONVERTERS.get(spec.kind)
            resolved[name] = convert(raw) if convert is not None else raw
        return resolved


class _NodeContext:
    """The RunContext a node sees."""

    def __init__(self, executor: Executor, run: _Run, node_id: str) -> None:
        self._executor = executor
        self._run = run
        self.node_id = node_id
        self.prompt_id = run.prompt_id
        self.prompt = run.item.prompt
        self.env = executor.env

    async def work(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds / self._executor.speed)

    def check_interrupt(self) -> None:
        self._executor.check_interrupt()

    async def progress(self, value: int, total: int, preview: Preview | None = None) -> None:
        await self._executor.report_progress(self._run, self.node_id, value, total, preview)

    async def text(self, text: str) -> None:
        await self._executor.hub.send_bytes(encode_text(self.node_id, text), None)

    async def activity(self, activity: str | None) -> None:
        await self._executor.report_activity(self._run, self.node_id, activity)
