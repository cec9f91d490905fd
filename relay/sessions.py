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
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlencode

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.backends import Backend, Backends
from relay.config import RelayConfig
from relay.errors import RelayError, StreamReset, UpstreamUnavailable
from relay.eventlog import Notice, RedisBacklog, RedisLog
from relay.events import Detached, Done, Event, Queue, Queued, Snapshot
from relay.events import Upstream as UpstreamEvent
from relay.fanout import Channel, Subscriber
from relay.lease import Lease
from relay.metrics import LiveState, Metrics
from relay.observers import Observer
from relay.plans import build_plan
from relay.previews import PreviewStore
from relay.routing import CLIENT_KEY
from relay.tasks import stop
from relay.translator import Estimates, StepTiming, Translation, Translator
from relay.upstream import State, Upstream

if TYPE_CHECKING:
    from relay.cluster import Cluster
    from relay.delivery import Deliveries

__all__ = ["ClientSession", "Link", "Role", "Sessions", "live_state"]

# local: no Redis, this relay is the only one; owner: this relay holds the client's lease;
# follower: another relay does, and this one serves its tabs from the client's stream.
Role = Literal["local", "owner", "follower"]

log = structlog.get_logger("relay.session")

# Longest a client's session may take to close at shutdown (its socket's closing handshake,
# events still to write, the handover), within Kubernetes' grace period.
_CLOSE_LIMIT = 12.0


class Link:
    """A client's socket to one backend. Its :class:`Upstream` reports here, and the session
    hears which backend spoke; the translator never does."""

    def __init__(self, session: ClientSession, backend: Backend) -> None:
        self.session = session
        self.backend = backend
        self.name = backend.name
        self.upstream = Upstream(session.client_id, self, session.config, ws_url=backend.ws_url)
        # Until its first socket opens: then, without Redis, look for prompts of this client
        # that the backend still has and this relay does not know (it restarted).
        self.fresh = True
        # Prompts on this backend taken over from another relay, to reconcile once open.
        self.adopted = False
        # POSTs between choosing this backend and its answer keep the socket open.
        self.registering = 0
        self.idle_since: float | None = None

    def on_frame(self, frame: str | bytes) -> None:
        self.session.on_frame(frame, self)

    def on_state(self, state: State, attempt: int, reason: str | None) -> None:
        self.session.on_link_state(self, state, attempt, reason)

    async def on_connected(self, reconnected: bool) -> None:
        await self.session.on_connected(reconnected, self)

    async def on_silence(self) -> bool:
        return await self.session.on_silence(self)

    def needs_watch(self) -> bool:
        return self.session.needs_watch(self)


