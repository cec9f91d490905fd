"""Liveness and readiness, for probes that ask every few seconds.

``/healthz`` only says the process answers. ``/readyz`` says whether this relay should be
sent traffic: it is not shutting down, it has room for more sockets, and ComfyUI answers.
ComfyUI is asked with its cheapest request (``GET /prompt``: the queue size) at most once a
second however many probes and load balancers ask; concurrent probes share one request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from relay.comfy import ComfyClient
from relay.errors import RelayError
from relay.metrics import Metrics

__all__ = ["ComfyCheck", "Readiness"]

# How long one answer from ComfyUI stands for all probes.
_FRESH_FOR = 1.0


@dataclass(frozen=True, slots=True)
class ComfyCheck:
    reachable: bool
    at: float
    latency: float
    queue_remaining: int | None = None
    problem: str | None = None

    def public(self) -> dict[str, Any]:
        body: dict[str, Any] = {"reachable": self.reachable, "latency_ms": round(self.latency * 1000, 1)}
        if self.queue_remaining is not None:
            body["queue_remaining"] = self.queue_remaining
        if self.problem is not None:
            body["problem"] = self.problem
        return body


class Readiness:
    def __init__(self, comfy: ComfyClient, metrics: Metrics, *, timeout: float) -> None:
        self._comfy = comfy
        self._metrics = metrics
        self._timeout = timeout
        self._last: ComfyCheck | None = None
        self._pending: asyncio.Future[ComfyCheck] | None = None

    async def comfyui(self) -> ComfyCheck:
        """ComfyUI's state, asked afresh only when the last answer is over a second old."""
        last = self._last
        if last is not None and time.monotonic() - last.at < _FRESH_FOR:
            return last
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._ask())
        pending = self._pending
        try:
            # shield: a probe that gives up does not cancel the check others wait on.
            return await asyncio.shield(pending)
        finally:
            if pending.done() and self._pending is pending:
                self._pending = None

    async def _ask(self) -> ComfyCheck:
        started = time.monotonic()
        problem: str | None = None
        remaining: int | None = None
        try:
            answer = await self._comfy.request("GET", "/prompt", timeout=self._timeout)
            if answer.status != 200:
                problem = f"ComfyUI answered GET /prompt with HTTP {answer.status}"
            else:
                body = answer.json()
                info = body.get("exec_info") if isinstance(body, dict) else None
                value = info.get("queue_remaining") if isinstance(info, dict) else None
                remaining = value if isinstance(value, int) else None
        except RelayError as exc:
            problem = exc.message
        except ValueError:
            problem = "ComfyUI answered GET /prompt with something other than JSON"
        now = time.monotonic()
        check = ComfyCheck(problem is None, now, now - started, remaining, problem)
        self._metrics.comfyui_up.set(1 if check.reachable else 0)
        self._last = check
        return check
