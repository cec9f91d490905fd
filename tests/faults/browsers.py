"""Browser tabs that reconnect by themselves, and the invariants every fault run is held to.

A :class:`Browser` behaves like the relay's own page script: when its socket ends for any
reason it opens a new one, with ``since`` and ``epoch`` from the last event it read, until the
test stops it. It keeps every frame, per connection, for :func:`check`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import websockets

__all__ = ["Browser", "Ledger", "check"]

Event = dict[str, Any]
# Sent to one socket, outside the numbered stream.
PER_CONNECTION = frozenset({"relay.hello", "relay.snapshot", "relay.error"})


class Browser:
    """One tab of ``client_id``; reconnects (resuming) whenever its socket ends."""

    def __init__(self, ws_url: str, client_id: str, *, token: str = "") -> None:
        self.ws_url = ws_url
        self.client_id = client_id
        self.token = token
        self.connections: list[list[Event]] = []
        self.closes: list[int | None] = []
        self._changed = asyncio.Event()
        self._stopping = False
        self._socket: websockets.ClientConnection | None = None
        self._task = asyncio.create_task(self._run(), name=f"browser-{client_id}")

    async def _run(self) -> None:
        since: int | None = None
        epoch: str | None = None
        while not self._stopping:
            query = f"clientId={self.client_id}"
            if since is not None:
                query += f"&since={since}&epoch={epoch}"
            if self.token:
                query += f"&token={self.token}"
            try:
                async with websockets.connect(f"{self.ws_url}?{query}", open_timeout=5, max_size=None) as ws:
                    self._socket = ws
                    events: list[Event] = []
                    self.connections.append(events)
                    async for frame in ws:
                        if not isinstance(frame, str):
                            continue
                        event = json.loads(frame)
                        events.append(event)
                        if event["type"] == "relay.hello":
                            epoch = event["epoch"]
                            if not event["resumed"]:
                                since = event["seq"]
                        elif event["type"] not in PER_CONNECTION and isinstance(event.get("seq"), int):
                            since = event["seq"]
                        self._changed.set()
                self.closes.append(ws.close_code)
            except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed):
                self.closes.append(None)
            finally:
                self._socket = None
                self._changed.set()
            if not self._stopping:
                await asyncio.sleep(0.05)  # a reconnect's pace, as a page's backoff

    @property
    def events(self) -> list[Event]:
        return [event for connection in self.connections for event in connection]

    def done(self, prompt_id: str) -> list[Event]:
        return [e for e in self.events if e["type"] == "relay.done" and e.get("prompt_id") == prompt_id]

    def resets(self) -> int:
        """Reconnections the relay could not resume (the stream started over)."""
        return sum(
            1 for c in self.connections[1:] if c and c[0]["type"] == "relay.hello" and not c[0]["resumed"]
        )

    async def until(self, predicate: Any, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def settled(self, prompt_ids: list[str], timeout: float = 90.0) -> None:
        """Every prompt has its relay.done here, or the stream was reset and the prompt is in no
        snapshot since (the relay said it does not know it any more)."""

        def ready() -> bool:
            return all(self.done(p) or self._forgotten(p) for p in prompt_ids)

        try:
            await self.until(ready, timeout)
        except TimeoutError:
            missing = [p for p in prompt_ids if not self.done(p)]
            raise AssertionError(
                f"{self.client_id}: no relay.done for {missing}; closes {self.closes}"
            ) from None

    def _forgotten(self, prompt_id: str) -> bool:
        """After the last reset (with its snapshots complete), the prompt is not active."""
        for connection in reversed(self.connections):
            if connection and connection[0]["type"] == "relay.hello" and not connection[0]["resumed"]:
                if connection is self.connections[0]:
                    return False
                later = [e for e in connection[1:] if e["type"] not in PER_CONNECTION]
                snapshots = [e for e in connection if e["type"] == "relay.snapshot"]
                if not later and self._socket is not None:
                    return False  # snapshots may still be arriving: wait for a stream event
                return all(s.get("prompt_id") != prompt_id for s in snapshots)
        return False

    async def stop(self) -> None:
        self._stopping = True
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclass
class Ledger:
    """The prompts each client submitted (and ComfyUI accepted)."""

    owners: dict[str, str] = field(default_factory=dict)

    def add(self, client_id: str, prompt_id: str) -> None:
        self.owners[prompt_id] = client_id

    def of(self, client_id: str) -> list[str]:
        return [p for p, owner in self.owners.items() if owner == client_id]


def check(browser: Browser, ledger: Ledger, *, resets_allowed: bool) -> dict[str, int]:
    """The invariants of a run, for one tab; returns counts for the run's report.

    - every event is this client's (its ``client_id``, and prompts it submitted);
    - the numbered stream has no hole and no repeat: each event follows the last one read,
      across reconnections that resumed; a reconnection that did not resume starts over;
    - every prompt of the client has exactly one ``relay.done``, or, if the stream was reset
      (allowed only in memory mode), at most one.
    """
    client = browser.client_id
    last: int | None = None
    epoch: str | None = None
    for number, connection in enumerate(browser.connections):
        if not connection:
            continue
        hello = connection[0]
        assert hello["type"] == "relay.hello", hello
        if number and hello["resumed"]:
            assert hello["epoch"] == epoch, (client, hello)
        elif number:
            assert resets_allowed, f"{client}: stream reset on reconnection {number}: {hello}"
            last = None
        epoch = hello["epoch"]
        for event in connection:
            assert event.get("client_id") in (client, None), (client, event)
            prompt_id = event.get("prompt_id")
            assert prompt_id is None or ledger.owners.get(prompt_id) == client, (client, event)
            if event["type"] in PER_CONNECTION:
                if event["type"] == "relay.hello" and not event["resumed"]:
                    last = event["seq"]
                continue
            if last is not None:
                assert event["seq"] == last + 1, (
                    f"{client}: seq {event['seq']} after {last} ({event['type']})"
                )
            last = event["seq"]
    dones = Counter(e["prompt_id"] for e in browser.events if e["type"] == "relay.done")
    for prompt_id in ledger.of(client):
        if browser.resets() and resets_allowed:
            assert dones[prompt_id] <= 1, (client, prompt_id, dones[prompt_id])
        else:
            assert dones[prompt_id] == 1, (client, prompt_id, dones[prompt_id], browser.closes)
    return {
        "dones": sum(dones.values()),
        "reconnections": len(browser.connections) - 1,
        "resets": browser.resets(),
    }
