"""Per-client wiring: upstream socket -> translator -> channel, and the observers after it.

A :class:`ClientSession` decides nothing about frames (the translator does) and delivers
nothing itself (the channel does): it hands each upstream frame to the translator, applies
what comes back (keep a preview, publish events, forward the raw frame, pass timings on to the
ETA) and tells the observers. Its own concerns are the socket's lifecycle, the routing id each
prompt went out under, and settling prompts whose end it could not hear.

A session exists while a client has tabs open, prompts in flight, or recent events worth
resuming from. Its upstream socket opens on the first tab or prompt and closes after
``upstream_grace`` seconds without either; an idle session is forgotten after ``session_ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlencode

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.comfy import ComfyClient
from relay.config import RelayConfig
from relay.errors import RelayError, UpstreamUnavailable
from relay.eventlog import RedisBacklog, RedisLog
from relay.events import Detached, Done, Event, Queued, Snapshot
from relay.events import Upstream as UpstreamEvent
from relay.fanout import Channel, Subscriber
from relay.metrics import LiveState, Metrics
from relay.observers import Observer
from relay.previews import PreviewStore
from relay.translator import Estimates, StepTiming, Translation, Translator
from relay.upstream import State, Upstream

__all__ = ["ClientSession", "Sessions", "live_state"]

log = structlog.get_logger("relay.session")

# How long a session with nothing open and nothing running is kept for resuming.
SESSION_TTL = 600.0


class ClientSession:
    def __init__(
        self,
        client_id: str,
        config: RelayConfig,
        comfy: ComfyClient,
        durations: Estimates | None = None,
        metrics: Metrics | None = None,
        *,
        observers: Sequence[Observer] = (),
        learn: Callable[[StepTiming], None] | None = None,
    ) -> None:
        self.client_id = client_id
        # Frames and reconnects are counted here: no event says them.
        self.metrics = metrics or Metrics()
        self.config = config
        self.comfy = comfy
        self.channel = Channel(client_id, ring_size=config.ring_size, language=config.language)
        self.previews = PreviewStore(client_id, slots=config.preview_slots, prefix=config.public_prefix)
        self.translator = Translator(
            file_url=self._file_url, preview_url=self.previews.url, durations=durations
        )
        self.observers = tuple(observers)
        self._learn = learn
        # Where the channel's events are also kept (Redis), and whether it was read yet.
        self.backlog: RedisBacklog | None = None
        self._opened: asyncio.Task[None] | None = None
        self.upstream = Upstream(client_id, self, config)
        self.log = log.bind(client_id=client_id)
        # POSTs between registering a prompt and ComfyUI's answer keep the upstream open.
        self.registering = 0
        self.idle_since: float | None = time.monotonic()
        # The routing id each prompt in flight was submitted under (relay.routing).
        self.routes: dict[str, str] = {}
        # Prompts whose routing id no open socket has: ComfyUI's events for them go nowhere we
        # hear, so their end is read from ComfyUI's history, checked by the watcher below.
        self.detached: set[str] = set()
        self._watcher: asyncio.Task[None] | None = None
        # Unknown message types already logged (once each).
        self._unknown_seen: set[str] = set()
        self._queue_moved = asyncio.Event()

    # Lifecycle --------------------------------------------------------------------------

    async def ready(self) -> None:
        """Before the first event: take up the client's stream where Redis has it (its epoch and
        last seq), so that numbering continues across relay restarts. Without Redis, nothing."""
        if self.backlog is None:
            return
        if self._opened is None:
            self._opened = asyncio.create_task(self._open(self.backlog), name=f"open-{self.client_id}")
        await asyncio.shield(self._opened)

    async def _open(self, backlog: RedisBacklog) -> None:
        try:
            epoch, last = await backlog.open()
        except (RedisError, OSError) as exc:
            # Redis is away: this stream starts afresh (a new epoch), and is written once Redis is back.
            self.log.warning("could not read the client's stream from Redis", error=str(exc))
        else:
            if self.channel.seq == 0:
                self.channel.epoch, self.channel.seq = epoch, last
        backlog.epoch = self.channel.epoch
        self.channel.backlog = backlog

    @property
    def needed(self) -> bool:
        return bool(self.channel.subscribers) or bool(self.translator.active()) or self.registering > 0

    async def ensure_upstream(self) -> None:
        """Make sure the upstream socket is open, so that no event of a new prompt is missed.

        Raises:
            UpstreamUnavailable: ComfyUI's socket could not be opened in time.
        """
        limit = self.config.upstream_connect_timeout
        opened = await self.upstream.wait_connected(limit)
        # A prompt sent on a socket that died silently would be routed to nobody: check first.
        if opened and not await self.upstream.confirm(self.config.upstream_check_timeout):
            opened = await self.upstream.wait_connected(limit)
        if not opened:
            raise UpstreamUnavailable(
                f"ComfyUI's WebSocket is unreachable: {self.upstream.reason or 'timed out'}"
            )

    def add(self, subscriber: Subscriber) -> None:
        self.channel.add(subscriber)
        self.idle_since = None
        self.upstream.start()

    def remove(self, subscriber: Subscriber) -> None:
        self.channel.discard(subscriber)

    async def close(self) -> None:
        """Stop watching detached prompts, close the upstream socket, write what Redis lacks."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self.upstream.close()
        if self.backlog is not None:
            await self.backlog.close()

    # Routing ----------------------------------------------------------------------------

    def route(self, prompt_id: str) -> str:
        """The routing id to submit ``prompt_id`` under: the open socket's. Call once it is open."""
        sid = self.routes[prompt_id] = self.upstream.sid
        return sid

    def unroute(self, prompt_id: str) -> None:
        """ComfyUI did not take the prompt."""
        self.routes.pop(prompt_id, None)

    def _check_routes(self) -> None:
        """Detach the active prompts submitted under a routing id that is no longer the socket's."""
        sid = self.upstream.sid
        lost = [
            p for p in self.translator.active() if p not in self.detached and self.routes.get(p, sid) != sid
        ]
        if not lost:
            return
        self.detached.update(lost)
        self.metrics.detached.inc(len(lost))
        self.log.warning("prompts detached: their socket to ComfyUI was lost uncleanly", prompt_ids=lost)
        reason = (
            "the relay's socket to ComfyUI was lost without a clean close; ComfyUI sends this "
            "prompt's progress to that socket, so only its end can be reported"
        )
        self.publish([Detached(p, reason) for p in lost])
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_detached(), name=f"detached-{self.client_id}")

    async def _watch_detached(self) -> None:
        """Until every detached prompt has ended: ask ComfyUI, at each queue change it announces
        (a prompt that ends changes the queue) and every ``detached_poll_interval`` seconds."""
        while self.detached:
            self._queue_moved.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.detached_poll_interval):
                    await self._queue_moved.wait()
            if self.upstream.state == "connected":  # else ComfyUI is away: its return reconciles
                await self.reconcile(only=set(self.detached))

    # Publishing -------------------------------------------------------------------------

    def apply(self, translation: Translation) -> None:
        """Carry out what the translator said: keep the preview, publish, forward, learn."""
        preview = translation.preview
        if preview is not None:
            self.previews.put(preview.prompt_id, preview.node, preview.mime, preview.data)
        if self._learn is not None:
            for timing in translation.timings:
                self._learn(timing)
        self.publish(translation.events)
        forward = translation.forward
        if forward is not None:
            self.channel.publish_raw(forward.payload, key=forward.key, legacy=forward.legacy)

    def publish(self, events: Iterable[Event]) -> None:
        for event in events:
            self.channel.publish(event)
            for observer in self.observers:
                observer.published(self.client_id, event)
            if isinstance(event, Done):
                self.routes.pop(event.prompt_id, None)
                self.detached.discard(event.prompt_id)
            elif isinstance(event, Queued):
                self._check_routes()  # the socket may have been lost while ComfyUI answered

    def _file_url(self, ref: Any) -> str:
        query = urlencode({"filename": ref["filename"], "subfolder": ref["subfolder"], "type": ref["type"]})
        return f"{self.config.public_prefix}/view?{query}"

    # UpstreamHandler ---------------------------------------------------------------------

    def on_frame(self, frame: str | bytes) -> None:
        (self.metrics.comfy_text if isinstance(frame, str) else self.metrics.comfy_binary).inc()
        translation = self.translator.frame(frame, time.monotonic())
        if translation.queue_status and self.detached:
            self._queue_moved.set()
        if translation.unknown is not None:
            self.metrics.comfy_unknown.inc()
            if translation.unknown not in self._unknown_seen and len(self._unknown_seen) < 64:
                self._unknown_seen.add(translation.unknown)
                self.log.info("ComfyUI sent a message type the relay does not know; passed on as it is",
                              message_type=translation.unknown)  # fmt: skip
        self.apply(translation)

    def on_state(self, state: State, attempt: int, reason: str | None) -> None:
        if state == "closed":
            return
        self.publish([UpstreamEvent(state, attempt, reason)])

    async def on_connected(self, reconnected: bool) -> None:
        if reconnected:
            self.metrics.upstream_reconnects.inc()
            self._check_routes()
            # ComfyUI may have been restarted as another version: read what it offers again.
            with contextlib.suppress(RelayError):
                await self.comfy.capabilities(fresh=True)
            await self.reconcile()

    def _attached(self) -> set[str]:
        return {p for p in self.translator.active() if p not in self.detached}

    def needs_watch(self) -> bool:
        return bool(self._attached())

    async def on_silence(self) -> bool:
        """Check on active prompts through HTTP; a prompt finished unseen means we were orphaned."""
        closed = await self.reconcile(only=self._attached())
        if closed:
            self.log.warning("prompts finished without a word on the socket; reopening it", closed=closed)
        return closed > 0

    async def reconcile(self, *, removed: bool = False, only: set[str] | None = None) -> int:
        """Settle prompts that ended while the socket was away; returns how many it closed.

        With ``removed``, after a delete from ComfyUI's queue: a prompt that never started and
        is gone from the queue without a history entry was cancelled, not lost. With ``only``,
        just those prompts are looked at.
        """
        active = [p for p in self.translator.active() if only is None or p in only]
        if not active:
            return 0
        try:
            fates = await self.comfy.fates(active)
        except RelayError as exc:
            self.log.warning("could not reconcile prompts", reason=exc.message)
            return 0
        closed = 0
        for prompt_id, fate in fates.items():
            now = time.monotonic()
            if fate.state == "alive":
                continue
            if fate.entry is not None:
                ended = self.translator.recover(prompt_id, fate.entry, now)
            elif removed and prompt_id in self.translator.queued():
                ended = self.translator.cancelled(prompt_id, now)
            else:
                reason = "ComfyUI no longer knows this prompt (it may have restarted); its result is lost"
                ended = self.translator.lost(prompt_id, reason, now)
            closed += bool(ended.events)
            self.apply(ended)
        return closed

    # Snapshots for clients that cannot resume ---------------------------------------------

    def snapshots(self) -> Iterator[Snapshot]:
        now = time.monotonic()
        for prompt_id in self.translator.active():
            snapshot = self.translator.snapshot(prompt_id, now)
            if snapshot is not None:
                yield snapshot