class ClientSession:
    def __init__(
        self,
        client_id: str,
        config: RelayConfig,
        backends: Backends,
        durations: Estimates | None = None,
        metrics: Metrics | None = None,
        *,
        observers: Sequence[Observer] = (),
        learn: Callable[[StepTiming], None] | None = None,
        deliveries: Deliveries | None = None,
    ) -> None:
        self.client_id = client_id
        # Frames and reconnects are counted here: no event says them.
        self.metrics = metrics or Metrics()
        self.config = config
        self.backends = backends
        self.channel = Channel(client_id, ring_size=config.ring_size, language=config.language)
        self.previews = PreviewStore(client_id, slots=config.preview_slots, prefix=config.public_prefix)
        self.translator = Translator(
            file_url=self._file_url, preview_url=self.previews.url, durations=durations
        )
        self.observers = tuple(observers)
        self._learn = learn
        # Storage and webhooks (relay.delivery); prompts whose files are being stored.
        self.deliveries = deliveries
        self.storing = 0
        # With Redis: the relays' shared state, this client's keys, its lease, this relay's role.
        self.cluster: Cluster | None = None
        self.redis_log: RedisLog | None = None
        self.lease: Lease | None = None
        self.role: Role = "local"
        # Where the channel's events are kept (Redis) while this relay writes them.
        self.backlog: RedisBacklog | None = None
        self._opened: asyncio.Task[None] | None = None
        self._role_lock = asyncio.Lock()
        # Following another relay: the task reading the stream, woken by notices.
        self._feed: asyncio.Task[None] | None = None
        self._feed_wake = asyncio.Event()
        self._feed_reset = False
        # Whether another relay has tabs of this client that want ComfyUI's frames.
        self.raw_elsewhere = False
        # One socket per backend this client uses (one in all, without several backends).
        self.links: dict[str, Link] = {}
        # The backend each prompt in flight went to.
        self.placed: dict[str, str] = {}
        # With several backends and no Redis: whether every backend was asked for prompts of
        # this client that a restarted relay forgot (each link asks its own when it opens).
        self._searched = False
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
        # A queue change while prompts wait: one may have been deleted (checked in the background).
        self._queue_check: asyncio.Task[None] | None = None
        self._durations = durations
        self._closing: set[asyncio.Task[Any]] = set()

    # Lifecycle --------------------------------------------------------------------------

    def join(self, cluster: Cluster, redis_log: RedisLog, lease: Lease) -> None:
        """Share this client with other relays through Redis (before the first :meth:`ready`)."""
        self.cluster, self.redis_log, self.lease = cluster, redis_log, lease
        self.role = "follower"  # until the lease says otherwise

    def _shared(self) -> tuple[Cluster, RedisLog, Lease]:
        """What :meth:`join` set (only called on a session that joined)."""
        assert self.cluster is not None
        assert self.redis_log is not None
        assert self.lease is not None
        return self.cluster, self.redis_log, self.lease

    @property
    def owned(self) -> bool:
        """Whether this relay speaks for the client: holds its ComfyUI socket and writes its events."""
        return self.role != "follower"

    async def ready(self) -> None:
        """Before the first event: with Redis, find out whether this relay holds the client (and
        take it if nobody does), and take up the client's stream where Redis has it (its epoch
        and last seq), so that numbering continues across relays and restarts."""
        if self.cluster is None:
            return
        if self._opened is None:
            self._opened = asyncio.create_task(self._open(), name=f"open-{self.client_id}")
        await asyncio.shield(self._opened)
        if self.role == "follower":
            await self._try_take()

    async def _open(self) -> None:
        cluster, _, lease = self._shared()
        async with self._role_lock:
            try:
                fence = await lease.acquire()
            except (RedisError, OSError) as exc:
                # Redis is away: serve the client from here, with a new epoch, and write its
                # events once Redis is back (or give way, if another relay holds it by then).
                cluster.failed()
                self.log.warning("could not reach Redis for the client's lease; serving it here",
                                 error=str(exc))  # fmt: skip
                lease.assume()
                await self._become_owner(reachable=False)
                return
            if fence is not None:
                await self._become_owner()
            else:
                await self._become_follower()

    async def _try_take(self) -> None:
        """A follower takes the client's lease if nobody holds it."""
        cluster, _, lease = self._shared()
        if cluster.polite():
            return
        async with self._role_lock:
            if self.role != "follower":
                return
            try:
                fence = await lease.acquire()
            except (RedisError, OSError):
                cluster.failed()
                return
            if fence is not None:
                await self._become_owner()

    async def tend(self, *, want: bool = False) -> None:
        """The cluster's tick: renew the lease while holding the client; take a free one when the
        client is wanted here (tabs, or ``want``: prompts in flight nobody follows)."""
        if self.role == "owner":
            cluster, _, lease = self._shared()
            try:
                held = await lease.renew()
                self.raw_elsewhere = held and await cluster.raw_wanted(self.client_id)
            except (RedisError, OSError):
                cluster.failed()
                return
            if not held:
                await self._step_down("another relay holds this client now")
            return
        if self.role == "follower" and (self.needed or want):
            await self._try_take()
        await self.ask_for_raw()

    async def ask_for_raw(self) -> None:
        """On a relay following the client, with tabs that want ComfyUI's frames: ask for them."""
        if self.role != "follower" or not any(s.wants_comfy for s in self.channel.subscribers):
            return
        cluster, _, _ = self._shared()
        try:
            await cluster.want_raw(self.client_id)
        except (RedisError, OSError):
            cluster.failed()

    async def lease_current(self) -> tuple[str, int] | None:
        return None if self.lease is None else await self.lease.current()

    async def _become_owner(self, *, reachable: bool = True) -> None:
        cluster, redis_log, lease = self._shared()
        backlog = RedisBacklog(
            redis_log,
            limit=self.config.ring_size,
            deliver=self.channel.deliver,
            token=lambda: lease.token or lease.assume(),
            lost_lease=self._lost_lease,
            in_flight=cluster.mark_in_flight,
        )
        records: dict[str, str] = {}
        handoff = None
        if reachable:
            try:
                epoch, last = await redis_log.open()
                records = await redis_log.records()
                handoff = await redis_log.take_handoff()
                await self._catch_up(epoch, last)
            except (RedisError, OSError) as exc:
                cluster.failed()
                self.log.warning("could not read the client's state from Redis", error=str(exc))
        self._stop_feed()
        backlog.epoch = self.channel.epoch
        self.channel.backlog = self.backlog = backlog
        self.role = "owner"
        adopted = self._adopt(records)
        if handoff is not None:
            self._take_handoff(handoff)
        self.log.info("this relay holds the client", fence=lease.fence, adopted=adopted,
                      handoff=handoff is not None)  # fmt: skip
        if self.needed:
            self.start_upstream()

    def _take_handoff(self, handoff: str) -> None:
        """The last holder closed its sockets cleanly: reuse their ids (``{backend: id}``, or
        a bare id for the first backend)."""
        sids: dict[str, str] = {}
        if handoff.startswith("{"):
            with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
                sids = {str(k): str(v) for k, v in orjson.loads(handoff).items()}
        else:
            with contextlib.suppress(RelayError):
                sids = {self.backends.first().name: handoff}
        for name, sid in sids.items():
            backend = self.backends.get(name)
            if backend is not None:
                link = self.link(backend)
                if not link.upstream.running:
                    link.upstream.sid = sid

    def _adopt(self, records: dict[str, str]) -> int:
        """Take over the prompts another relay left in flight; their end is settled once open."""
        now, wall = time.monotonic(), time.time()
        adopted = 0
        for prompt_id, text in records.items():
            try:
                record = orjson.loads(text)
                usable = self.translator.adopt(prompt_id, record["run"], now, wall)
            except (orjson.JSONDecodeError, KeyError, TypeError):
                usable = False
            if not usable:
                self.log.warning("a prompt record in Redis is unusable; dropped", prompt_id=prompt_id)
                assert self.backlog is not None
                self.backlog.record(prompt_id, None)
                continue
            if isinstance(record.get("sid"), str):
                self.routes[prompt_id] = record["sid"]
            name = record.get("backend")
            backend = self.backends.get(name) if isinstance(name, str) else self._first()
            if backend is not None:
                self._place(prompt_id, backend)
                self.link(backend).adopted = True
            adopted += 1
        if adopted:
            self.metrics.takeovers.inc()
        return adopted

    async def _become_follower(self) -> None:
        cluster, redis_log, _ = self._shared()
        reader = RedisBacklog(
            redis_log,
            limit=1,
            deliver=self.channel.deliver,
            token=lambda: "",
            lost_lease=lambda: None,
        )
        reader.stopped = True  # reads only: another relay writes this client's events
        self.channel.backlog = reader
        self.backlog = None
        self.role = "follower"
        cluster.listen()
        try:
            epoch, last = await redis_log.open()
            await self._catch_up(epoch, last)
        except (RedisError, OSError) as exc:
            cluster.failed()
            self.log.warning("could not read the client's stream from Redis", error=str(exc))
        self._feed_wake.set()
        if self._feed is None or self._feed.done():
            self._feed = asyncio.create_task(self._follow(), name=f"follow-{self.client_id}")

    async def _catch_up(self, epoch: str, last: int) -> None:
        """Bring this channel to the stream's end: deliver what it lacks, or start over on the
        stream when it cannot (another epoch, or events Redis no longer has)."""
        _, redis_log, _ = self._shared()
        channel = self.channel
        if channel.epoch == epoch and channel.seq <= last:
            while channel.seq < last:
                entries = await redis_log.since(channel.seq, count=512)
                if not entries:
                    break
                for entry in entries:
                    channel.deliver(entry)
            if channel.seq >= last:
                return
        self._resync(epoch, last)

    def _resync(self, epoch: str, last: int) -> None:
        """This channel's tabs cannot go on without a hole: restart it at the stream's end and
        close them so they reconnect (and are told what was lost)."""
        channel = self.channel
        if channel.subscribers and (channel.epoch, channel.seq) != (epoch, last):
            self.log.warning("the client's stream lost events its tabs had not received; closing them",
                             tabs=len(channel.subscribers))  # fmt: skip
            reset = StreamReset("the event stream was cut; reconnect with ?since= to learn what was lost")
            for subscriber in list(channel.subscribers):
                task = asyncio.create_task(subscriber.close(reset.close_code, reset.message))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        channel.restart_at(epoch, last)

    def notified(self, epoch: str | None, seq: int | None, notice: Notice | None = None) -> None:
        """The client's stream grew to ``seq`` under ``epoch`` (None: read it to know), with the
        ``notice``'s events: delivered at once when they follow on, else read from the stream."""
        if self.role != "follower":
            return
        channel = self.channel
        if epoch is not None and epoch != channel.epoch:
            self._feed_reset = True
        elif seq is not None and seq <= channel.seq:
            return
        elif notice is not None and notice.first == channel.seq + 1:
            for entry in notice.entries:
                channel.deliver(entry)
            return
        self._feed_wake.set()

    async def _follow(self) -> None:
        """Deliver the stream's new events to this relay's tabs, as notices announce them."""
        cluster, redis_log, _ = self._shared()
        while self.role == "follower":
            await self._feed_wake.wait()
            self._feed_wake.clear()
            try:
                if self._feed_reset:
                    self._feed_reset = False
                    epoch, last = await redis_log.position()
                    if epoch is not None:
                        await self._catch_up(epoch, last)
                    continue
                while self.role == "follower":
                    entries = await redis_log.since(self.channel.seq, count=512)
                    if entries is None:
                        epoch, last = await redis_log.position()
                        self._resync(epoch or self.channel.epoch, last)
                        break
                    for entry in entries:
                        self.channel.deliver(entry)
                    if len(entries) < 512:
                        break
            except (RedisError, OSError) as exc:
                cluster.failed()
                self.log.warning("could not read the client's stream from Redis", error=str(exc))

    def _stop_feed(self) -> None:
        feed, self._feed = self._feed, None
        if feed is not None and feed is not asyncio.current_task():
            feed.cancel()

    def _lost_lease(self) -> None:
        task = asyncio.create_task(self._step_down("the client's lease passed to another relay"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _step_down(self, why: str) -> None:
        """Another relay holds the client: stop speaking for it and follow its stream instead."""
        async with self._role_lock:
            if self.role != "owner":
                return
            self.log.warning("no longer holding the client; following the relay that does", why=why)
            if self.backlog is not None:
                self.backlog.stopped = True
            self.role = "follower"
            await self.close_links()
            self._forget_prompts()
            await self._become_follower()

    async def release(self) -> None:
        """Nothing here needs the client any more: close its socket and let another relay take it."""
        async with self._role_lock:
            if self.role != "owner" or self.needed:
                return
            await self.close_links()
            if self.backlog is not None:
                await self.backlog.close()
            assert self.lease is not None
            with contextlib.suppress(RedisError, OSError):
                await self.lease.release()
            self.log.info("released the client: nothing here needs it")
            await self._become_follower()

    def _forget_prompts(self) -> None:
        """The prompts are another relay's to follow now."""
        for prompt_id in self.placed:
            self.backends.finished(prompt_id)
        self.translator = Translator(
            file_url=self._file_url, preview_url=self.previews.url, durations=self._durations
        )
        self.routes.clear()
        self.detached.clear()
        self.placed.clear()

    # Backends and their sockets ---------------------------------------------------------

    def _first(self) -> Backend | None:
        try:
            return self.backends.first()
        except RelayError:
            return None

    def link(self, backend: Backend) -> Link:
        """This client's socket to ``backend`` (made, not opened, on first use)."""
        link = self.links.get(backend.name)
        if link is not None and link.backend is not backend:
            # The address left the name's answer and came back: a new backend, a new socket.
            old = link.upstream
            task = asyncio.create_task(old.close(), name=f"close-{self.client_id}")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            link = None
        if link is None:
            link = self.links[backend.name] = Link(self, backend)
        return link

    @property
    def upstream(self) -> Upstream:
        """The socket to the first backend: without several backends, the client's socket."""
        return self.link(self.backends.first()).upstream

    def _backend_name(self, prompt_id: str) -> str | None:
        name = self.placed.get(prompt_id)
        if name is None:
            first = self._first()
            name = first.name if first is not None else None
        return name

    def _place(self, prompt_id: str, backend: Backend) -> None:
        self.placed[prompt_id] = backend.name
        self.backends.place(prompt_id, backend.name)

    def prompts_on(self, name: str) -> list[str]:
        """The active prompts that went to backend ``name``."""
        return [p for p in self.translator.active() if self._backend_name(p) == name]

    def link_needed(self, link: Link) -> bool:
        """Whether ``link``'s socket must stay open: without several backends, whenever the
        session is needed; with them, while a prompt of this client is on its backend."""
        if not self.backends.pooled:
            return self.needed
        return link.registering > 0 or bool(self.prompts_on(link.name))

    def start_upstream(self) -> None:
        """Open the ComfyUI sockets this client needs, if this relay speaks for it."""
        if not self.owned:
            return
        if not self.backends.pooled:
            with contextlib.suppress(RelayError):
                self.upstream.start()
            return
        for name in {self._backend_name(p) for p in self.translator.active()}:
            backend = self.backends.get(name)
            if backend is not None:
                self.link(backend).upstream.start()
        if self.cluster is None and not self._searched:
            self._searched = True
            task = asyncio.create_task(self._search_backends(), name=f"search-{self.client_id}")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _search_backends(self) -> None:
        """Open this client's socket to each backend whose queue holds prompts of the client
        that this relay does not know: opening it follows them (``_find_orphans``)."""
        for backend in self.backends.up():
            link = self.links.get(backend.name)
            if link is not None and not link.fresh:
                continue  # its socket opened already, and looked
            try:
                items = await backend.comfy.queue_items()
            except RelayError:
                continue
            for item in items:
                extra = item[3] if len(item) > 3 else None
                mine = isinstance(extra, dict) and extra.get(CLIENT_KEY) == self.client_id
                if mine and not self.translator.knows(str(item[1])):
                    self.link(backend).upstream.start()
                    break

    @property
    def upstream_running(self) -> bool:
        return any(link.upstream.running for link in self.links.values())

    async def close_links(self) -> None:
        await asyncio.gather(*(link.upstream.close() for link in list(self.links.values())))

    async def reap_links(self, now: float) -> None:
        """With several backends: close each socket its backend's prompts no longer need."""
        for link in list(self.links.values()):
            if self.link_needed(link) or not link.upstream.running:
                link.idle_since = None
                continue
            if link.idle_since is None:
                link.idle_since = now
            if now - link.idle_since >= self.config.upstream_grace:
                self.log.info("closing idle upstream socket", backend=link.name)
                link.idle_since = None
                await link.upstream.close()

    def upstream_state(self) -> str:
        """The state of the client's ComfyUI sockets, as ``relay.hello`` names it: without
        several backends, its socket's; with them, the worst of those its prompts use, else
        connected while any backend is up."""
        if not self.backends.pooled:
            try:
                state = self.upstream.state
            except RelayError:
                return "down"
            return "down" if state == "closed" else state
        used = [
            self.links[n]
            for n in {self._backend_name(p) for p in self.translator.active()}
            if n in self.links
        ]
        states = {link.upstream.state for link in used}
        for worst in ("down", "closed", "connecting"):
            if worst in states:
                return "down" if worst == "closed" else worst
        if used:
            return "connected"
        return "connected" if self.backends.up() else "down"

    @property
    def needed(self) -> bool:
        return (
            bool(self.channel.subscribers)
            or bool(self.translator.active())
            or self.registering > 0
            or self.storing > 0
        )

    async def ensure_upstream(self, link: Link | None = None) -> None:
        """Make sure the socket (to ``link``'s backend; the first one) is open, so that no event
        of a new prompt is missed.

        Raises:
            UpstreamUnavailable: ComfyUI's socket could not be opened in time.
        """
        upstream = link.upstream if link is not None else self.upstream
        limit = self.config.upstream_connect_timeout
        opened = await upstream.wait_connected(limit)
        # A prompt sent on a socket that died silently would be routed to nobody: check first.
        if opened and not await upstream.confirm(self.config.upstream_check_timeout):
            opened = await upstream.wait_connected(limit)
        if not opened:
            raise UpstreamUnavailable(f"ComfyUI's WebSocket is unreachable: {upstream.reason or 'timed out'}")

    def add(self, subscriber: Subscriber) -> None:
        self.channel.add(subscriber)
        self.idle_since = None
        self.start_upstream()

    def remove(self, subscriber: Subscriber) -> None:
        self.channel.discard(subscriber)

    async def close(self) -> None:
        """Stop watching detached prompts, close the upstream socket, write what Redis lacks; with
        Redis, hand the client over: the next relay reuses the socket's id when it can."""
        watcher, self._watcher = self._watcher, None
        for task in (watcher, self._queue_check):
            await stop(task)
        self._stop_feed()
        await self.close_links()
        if self.backlog is not None:
            await self.backlog.close()
        if self.role == "owner" and self.lease is not None and self.redis_log is not None:
            handoff = bool(self.translator.active())
            with contextlib.suppress(RedisError, OSError):
                if handoff:
                    # Closed with a handshake: ComfyUI let go of the id, and sends the running
                    # prompt's events to whichever socket registers under it next.
                    await self.redis_log.give_handoff(self._handoff())
                await self.lease.release()
            self.log.info("handed the client over", prompts=len(self.translator.active()), handoff=handoff)

    def _handoff(self) -> str:
        """The ids of the sockets just closed, for the next relay: a bare id with one backend."""
        if not self.backends.pooled:
            return self.upstream.sid
        return orjson.dumps({name: link.upstream.sid for name, link in self.links.items()}).decode()

    def forget(self) -> None:
        """Drop what a reaped session holds (its events, previews, prompts) at once. Parts of a
        session refer to each other (its socket's callbacks, tasks), so it waits for the
        collector's full pass, which the relay makes rare (``relay.server.tune_gc``): without
        this its ring and previews would wait with it."""
        self.channel.forget()
        self.previews.forget()
        self.translator = Translator(file_url=self._file_url, preview_url=self.previews.url)
        self.routes.clear()
        self.detached.clear()
        self.placed.clear()

    # Routing ----------------------------------------------------------------------------

    def route(self, prompt_id: str, link: Link | None = None) -> str:
        """The routing id to submit ``prompt_id`` under: the open socket's (to ``link``'s
        backend; the first one). Call once it is open."""
        link = link or self.link(self.backends.first())
        sid = self.routes[prompt_id] = link.upstream.sid
        self.placed[prompt_id] = link.name
        return sid

    def unroute(self, prompt_id: str) -> None:
        """ComfyUI did not take the prompt."""
        self.routes.pop(prompt_id, None)
        self.placed.pop(prompt_id, None)
        self.backends.unassign(prompt_id)

    def _check_routes(self, link: Link, reason: str | None = None) -> None:
        """Detach the active prompts on ``link``'s backend submitted under a routing id that is
        no longer its socket's."""
        sid = link.upstream.sid
        lost = [
            p for p in self.prompts_on(link.name) if p not in self.detached and self.routes.get(p, sid) != sid
        ]
        if not lost:
            return
        self.detached.update(lost)
        self.metrics.detached.inc(len(lost))
        self.log.warning("prompts detached: their socket to ComfyUI was lost uncleanly", prompt_ids=lost)
        reason = reason or (
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
            # A backend that is away reconciles when it returns.
            await self.reconcile(only=set(self.detached), connected=True)

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
            if self.raw_elsewhere and self.cluster is not None:
                self.cluster.publish_raw(self.client_id, forward.payload, forward.key, forward.legacy)

    def publish(self, events: Iterable[Event]) -> None:
        for event in events:
            if self.deliveries is not None:
                event = self.deliveries.passing(self, event)  # noqa: PLW2901 - relay.done gains its storage
            self.channel.publish(event)
            for observer in self.observers:
                observer.published(self.client_id, event)
            if isinstance(event, Done):
                self.routes.pop(event.prompt_id, None)
                self.detached.discard(event.prompt_id)
                self.placed.pop(event.prompt_id, None)
                self.backends.finished(event.prompt_id, event.outputs)
            elif isinstance(event, Queued):
                link = self._link_of(event.prompt_id)
                if link is not None:
                    self._check_routes(link)  # the socket may have been lost while ComfyUI answered
            if self.backlog is not None and not event.coalesces:
                self._keep_record(event)

    def _keep_record(self, event: Event) -> None:
        """With Redis: the prompt's state as of this event, for a relay that takes over."""
        prompt_id = getattr(event, "prompt_id", None)
        if not isinstance(prompt_id, str) or self.backlog is None:
            return
        if isinstance(event, Done):
            self.backlog.record(prompt_id, None)
            return
        run = self.translator.export(prompt_id, time.monotonic(), time.time())
        if run is not None:
            record = {"sid": self.routes.get(prompt_id), "backend": self.placed.get(prompt_id), "run": run}
            self.backlog.record(prompt_id, orjson.dumps(record).decode())

    def _link_of(self, prompt_id: str) -> Link | None:
        name = self._backend_name(prompt_id)
        return self.links.get(name) if name is not None else None

    def _file_url(self, ref: Any, prompt_id: str) -> str:
        fields = {"filename": ref["filename"], "subfolder": ref["subfolder"], "type": ref["type"]}
        if self.backends.pooled:
            # Backends name their files alike: the prompt tells the relay's /view where it is.
            fields["prompt_id"] = prompt_id
        return f"{self.config.public_prefix}/view?{urlencode(fields)}"

    # UpstreamHandler ---------------------------------------------------------------------

    def on_frame(self, frame: str | bytes, link: Link) -> None:
        (self.metrics.comfy_text if isinstance(frame, str) else self.metrics.comfy_binary).inc()
        translation = self.translator.frame(frame, time.monotonic())
        if translation.queue_status and self.backends.pooled:
            # One backend's queue: the client is told the queue of them all.
            for n, event in enumerate(translation.events):
                if isinstance(event, Queue):
                    self.backends.note_queue(link.name, event.remaining)
                    translation.events[n] = Queue(self.backends.total_remaining())
        if translation.queue_status:
            if self.detached:
                self._queue_moved.set()
            checking = self._queue_check is not None and not self._queue_check.done()
            if self.cluster is not None and self.translator.queued() and not checking:
                # ComfyUI announces every deletion from its queue: one of ours may have gone,
                # deleted through another relay (which cannot settle it: this one follows it).
                self._queue_check = asyncio.create_task(
                    self._check_queue(), name=f"queue-check-{self.client_id}"
                )
        if translation.unknown is not None:
            self.metrics.comfy_unknown.inc()
            if translation.unknown not in self._unknown_seen and len(self._unknown_seen) < 64:
                self._unknown_seen.add(translation.unknown)
                self.log.info("ComfyUI sent a message type the relay does not know; passed on as it is",
                              message_type=translation.unknown)  # fmt: skip
        self.apply(translation)

    def on_link_state(self, link: Link, state: State, attempt: int, reason: str | None) -> None:
        if state == "closed":
            return
        if not self.backends.pooled:
            self.publish([UpstreamEvent(state, attempt, reason)])
            return
        if state == "down" and reason is not None and "Refused" in reason:
            self.backends.failed(link.backend, reason)
        self.publish([UpstreamEvent(state, attempt, reason, backend=link.name)])

    async def on_connected(self, reconnected: bool, link: Link) -> None:
        adopted, link.adopted = link.adopted, False
        fresh, link.fresh = link.fresh, False
        if fresh and self.cluster is None:
            await self._find_orphans(link)
        if reconnected:
            self.metrics.upstream_reconnects.inc()
            self._check_routes(link)
            # ComfyUI may have been restarted as another version: read what it offers again.
            with contextlib.suppress(RelayError):
                await link.backend.comfy.capabilities(fresh=True)
        elif adopted:
            self._check_routes(
                link,
                "the relay that followed this prompt stopped without handing over its socket to "
                "ComfyUI; ComfyUI sends this prompt's progress there, so only its end can be reported",
            )
        if reconnected or adopted:
            await self.reconcile(on=link.name)

    def settle_lost(self, backend: Backend, reason: str) -> int:
        """``backend`` went away with prompts of this client on it: end them as lost."""
        ended = 0
        for prompt_id in self.prompts_on(backend.name):
            translation = self.translator.lost(prompt_id, reason, time.monotonic())
            ended += bool(translation.events)
            self.apply(translation)
        return ended

    async def _find_orphans(self, link: Link) -> None:
        """Follow the prompts of this client that ComfyUI still runs or holds but this relay
        does not know: a relay without Redis forgets them when it restarts. Their progress
        goes to the old relay's socket, so they are followed as detached prompts: announced
        (``relay.queued``, ``relay.detached``) and ended from ComfyUI's history."""
        comfy = link.backend.comfy
        try:
            items = await comfy.queue_items()
        except RelayError as exc:
            self.log.warning("could not look for prompts this relay forgot", reason=exc.message)
            return
        found: list[tuple[str, Any, Any, dict[str, Any]]] = []
        for item in items:
            number, prompt_id, graph = item[0], str(item[1]), item[2] if len(item) > 2 else None
            extra = item[3] if len(item) > 3 else None
            if not isinstance(extra, dict) or extra.get(CLIENT_KEY) != self.client_id:
                continue
            if isinstance(graph, dict) and not self.translator.knows(prompt_id):
                found.append((prompt_id, number, graph, extra))
        for prompt_id, number, graph, extra in found:
            try:
                classes = {str(node.get("class_type")) for node in graph.values() if isinstance(node, dict)}
                plan = build_plan(graph, await comfy.output_classes(classes))
                if self.deliveries is not None:
                    plan = replace(plan, delivery=self.deliveries.recover(extra))
            except RelayError as exc:
                self.log.warning(
                    "could not follow a forgotten prompt", prompt_id=prompt_id, reason=exc.message
                )
                continue
            now = time.monotonic()
            self.translator.register(prompt_id, plan, now)
            self.routes[prompt_id] = str(extra.get("client_id") or "")
            self._place(prompt_id, link.backend)
            self.apply(
                self.translator.accept(prompt_id, number if isinstance(number, (int, float)) else None, now)
            )
        if found:
            self.log.info("following prompts this relay had forgotten", prompt_ids=[f[0] for f in found])
            self._check_routes(
                link,
                "the relay restarted while this prompt was in ComfyUI's queue; ComfyUI sends its "
                "progress to the relay's old socket, so only its end can be reported",
            )

    def _attached(self, link: Link) -> set[str]:
        return {p for p in self.prompts_on(link.name) if p not in self.detached}

    def needs_watch(self, link: Link) -> bool:
        return bool(self._attached(link))

    async def on_silence(self, link: Link) -> bool:
        """Check on active prompts through HTTP; a prompt finished unseen means we were orphaned."""
        closed = await self.reconcile(only=self._attached(link))
        if closed:
            self.log.warning("prompts finished without a word on the socket; reopening it", closed=closed)
        return closed > 0

    async def _check_queue(self) -> None:
        await self.reconcile(removed=True)

    async def reconcile(
        self,
        *,
        removed: bool = False,
        only: set[str] | None = None,
        on: str | None = None,
        connected: bool = False,
    ) -> int:
        """Settle prompts that ended while the socket was away; returns how many it closed.

        With ``removed``, after a delete from ComfyUI's queue: a prompt that never started and
        is gone from the queue without a history entry was cancelled, not lost. With ``only``,
        just those prompts are looked at; with ``on``, those on that backend; with
        ``connected``, those whose backend this client's socket reaches now.
        """
        groups: dict[str, list[str]] = {}
        for prompt_id in self.translator.active():
            name = self._backend_name(prompt_id)
            if (
                name is None
                or (only is not None and prompt_id not in only)
                or (on is not None and name != on)
            ):
                continue
            if connected:
                link = self.links.get(name)
                if link is None or link.upstream.state != "connected":
                    continue
            groups.setdefault(name, []).append(prompt_id)
        closed = 0
        for name, prompt_ids in groups.items():
            backend = self.backends.get(name)
            if backend is None:
                continue
            try:
                fates = await backend.comfy.fates(prompt_ids)
            except RelayError as exc:
                self.log.warning("could not reconcile prompts", reason=exc.message, backend=name)
                continue
            closed += self._settle(fates, removed=removed)
        return closed

    def _settle(self, fates: dict[str, Any], *, removed: bool) -> int:
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

    async def remote_snapshots(self) -> list[Snapshot]:
        """Snapshots of the prompts another relay follows for this client, from their records."""
        if self.redis_log is None:
            return []
        try:
            records = await self.redis_log.records()
        except (RedisError, OSError):
            return []
        scratch = Translator(file_url=self._file_url, preview_url=self.previews.url)
        now, wall = time.monotonic(), time.time()
        runs: list[tuple[float, str]] = []
        for prompt_id, text in records.items():
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                run = orjson.loads(text)["run"]
                if scratch.adopt(prompt_id, run, now, wall):
                    runs.append((float(run.get("registered_at") or 0), prompt_id))
        snapshots = (scratch.snapshot(prompt_id, now) for _, prompt_id in sorted(runs))
        return [snapshot for snapshot in snapshots if snapshot is not None]

    def snapshots(self) -> Iterator[Snapshot]:
        now = time.monotonic()
        for prompt_id in self.translator.active():
            snapshot = self.translator.snapshot(prompt_id, now)
            if snapshot is not None:
                yield snapshot


class Sessions:
    """Every client's session, and the reaper that closes idle upstream sockets.

    With Redis, the sessions are this relay's part of a cluster (:class:`relay.cluster.Cluster`):
    each client is held by one relay and followed by the others.
    """

    def __init__(
        self,
        config: RelayConfig,
        backends: Backends,
        durations: Estimates | None = None,
        metrics: Metrics | None = None,
        *,
        observers: Sequence[Observer] = (),
        learn: Callable[[StepTiming], None] | None = None,
        redis: Redis | None = None,
        deliveries: Deliveries | None = None,
    ) -> None:
        self.config = config
        self.backends = backends
        backends.on_lost(self._backend_lost)
        self.redis = redis
        self.durations = durations
        self.metrics = metrics or Metrics()
        self.observers = tuple(observers)
        self.learn = learn
        self.deliveries = deliveries
        self._sessions: dict[str, ClientSession] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.cluster: Cluster | None = None
        if redis is not None:
            from relay.cluster import Cluster  # noqa: PLC0415 - it names sessions in its types

            self.cluster = Cluster(redis, config, sessions=self.__iter__, find=self.find, get=self.get)

    def get(self, client_id: str) -> ClientSession:
        session = self._sessions.get(client_id)
        if session is None:
            session = self._sessions[client_id] = ClientSession(
                client_id,
                self.config,
                self.backends,
                self.durations,
                self.metrics,
                observers=self.observers,
                learn=self.learn,
                deliveries=self.deliveries,
            )
            if self.redis is not None and self.cluster is not None:
                config = self.config
                stream = RedisLog(self.redis, client_id, ring_size=config.ring_size,
                                  ttl=config.redis_event_ttl, lease_ttl=config.lease_ttl)  # fmt: skip
                lease = Lease(self.redis, client_id, ttl=config.lease_ttl, holder=self.cluster.replica)
                session.join(self.cluster, stream, lease)
        return session

    def find(self, client_id: str) -> ClientSession | None:
        return self._sessions.get(client_id)

    def _backend_lost(self, backend: Backend, reason: str) -> None:
        """A backend went away: every prompt on it ends as lost (the relays holding the clients
        do it; a follower's tabs hear it from them)."""
        ended = sum(session.settle_lost(backend, reason) for session in self if session.owned)
        if ended:
            log.warning("prompts ended as lost with their backend", backend=backend.name, prompts=ended)

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
        if self.cluster is not None:
            self.cluster.start()

    async def _reap_forever(self) -> None:
        interval = max(0.05, min(1.0, self.config.upstream_grace / 4))
        while True:
            await asyncio.sleep(interval)
            await self.reap(time.monotonic())

    async def reap(self, now: float) -> None:
        for session in list(self._sessions.values()):
            if self.backends.pooled:
                await session.reap_links(now)
            if session.needed:
                session.idle_since = None
                continue
            if session.idle_since is None:
                session.idle_since = now
            idle = now - session.idle_since
            if idle >= self.config.upstream_grace and session.upstream_running:
                session.log.info("closing idle upstream socket", idle=round(idle, 1))
                await session.close_links()
                if session.role == "owner":
                    await session.release()
            if idle >= self.config.session_ttl:
                del self._sessions[session.client_id]
                await session.close()
                session.forget()

    async def close(self) -> None:
        await stop(self._reaper)
        if self.cluster is not None:
            await self.cluster.stop_ticking()
        await asyncio.gather(*(self._close(s) for s in self._sessions.values()))
        if self.cluster is not None:
            await self.cluster.close()

    async def _close(self, session: ClientSession) -> None:
        """Close a session at shutdown, within a bound: a stop must not wait on one client."""
        try:
            async with asyncio.timeout(_CLOSE_LIMIT):
                await session.close()
        except TimeoutError:
            session.log.warning("client not closed cleanly in time at shutdown", limit=_CLOSE_LIMIT)
        except Exception:  # one client's failure must not keep the others from closing
            session.log.exception("client not closed cleanly at shutdown")


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
        for link in session.links.values():
            if link.upstream.state in live.upstreams:
                live.upstreams[link.upstream.state] += 1
        if session.role in live.roles:
            live.roles[session.role] += 1
        queued_ids = session.translator.queued()
        for prompt_id in session.translator.active():
            live.prompts["queued" if prompt_id in queued_ids else "running"] += 1
    return live
