"""Serving an ASGI app with uvicorn inside the current event loop (tests, the demo).

The socket is bound here, so port 0 picks a free port and a restart can take the same port
again while old connections linger in TIME_WAIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette

__all__ = ["InLoopServer"]

# Builds the app and its server for the port that was bound.
Build = Callable[[int], tuple[Starlette, uvicorn.Server]]


class InLoopServer:
    def __init__(self, host: str, port: int, build: Build, *, name: str) -> None:
        self.host = host
        self.port = port
        self.app: Starlette | None = None
        self._build = build
        self._name = name
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.app, self._server = self._build(self.port)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=self._name)
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError(f"{self._name} stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = None
        self._task = None
