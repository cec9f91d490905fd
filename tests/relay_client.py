"""A test client for the relay's /ws: records every event and raw frame it receives."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

__all__ = ["Tab", "open_tab"]

Event = dict[str, Any]


def first_running(steps: Iterable[Event]) -> list[Event]:
    """Each step's first ``running`` event: a step announced again for its activity
    ("loading", on current ComfyUI) is the same step, not a new one."""
    seen: set[tuple[Any, Any]] = set()
    first = []
    for event in steps:
        key = (event.get("prompt_id"), event["node"])
        if event["type"] == "relay.step" and event["state"] == "running" and key not in seen:
            seen.add(key)
            first.append(event)
    return first


class Tab:
    """One browser tab's socket to the relay."""

    def __init__(self, connection: ClientConnection, *, read: bool = True) -> None:
        self.connection = connection
        self.events: list[Event] = []
        self.raw: list[str | bytes] = []
        self.close_code: int | None = None
        self._arrived = asyncio.Event()
        self.closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read()) if read else None

    async def _read(self) -> None:
        try:
            async for frame in self.connection:
                self.raw.append(frame)
                if isinstance(frame, str):
                    message = json.loads(frame)
                    if isinstance(message.get("type"), str) and message["type"].startswith("relay."):
                        self.events.append(message)
                self._arrived.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.connection.close_code
            self.closed.set()
            self._arrived.set()

    def started(self, prompt_id: str) -> list[Event]:
        """Each step's first ``running`` event (see :func:`first_running`)."""
        return first_running(self.of("relay.step", prompt_id))

    def of(self, event_type: str, prompt_id: str | None = None) -> list[Event]:
        return [
            e
            for e in self.events
            if e["type"] == event_type and (prompt_id is None or e.get("prompt_id") == prompt_id)
        ]

    async def wait_for(
        self, predicate: Callable[[Event], bool], *, count: int = 1, timeout: float = 20.0
    ) -> Event:
        async with asyncio.timeout(timeout):
            while True:
                matching = [e for e in self.events if predicate(e)]
                if len(matching) >= count:
                    return matching[count - 1]
                if self.closed.is_set():
                    raise AssertionError(
                        f"socket closed ({self.close_code}) while waiting; got {self.kinds()}"
                    )
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_raw(
        self, predicate: Callable[[str | bytes], bool], *, timeout: float = 20.0
    ) -> str | bytes:
        """The first frame as received (any kind, ComfyUI's raw ones too) that ``predicate`` likes."""
        async with asyncio.timeout(timeout):
            while True:
                for frame in self.raw:
                    if predicate(frame):
                        return frame
                if self.closed.is_set():
                    raise AssertionError(f"socket closed ({self.close_code}) while waiting for a frame")
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_type(self, event_type: str, prompt_id: str | None = None, **kwargs: Any) -> Event:
        return await self.wait_for(
            lambda e: e["type"] == event_type and (prompt_id is None or e.get("prompt_id") == prompt_id),
            **kwargs,
        )

    async def wait_done(self, prompt_id: str, timeout: float = 20.0) -> Event:
        return await self.wait_type("relay.done", prompt_id, timeout=timeout)

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def close(self) -> None:
        await self.connection.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def open_tab(relay_ws_url: str, query: str = "", *, read: bool = True, **kwargs: Any) -> Tab:
    url = relay_ws_url + (f"?{query}" if query else "")
    connection = await websockets.connect(url, max_size=None, **kwargs)
    return Tab(connection, read=read)
