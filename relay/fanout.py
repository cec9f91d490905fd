"""Fan-out of one client's events to all of its browser tabs.

Publishing never awaits a subscriber: an event is serialized once, appended to the client's
ring buffer (for resuming), and offered to every subscriber's bounded queue with a
synchronous call. Each subscriber has its own writer task. When a subscriber falls behind,
queued progress and previews of the same node are replaced by the latest one; step, output
and terminal events are never dropped; a subscriber whose queue still overflows is closed
with 1013 and can reconnect with ``?since=`` to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal, Protocol

import orjson
import structlog
from starlette.types import Message, Send
from starlette.websockets import WebSocket, WebSocketState

from relay import eager
from relay.eager import Unfinished
from relay.errors import TooSlow
from relay.events import Event, envelope
from relay.i18n import LANGUAGES, picker

__all__ = ["Backlog", "Channel", "Entry", "Mode", "Outgoing", "Subscriber", "coalesce_key", "send_message"]

log = structlog.get_logger("relay.fanout")

Mode = Literal["relay", "comfy", "all"]
Key = tuple[Any, ...]

# How long a hopeless subscriber's closing handshake may take before the socket is left to die.
_CLOSE_TIMEOUT = 2.0
_TOO_SLOW = TooSlow("too slow: reconnect with ?since= to resume")


def coalesce_key(event: Event) -> Key | None:
    """For the events of which only the latest per (type, prompt, node) matters to a late reader."""
    if not event.coalesces:
        return None
    return (event.type, getattr(event, "prompt_id", None), getattr(event, "node", None))


def send_message(payload: str | bytes) -> Message:
    """The ASGI message that sends ``payload``; built once per event, shared by every subscriber."""
    if isinstance(payload, bytes):
        return {"type": "websocket.send", "bytes": payload}
    return {"type": "websocket.send", "text": payload}


class Outgoing:
    """A frame waiting in a subscriber's queue."""

    __slots__ = ("alive", "counted", "key", "message", "size")

    def __init__(
        self, payload: str | bytes | Message, key: Key | None = None, size: int | None = None
    ) -> None:
        message: Message
        if isinstance(payload, (str, bytes)):
            message, length = send_message(payload), len(payload)
        else:
            message, length = payload, len(payload.get("text") or payload.get("bytes") or b"")
        self.message = message
        self.size = size if size is not None else length
        self.key = key
        self.alive = True
        # Live frames count against the subscriber's limits; the greeting and replay do not.
        self.counted = True