class Sessions:
    """Every client's session, and the reaper that closes idle upstream sockets."""

    def __init__(
        self,
        config: RelayConfig,
        comfy: ComfyClient,
        durations: Estimates | None = None,
        metrics: Metrics | None = None,
        *,
        observers: Sequence[Observer] = (),
        learn: Callable[[StepTiming], None] | None = None,
        redis: Redis | None = None,
    ) -> None:
        self.config = config
        self.comfy = comfy
        self.redis = redis
        self.durations = durations
        self.metrics = metrics or Metrics()
        self.observers = tuple(observers)
        self.learn = learn
        self._sessions: dict[str, ClientSession] = {}
        self._reaper: asyncio.Task[None] | None = None

    def get(self, client_id: str) -> ClientSession:
        session = self._sessions.get(client_id)
        if session is None:
            session = self._sessions[client_id] = ClientSession(
                client_id,
                self.config,
                self.comfy,
                self.durations,
                self.metrics,
                observers=self.observers,
                learn=self.learn,
            )
            if self.redis is not None:
                stream = RedisLog(
                    self.redis, client_id, ring_size=self.config.ring_size, ttl=self.config.redis_event_ttl
                )
                session.backlog = RedisBacklog(stream, limit=self.config.ring_size)
        return session

    def find(self, client_id: str) -> ClientSession | None:
        return self._sessions.get(client_id)

    async def settle_removed(self) -> None:
        """After prompts were deleted from ComfyUI's queue: end each removed one with ``cancelled``."""
        for session in list(self._sessions.values()):
            if session.translator.queued():
                await session.reconcile(removed=True)

    def __iter__(self) -> Iterator[ClientSession]:
        return iter(list(self._sessions.values()))

    def live_state(self) -> LiveState:
        """What is open and running now, for the metrics scrape."""
        return live_state(self._sessions.values())

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever(), name="relay-session-reaper")

    async def _reap_forever(self) -> None:
        interval = max(0.05, min(1.0, self.config.upstream_grace / 4))
        while True:
            await asyncio.sleep(interval)
            await self.reap(time.monotonic())

    async def reap(self, now: float) -> None:
        for session in list(self._sessions.values()):
            if session.needed:
                session.idle_since = None
                continue
            if session.idle_since is None:
                session.idle_since = now
            idle = now - session.idle_since
            if idle >= self.config.upstream_grace and session.upstream.running:
                session.log.info("closing idle upstream socket", idle=round(idle, 1))
                await session.upstream.close()
            if idle >= SESSION_TTL:
                del self._sessions[session.client_id]

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(s.close() for s in self._sessions.values()), return_exceptions=True)


def live_state(sessions: Iterable[ClientSession]) -> LiveState:
    """Count sockets by mode, upstreams by state, prompts by phase and queued frames."""
    live = LiveState()
    for session in sessions:
        live.clients += 1
        for subscriber in session.channel.subscribers:
            live.connections[subscriber.mode] += 1
            queued = subscriber.queued
            live.queued_frames += queued
            live.deepest_queue = max(live.deepest_queue, queued)
            live.coalesced += subscriber.coalesced
            live.dropped += subscriber.dropped
        if session.upstream.state in live.upstreams:
            live.upstreams[session.upstream.state] += 1
        queued_ids = session.translator.queued()
        for prompt_id in session.translator.active():
            live.prompts["queued" if prompt_id in queued_ids else "running"] += 1
    return live
