"""Client side of the contract tests: real WebSocket and HTTP clients that record everything.

A :class:`Session` plays a recorded scenario against a server: it opens labelled sockets
(``A``, ``B``, ``S``...) like the recorder did, submits the recorded graphs over HTTP and
waits for messages, so the frames each socket received can be compared with the trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from tests.tracekit import Frame, token

__all__ = ["RecordingSocket", "Session", "is_done", "of_type", "open_session"]

Predicate = Callable[[Frame], bool]


class RecordingSocket:
    """A client socket whose received frames are recorded by a background reader."""

    def __init__(self, label: str, connection: ClientConnection) -> None:
        self.label = label
        self.connection = connection
        self.frames: list[Frame] = []
        self._arrived = asyncio.Event()
        self.closed: asyncio.Event = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name=f"reader-{label}")

    async def _read(self) -> None:
        try:
            async for payload in self.connection:
                self.frames.append(Frame.from_wire(payload))
                self._arrived.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._arrived.set()

    def tokens(self) -> list[str]:
        return [token(f) for f in self.frames]

    def count(self, predicate: Predicate) -> int:
        return sum(1 for f in self.frames if predicate(f))

    async def wait_for(self, predicate: Predicate, *, count: int = 1, timeout: float = 15.0) -> Frame:
        """Wait until ``count`` received frames match ``predicate``; return the last one."""
        async with asyncio.timeout(timeout):
            while True:
                matching = [f for f in self.frames if predicate(f)]
                if len(matching) >= count:
                    return matching[count - 1]
                if self.closed.is_set():
                    raise AssertionError(f"socket {self.label} closed while waiting; got {self.tokens()}")
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_done(self, prompt_id: str, timeout: float = 15.0) -> None:
        """Wait for the prompt's final ``executing`` with ``node: null``."""
        await self.wait_for(lambda f: is_done(f, prompt_id), timeout=timeout)

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(message))

    async def close(self) -> None:
        await self.connection.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def is_done(frame: Frame, prompt_id: str) -> bool:
    return (
        frame.type == "executing"
        and frame.data.get("node") is None
        and frame.data.get("prompt_id") == prompt_id
    )


def of_type(kind: str, prompt_id: str | None = None) -> Predicate:
    def predicate(frame: Frame) -> bool:
        if frame.type != kind:
            return False
        return prompt_id is None or (
            isinstance(frame.data, dict) and frame.data.get("prompt_id") == prompt_id
        )

    return predicate


class Session:
    """Sockets and an HTTP client against one server."""

    def __init__(self, base_url: str, http: httpx.AsyncClient) -> None:
        self.base_url = base_url
        self.http = http
        self.sockets: dict[str, RecordingSocket] = {}

    @property
    def ws_base(self) -> str:
        return "ws" + self.base_url.removeprefix("http")

    async def connect(
        self,
        label: str,
        client_id: str | None = None,
        *,
        path: str = "/ws",
        feature_flags: bool = False,
        headers: dict[str, str] | None = None,
        compression: str | None = "deflate",
    ) -> RecordingSocket:
        url = self.ws_base + path + (f"?clientId={client_id}" if client_id else "")
        connection = await websockets.connect(
            url, max_size=None, additional_headers=headers, compression=compression
        )
        socket = RecordingSocket(label, connection)
        self.sockets[label] = socket
        if feature_flags:
            # What the bundled frontend sends as its first message.
            await socket.send_json(
                {
                    "type": "feature_flags",
                    "data": {"supports_preview_metadata": True, "supports_manager_v4_ui": True},
                }
            )
        await socket.wait_for(lambda f: f.type == "status" and "sid" in f.data)
        return socket

    async def submit(self, prompt: dict[str, Any], client_id: str | None = None, **fields: Any) -> str:
        body: dict[str, Any] = {"prompt": prompt, **fields}
        if client_id is not None:
            body["client_id"] = client_id
        response = await self.http.post("/prompt", json=body)
        assert response.status_code == 200, response.text
        prompt_id: str = response.json()["prompt_id"]
        return prompt_id

    async def wait_idle(self, timeout: float = 15.0) -> None:
        """Poll /queue until nothing is running or pending."""
        async with asyncio.timeout(timeout):
            while True:
                state = (await self.http.get("/queue")).json()
                if not state["queue_running"] and not state["queue_pending"]:
                    return
                await asyncio.sleep(0.01)

    async def wait_running(self, timeout: float = 15.0) -> None:
        """Poll /queue until a prompt is running."""
        async with asyncio.timeout(timeout):
            while not (await self.http.get("/queue")).json()["queue_running"]:
                await asyncio.sleep(0.005)

    async def wait_history(self, prompt_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """Poll /history/{id} until the prompt has finished; return its entry."""
        async with asyncio.timeout(timeout):
            while True:
                body = (await self.http.get(f"/history/{prompt_id}")).json()
                if body:
                    entry: dict[str, Any] = body[prompt_id]
                    return entry
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        for socket in self.sockets.values():
            await socket.close()


@contextlib.asynccontextmanager
async def open_session(base_url: str) -> AsyncIterator[Session]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        session = Session(base_url, http)
        try:
            yield session
        finally:
            await session.close()