class Subscriber:
    """One browser tab (or wscat): its queue and the task that writes it to the socket."""

    def __init__(
        self,
        websocket: WebSocket[Any],
        *,
        mode: Mode,
        limit: int,
        send: Send | None = None,
        byte_limit: int = 64 * 1024 * 1024,
        legacy_previews: bool = True,
        lang: str | None = None,
    ) -> None:
        self.websocket = websocket
        # Language of step names for this tab (None: the relay's configured one).
        self.lang = lang
        # The server's own ASGI send when available: frames skip the framework's per-message
        # state checks, which the hot path does not need once the socket is accepted.
        self._send: Send = send or websocket.send
        self.mode = mode
        self.limit = limit
        self.byte_limit = byte_limit
        # Raw ComfyUI previews as event 1 unless this client negotiated preview metadata.
        self.legacy_previews = legacy_previews
        # A subscriber counts as behind, and its progress starts to coalesce, past this depth.
        self.coalesce_after = max(1, min(16, limit // 4))
        self._queue: deque[Outgoing] = deque()
        self._by_key: dict[Key, Outgoing] = {}
        self._live = 0
        self._bytes = 0
        # Frames are written inline until start(); hello and replayed events queue before it.
        self._started = False
        # A send that began in deliver() and had to wait for the socket; the writer finishes it.
        self._inflight: Unfinished | None = None
        self._overflowed = False
        self.closed = False
        self.coalesced = 0
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    @property
    def wants_relay(self) -> bool:
        return self.mode != "comfy"

    @property
    def queued(self) -> int:
        """Frames waiting to be written."""
        return self._live

    @property
    def overflowed(self) -> bool:
        """Whether this subscriber fell too far behind and was (or is being) closed."""
        return self._overflowed

    @property
    def wants_comfy(self) -> bool:
        return self.mode != "relay"

    def offer(self, frame: Outgoing) -> None:
        """Queue a frame without waiting. Never raises; a hopeless subscriber is marked for closing."""
        self.deliver(frame.message, frame.key, frame.size)

    def preload(self, payload: str | bytes) -> None:
        """Queue a frame of the greeting (hello, a replayed event, a snapshot) before
        :meth:`start`. These are what the tab asked for on connecting, however many: they do
        not count against the limits that live frames are held to, so a resume that replays
        more than ``limit`` events is delivered rather than closed as too slow."""
        assert not self._started
        frame = Outgoing(payload)
        frame.counted = False
        self._queue.append(frame)

    def deliver(self, message: Message, key: Key | None, size: int) -> None:
        """Hand over a frame without waiting. Never raises; a hopeless subscriber is marked for closing.

        A subscriber that is keeping up (no writer running, nothing queued) gets the frame
        written at once, without a task switch or a queue entry; otherwise the frame is queued
        and a writer task, started if none runs, drains the queue.
        """
        if self.closed or self._overflowed:
            return
        if self._started and self.task is None and not self._queue and self._inflight is None:
            self._send_now(message)
            return
        frame = Outgoing(message, key, size)
        if frame.key is not None and self._live >= self.coalesce_after:
            previous = self._by_key.get(frame.key)
            if previous is not None:
                self._kill(previous)
                self.coalesced += 1
        while self._live >= self.limit or self._bytes + frame.size > self.byte_limit:
            if not self._evict_oldest_coalescible():
                self._give_up()
                return
        self._queue.append(frame)
        self._live += 1
        self._bytes += frame.size
        if frame.key is not None:
            self._by_key[frame.key] = frame
        self._ensure_writer()

    def _send_now(self, message: Message) -> None:
        """Write a frame to a subscriber that is keeping up, without a task switch (relay.eager).

        On a socket that can take data the send completes right here, which is what makes
        fan-out to many idle-fast tabs cheap. On one that applies backpressure the rest of the
        send is left to the writer task, which finishes it before anything else.
        """
        send = self._send(message)
        if not isinstance(send, Coroutine):
            return
        try:
            self._inflight = eager.start(send)
        except (OSError, RuntimeError) as exc:
            log.debug("subscriber send failed", error=repr(exc))
            self.closed = True
            return
        if self._inflight is not None:
            self._ensure_writer()

    async def _finish_inflight(self) -> None:
        assert self._inflight is not None
        try:
            await self._inflight.finish()
        finally:
            self._inflight = None

    def _ensure_writer(self) -> None:
        if self._started and self.task is None and not self.closed and not self._overflowed:
            self.task = asyncio.create_task(self._drain(), name="relay-subscriber-writer")

    def _kill(self, frame: Outgoing) -> None:
        """Drop a queued frame in place; the writer skips it."""
        frame.alive = False
        if not frame.counted:
            return
        self._live -= 1
        self._bytes -= frame.size
        if frame.key is not None and self._by_key.get(frame.key) is frame:
            del self._by_key[frame.key]

    def _evict_oldest_coalescible(self) -> bool:
        for queued in self._queue:
            if queued.alive and queued.key is not None:
                self._kill(queued)
                self.dropped += 1
                return True
        return False

    def _next(self) -> Outgoing | None:
        while self._queue:
            frame = self._queue.popleft()
            if not frame.alive:
                continue
            self._kill(frame)
            return frame
        return None

    def start(self) -> None:
        """Begin delivering: write what was queued before (greeting, replay), then live frames."""
        self._started = True
        if self._queue or self._inflight is not None:
            self._ensure_writer()

    def _give_up(self) -> None:
        """The queue overflowed with frames that must not be dropped: close this subscriber."""
        self._overflowed = True
        self._queue.clear()
        self._by_key.clear()
        self._live = self._bytes = 0
        if self._closer is None:
            self._closer = asyncio.create_task(self._close_hopeless(), name="relay-subscriber-closer")

    async def _close_hopeless(self) -> None:
        # The writer may be stuck in a send to a socket whose buffers are full: stop it first.
        log.warning(
            "closing a subscriber that fell too far behind", dropped=self.dropped, coalesced=self.coalesced
        )
        await self._stop_writer()
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self.websocket.close(_TOO_SLOW.close_code, _TOO_SLOW.message)
        self.closed = True

    async def _stop_writer(self) -> None:
        task = self.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _drain(self) -> None:
        """The writer: send what is queued, in order, then end (an idle tab holds no task)."""
        send = self._send
        try:
            while not self._overflowed:
                if self._inflight is not None:
                    await self._finish_inflight()
                    continue
                frame = self._next()
                if frame is None:
                    return
                await send(frame.message)
        except (OSError, RuntimeError) as exc:
            # The socket went away under us (disconnect, or a send after close).
            log.debug("subscriber writer stopped", error=repr(exc))
            self.closed = True
        finally:
            if self.task is asyncio.current_task():
                self.task = None

    async def close(self, code: int, reason: str = "") -> None:
        """Stop writing and close the socket (shutdown)."""
        self.closed = True
        await self._stop_writer()
        if self.websocket.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(OSError, RuntimeError):
                await self.websocket.close(code, reason)

    def stop(self) -> None:
        """The client went away: cancel this subscriber's tasks (no await needed)."""
        self.closed = True
        for task in (self.task, self._closer):
            if task is not None and not task.done():
                task.cancel()


class Entry:
    """A sequenced event as tabs get it: its payload in the channel's language and, when it has
    texts that differ by language, the means to write it in another (the envelope, on the relay
    that made it; the payload per language, when read back from Redis)."""

    __slots__ = ("key", "payload", "seq", "stamped", "variants")

    def __init__(
        self,
        seq: int,
        payload: str,
        key: Key | None = None,
        *,
        stamped: dict[str, Any] | None = None,
        variants: Mapping[str, str] | None = None,
    ) -> None:
        self.seq = seq
        self.payload = payload
        self.key = key
        self.stamped = stamped
        self.variants = variants

    @property
    def localized(self) -> bool:
        return self.stamped is not None or self.variants is not None

    def text(self, lang: str | None, language: str) -> str:
        """The payload in ``lang`` (None: the channel's ``language``)."""
        if lang is None or lang == language or not self.localized:
            return self.payload
        if self.variants is not None:
            return self.variants.get(lang, self.payload)
        return orjson.dumps(self.stamped, default=picker(lang)).decode()

    def all_languages(self) -> dict[str, str] | None:
        """The payload in every language, when it differs by language (what Redis keeps)."""
        if self.variants is not None:
            return dict(self.variants)
        if self.stamped is None:
            return None
        return {lang: orjson.dumps(self.stamped, default=picker(lang)).decode() for lang in LANGUAGES}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entry) and (other.seq, other.payload) == (self.seq, self.payload)

    def __hash__(self) -> int:
        return hash((self.seq, self.payload))

    def __repr__(self) -> str:
        return f"Entry({self.seq}, {self.payload[:60]!r})"


class Backlog(Protocol):
    """Where a channel's events are kept beyond its ring and this process (relay.eventlog)."""

    def keep(self, entry: Entry) -> None:
        """Keep an event, then hand it to :meth:`Channel.deliver`; must not wait."""

    async def since(self, seq: int) -> list[Entry] | None:
        """The events after ``seq``; None when some of them are not kept."""


class Channel:
    """A client's event stream: sequence numbers, the resume ring, and its subscribers.

    Events are serialized in the channel's ``language``; an event holding :class:`Localized`
    texts is serialized again for each other language its subscribers asked for.

    An event gets its ``seq`` when published and reaches tabs when delivered. Without a
    backlog that is at once. With one (Redis), delivery waits until the backlog has kept the
    event, so no tab ever holds an event that a relay taking over could not find. A channel
    whose events another relay makes is fed with :meth:`deliver` alone.
    """

    def __init__(
        self,
        client_id: str,
        *,
        ring_size: int,
        clock: Callable[[], float] = time.time,
        language: str = "en",
    ) -> None:
        self.client_id = client_id
        self.language = language
        # The last seq delivered to tabs (what a tab joining now is at), and the last assigned.
        self.seq = 0
        self.assigned = 0
        # Identifies this stream: a relay restart starts a new one, whose seq restart at 1.
        self.epoch = secrets.token_hex(4)
        self._ring: deque[Entry] = deque(maxlen=ring_size)
        self._clock = clock
        self.subscribers: set[Subscriber] = set()
        # Subscribers with a language of their own: the only reason to serialize twice.
        self._other_languages = 0
        # Where events are also kept (Redis), so that a tab can resume after a relay restart.
        self.backlog: Backlog | None = None

    def forget(self) -> None:
        """Drop the kept events (the session is gone)."""
        self._ring.clear()

    def restart_at(self, epoch: str, seq: int) -> None:
        """Continue the stream ``epoch`` after ``seq`` (what Redis holds); the ring starts over."""
        self.epoch, self.seq, self.assigned = epoch, seq, seq
        self._ring.clear()

    def add(self, subscriber: Subscriber) -> None:
        self.subscribers.add(subscriber)
        if self._foreign(subscriber):
            self._other_languages += 1

    def discard(self, subscriber: Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.discard(subscriber)
            if self._foreign(subscriber):
                self._other_languages -= 1

    def _foreign(self, subscriber: Subscriber) -> bool:
        return subscriber.lang is not None and subscriber.lang != self.language

    def _envelope(self, event: Event, seq: int) -> dict[str, Any]:
        return envelope(event, seq=seq, ts=round(self._clock(), 3), client_id=self.client_id)

    def stamp(self, event: Event, *, seq: int | None = None, lang: str | None = None) -> str:
        """Serialize an event that is not kept for resuming (a greeting, an error), at the
        current ``seq``, in ``lang`` (else the channel's language)."""
        stamped = self._envelope(event, self.seq if seq is None else seq)
        return orjson.dumps(stamped, default=picker(lang or self.language)).decode()

    def publish(self, event: Event) -> None:
        """Sequence, serialize once, and deliver (or hand to the backlog, which delivers)."""
        self.assigned += 1
        stamped = self._envelope(event, self.assigned)
        localized = [False]
        payload = orjson.dumps(stamped, default=picker(self.language, localized)).decode()
        entry = Entry(self.assigned, payload, coalesce_key(event), stamped=stamped if localized[0] else None)
        if self.backlog is not None:
            self.backlog.keep(entry)
        else:
            self.deliver(entry)

    def deliver(self, entry: Entry) -> None:
        """Remember an event for resuming and offer it to every relay subscriber. Entries come in
        order; one this channel already delivered is ignored."""
        if entry.seq <= self.seq:
            return
        self.seq = entry.seq
        self.assigned = max(self.assigned, entry.seq)
        self._ring.append(entry)
        key, payload = entry.key, entry.payload
        message, size = send_message(payload), len(payload)
        if entry.localized and self._other_languages:
            self._deliver_localized(entry, (message, size))
            return
        for subscriber in self.subscribers:
            if subscriber.wants_relay:
                subscriber.deliver(message, key, size)

    def _deliver_localized(self, entry: Entry, own: tuple[Message, int]) -> None:
        variants: dict[str | None, tuple[Message, int]] = {None: own, self.language: own}
        for subscriber in self.subscribers:
            if not subscriber.wants_relay:
                continue
            variant = variants.get(subscriber.lang)
            if variant is None:
                text = entry.text(subscriber.lang, self.language)
                variant = variants[subscriber.lang] = (send_message(text), len(text))
            subscriber.deliver(variant[0], entry.key, variant[1])

    def publish_raw(
        self, payload: str | bytes, *, key: Key | None = None, legacy: bytes | None = None
    ) -> None:
        """Forward a ComfyUI frame unchanged to subscribers that asked for them (``events=comfy|all``).

        ``legacy`` is the event-1 form of an event-4 preview, for clients that did not
        negotiate preview metadata.
        """
        modern = (send_message(payload), len(payload))
        old = (send_message(legacy), len(legacy)) if legacy is not None else modern
        for subscriber in self.subscribers:
            if subscriber.wants_comfy:
                message, size = old if subscriber.legacy_previews else modern
                subscriber.deliver(message, key, size)

    async def replay(self, seq: int, lang: str | None = None) -> list[str] | None:
        """Events after ``seq`` in ``lang``, from the ring, else from the backlog and the ring
        (after a restart the ring starts empty); None when some of them are kept nowhere.

        The ring is read last, after any wait, so the caller can join the live stream right
        after, with no await in between, and miss nothing.
        """
        local = self.since(seq, lang)
        if local is not None or self.backlog is None:
            return local
        kept = await self.backlog.since(seq)
        if kept is None:
            return None
        kept = [entry for entry in kept if entry.seq <= self.seq]  # not yet delivered: comes live
        last = kept[-1].seq if kept else seq
        rest = self.since(last, lang)
        if rest is None:
            return None
        return [entry.text(lang, self.language) for entry in kept] + rest

    def since(self, seq: int, lang: str | None = None) -> list[str] | None:
        """Events after ``seq`` still in the ring, in ``lang``; None when the ring lost some of them."""
        if seq > self.seq:
            return None
        if seq == self.seq:
            return []
        if not self._ring or self._ring[0].seq > seq + 1:
            return None
        return [entry.text(lang, self.language) for entry in self._ring if entry.seq > seq]
