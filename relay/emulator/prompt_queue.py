"""The prompt queue and history, as GET/POST /queue and /history show them (trace 10).

Pending prompts live in a binary heap ordered by ``(number, prompt_id)``; GET /queue returns
the raw heap array, not run order, exactly as the real server does. Deleting an item pops
it and re-heapifies. History keeps insertion order; a prompt id submitted twice keeps its
first position and the last result.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PromptQueue", "QueueItem"]


@dataclass(order=True, slots=True)
class QueueItem:
    number: float | int
    prompt_id: str
    # A tie-breaker the real server does not have: it would compare the prompt dicts and fail.
    sequence: int
    prompt: dict[str, Any] = field(compare=False)
    extra_data: dict[str, Any] = field(compare=False)
    outputs: list[str] = field(compare=False)

    def as_list(self) -> list[Any]:
        """The five-item array the server shows in /queue and /history."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    @property
    def client_id(self) -> str | None:
        value = self.extra_data.get("client_id")
        return value if isinstance(value, str) else None


class PromptQueue:
    def __init__(self, on_change: Callable[[], None], history_size: int) -> None:
        self._heap: list[QueueItem] = []
        self._running: dict[int, QueueItem] = {}
        self._history: dict[str, dict[str, Any]] = {}
        self._history_size = history_size
        self._on_change = on_change
        self._counter = 0
        self._sequence = 0
        self._ready = asyncio.Condition()

    def next_number(self, front: bool) -> int:
        """The number a POST /prompt without ``number`` gets; every parsed POST consumes one."""
        number = self._counter
        self._counter += 1
        return -number if front else number

    def new_item(
        self,
        number: float | int,
        prompt_id: str,
        prompt: dict[str, Any],
        extra_data: dict[str, Any],
        outputs: list[str],
    ) -> QueueItem:
        self._sequence += 1
        return QueueItem(number, prompt_id, self._sequence, prompt, extra_data, outputs)

    async def put(self, item: QueueItem) -> None:
        async with self._ready:
            heapq.heappush(self._heap, item)
            self._on_change()
            self._ready.notify()

    async def get(self) -> QueueItem:
        async with self._ready:
            await self._ready.wait_for(lambda: bool(self._heap))
            item = heapq.heappop(self._heap)
            self._running[item.sequence] = item
            self._on_change()
            return item

    def task_done(self, item: QueueItem, result: dict[str, Any], status: dict[str, Any]) -> None:
        self._running.pop(item.sequence, None)
        entry = {
            "prompt": item.as_list(),
            "outputs": result["outputs"],
            "status": status,
            "meta": result["meta"],
        }
        if item.prompt_id not in self._history and len(self._history) >= self._history_size:
            self._history.pop(next(iter(self._history)))
        self._history[item.prompt_id] = entry
        self._on_change()

    @property
    def remaining(self) -> int:
        return len(self._heap) + len(self._running)

    def running(self) -> list[QueueItem]:
        return list(self._running.values())

    def pending(self) -> list[QueueItem]:
        return list(self._heap)

    def snapshot(self) -> dict[str, list[list[Any]]]:
        return {
            "queue_running": [item.as_list() for item in self._running.values()],
            "queue_pending": [item.as_list() for item in self._heap],
        }

    def delete(self, prompt_id: str) -> bool:
        for index, item in enumerate(self._heap):
            if item.prompt_id == prompt_id:
                self._heap.pop(index)
                heapq.heapify(self._heap)
                self._on_change()
                return True
        return False

    def wipe(self) -> None:
        self._heap.clear()
        self._on_change()

    def history(self, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        """All history, or ``max_items`` from ``offset``; a negative offset means 'the last N'."""
        if max_items is not None and offset < 0:
            offset = len(self._history) - max_items
        out: dict[str, Any] = {}
        for index, (prompt_id, entry) in enumerate(self._history.items()):
            if index < offset:
                continue
            out[prompt_id] = entry
            if max_items is not None and len(out) >= max_items:
                break
        return out

    def history_item(self, prompt_id: str) -> dict[str, Any]:
        entry = self._history.get(prompt_id)
        return {prompt_id: entry} if entry is not None else {}

    def delete_history(self, prompt_id: str) -> None:
        self._history.pop(prompt_id, None)

    def wipe_history(self) -> None:
        self._history.clear()
