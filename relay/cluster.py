"""Several relays sharing Redis: who holds which client, news of new events, requests passed on.

With ``RELAY_REDIS_URL`` every relay is a replica. For each client one of them, the holder of
the client's lease (``relay.lease``), keeps the ComfyUI socket, translates and writes the
client's events to its stream (``relay.eventlog``); the others serve their tabs of that client
from the stream. This module is each relay's part in that:

* a background tick renews the leases this relay holds, lets a relay with tabs of a client
  nobody holds take it, and takes over clients with prompts in flight that nobody holds (a
  relay that died), so that every prompt still ends;
* one pub/sub subscription on :data:`relay.eventlog.NOTIFY` brings the relay's followed clients
  their new events; one that missed some, or after Redis was away, catches up from the stream;
* a request that only the holder can serve (submitting a prompt, a live preview) is passed on
  to the holder over HTTP, at the address each relay publishes (``RELAY_ADVERTISE_URL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from relay.config import RelayConfig
from relay.errors import UpstreamUnavailable
from relay.eventlog import NOTIFY, parse_notice
from relay.tasks import stop

if TYPE_CHECKING:
    from relay.sessions import ClientSession

__all__ = ["FORWARDED", "Cluster", "advertised_url", "pack_raw", "unpack_raw"]

log = structlog.get_logger("relay.cluster")

# Marks a request one relay passed on to another: the receiver serves it itself or refuses it.
FORWARDED = "x-relay-forwarded-by"
# Clients with prompts in flight: checked for ones nobody holds (their relay died).
IN_FLIGHT = "relay:inflight"
# ComfyUI's frames as received, for tabs with events=comfy|all on relays that follow the client:
# published only for clients some follower has such tabs for (see :meth:`Cluster.want_raw`).
RAW = "relay:raw"
_NOTIFY = NOTIFY.encode()
# Leases renewed at once by a tick (each one round trip to Redis).
_TENDING = 32
# Request headers a forwarded request keeps (the rest are the hop's own). Not the token (taken
# out of the request by the access rules) nor the Origin (checked against this relay's own
# host): the relay that passes a request on has checked both, and vouches with the token.
_KEEP = ("content-type", "x-client-id", "x-request-id", "accept-language")


def pack_raw(
    client_id: str, payload: str | bytes, key: tuple[Any, ...] | None, legacy: bytes | None
) -> bytes:
    """A ComfyUI frame for :data:`RAW`: a JSON header line, the frame, then its legacy form."""
    body = payload.encode() if isinstance(payload, str) else payload
    header = {"c": client_id, "t": isinstance(payload, str), "k": key, "n": len(body)}
    return orjson.dumps(header) + b"\n" + body + (legacy or b"")


def unpack_raw(data: bytes) -> tuple[str, str | bytes, tuple[Any, ...] | None, bytes | None] | None:
    """``(client, frame, key, legacy)`` from :func:`pack_raw`'s bytes; None when malformed."""
    head, sep, rest = data.partition(b"\n")
    try:
        header = orjson.loads(head)
        client_id, text, key, size = header["c"], header["t"], header["k"], int(header["n"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if not sep or not isinstance(client_id, str) or size > len(rest):
        return None
    body, legacy = rest[:size], rest[size:] or None
    frame: str | bytes = body.decode(errors="replace") if text else body
    return client_id, frame, tuple(key) if isinstance(key, list) else None, legacy


def advertised_url(config: RelayConfig) -> str:
    """Where other relays reach this one: RELAY_ADVERTISE_URL, else this host's address."""
    if config.advertise_url:
        return config.advertise_url
    host = config.host
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a listen address, not a bind
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"http://{host}:{config.port}"


class Cluster:
    """This relay's part among the replicas that share one Redis."""

    def __init__(
        self,
        redis: Redis,
        config: RelayConfig,
        *,
        sessions: Callable[[], Iterable[ClientSession]],
        find: Callable[[str], ClientSession | None],
        get: Callable[[str], ClientSession],
    ) -> None:
        self.redis = redis
        # Pub/sub carries ComfyUI's binary frames too: a client that leaves replies as bytes.
        self.bus = Redis.from_url(
            config.redis_url, socket_timeout=None, socket_connect_timeout=3.0, health_check_interval=30
        )
        self.config = config
        self.replica = f"{socket.gethostname()[:40]}-{secrets.token_hex(3)}"
        self.url = advertised_url(config)
        self._sessions, self._find, self._get = sessions, find, get
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._listener: asyncio.Task[None] | None = None
        self._raw: deque[bytes] = deque(maxlen=1024)
        self._raw_sender: asyncio.Task[None] | None = None
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(config.http_read_timeout, connect=3.0))
        # When Redis last failed this relay: a client's holder gets a lease period to take its
        # lease back before others may (it has the client's state; a restarted Redis has not).
        self.unreachable_at: float | None = None
        self.interval = config.lease_ttl / 4

    def polite(self) -> bool:
        """Whether this relay should leave free leases alone for now (Redis was just away)."""
        since = self.unreachable_at
        return since is not None and time.monotonic() - since < self.config.lease_ttl * 1.5

    def failed(self) -> None:
        self.unreachable_at = time.monotonic()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._tick_forever(), name="relay-cluster-tick")]

    def listen(self) -> None:
        """Follow the notices (a session became a follower); a no-op while already following."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="relay-cluster-listen")

    def _quiet(self) -> None:
        """Stop following the notices while this relay follows no client: a relay that only
        holds clients would otherwise read every one of its own writes back."""
        listener = self._listener
        if listener is not None and not any(not session.owned for session in self._sessions()):
            self._listener = None
            listener.cancel()

    async def stop_ticking(self) -> None:
        """Stop tending leases and following notices (shutdown: the sessions hand over next)."""
        tasks = [*self._tasks, *([self._listener] if self._listener is not None else [])]
        self._tasks, self._listener = [], None
        self._stopping = True  # a tick that missed its cancellation ends at its next turn
        for task in tasks:
            await stop(task)

    async def close(self) -> None:
        await self.stop_ticking()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(self._replica_key(self.replica))
        await self._http.aclose()
        await self.bus.aclose()

    @staticmethod
    def _replica_key(replica: str) -> str:
        return f"relay:replica:{replica}"

    # Leases -----------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except (RedisError, OSError) as exc:
                self.failed()
                log.warning("cluster tick failed: Redis unreachable", error=str(exc))
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        """Say this relay is alive, tend every client's lease, adopt the clients nobody holds."""
        await self.redis.set(self._replica_key(self.replica), self.url, px=int(self.config.lease_ttl * 3000))
        # Many clients: their leases are tended a few at a time, not one round trip after another.
        gate = asyncio.Semaphore(_TENDING)

        async def tend(session: ClientSession) -> None:
            async with gate:
                await session.tend()

        await asyncio.gather(*(tend(session) for session in list(self._sessions())))
        self._quiet()
        if self.polite():
            return
        for member in await self.redis.smembers(IN_FLIGHT):
            client_id = str(member)
            known = self._find(client_id)
            if known is not None and known.owned:
                continue
            if await self.redis.exists(f"relay:lease:{{{client_id}}}"):
                continue
            if not await self.redis.exists(f"relay:{{{client_id}}}:prompts"):
                await self.redis.srem(IN_FLIGHT, client_id)
                continue
            log.info("taking over a client with prompts in flight that no relay holds", client_id=client_id)
            session = self._get(client_id)
            await session.ready()
            await session.tend(want=True)

    async def mark_in_flight(self, client_id: str, in_flight: bool) -> None:
        if in_flight:
            await self.redis.sadd(IN_FLIGHT, client_id)
        else:
            await self.redis.srem(IN_FLIGHT, client_id)

    # News of new events ------------------------------------------------------------------

    async def _listen(self) -> None:
        """Follow :data:`NOTIFY` and :data:`RAW`; after every (re)subscription each followed
        client catches up from its stream."""
        delay = 0.1
        while True:
            pubsub = self.bus.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(NOTIFY, RAW)
                for session in list(self._sessions()):
                    session.notified(None, None)  # whatever came while nobody listened
                delay = 0.1
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["channel"], message["data"])
            except (RedisError, OSError) as exc:
                self.failed()
                log.warning(
                    "lost the event notices from Redis; resubscribing", error=str(exc), retry_in=delay
                )
            finally:
                with contextlib.suppress(RedisError, OSError, RuntimeError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel == _NOTIFY:
            # Most notices are of clients this relay holds (its own writes) or does not serve:
            # the client id, first on the line, is read before anything else.
            following = self._find(data[: data.find(b" ")].decode(errors="replace"))
            if following is not None and not following.owned:
                notice = parse_notice(data)
                if notice is not None:
                    following.notified(notice.epoch, notice.last, notice)
            return
        raw = unpack_raw(data)
        if raw is not None:
            following = self._find(raw[0])
            if following is not None and not following.owned:
                following.channel.publish_raw(raw[1], key=raw[2], legacy=raw[3])

    # ComfyUI's frames for other relays' raw tabs ---------------------------------------------

    async def want_raw(self, client_id: str) -> None:
        """This relay has tabs of ``client_id`` that want ComfyUI's frames: ask the holder for them."""
        await self.redis.set(
            f"relay:{{{client_id}}}:rawtabs", self.replica, px=int(self.config.lease_ttl * 3000)
        )

    async def raw_wanted(self, client_id: str) -> bool:
        return bool(await self.redis.exists(f"relay:{{{client_id}}}:rawtabs"))

    def publish_raw(
        self, client_id: str, payload: str | bytes, key: tuple[Any, ...] | None, legacy: bytes | None
    ) -> None:
        """Send a ComfyUI frame to the other relays (in order, without waiting)."""
        self._raw.append(pack_raw(client_id, payload, key, legacy))
        if self._raw_sender is None or self._raw_sender.done():
            self._raw_sender = asyncio.create_task(self._send_raw(), name="relay-cluster-raw")

    async def _send_raw(self) -> None:
        while self._raw:
            batch = list(self._raw)
            self._raw.clear()
            try:
                pipe = self.bus.pipeline(transaction=False)
                for frame in batch:
                    pipe.publish(RAW, frame)
                await pipe.execute()
            except (RedisError, OSError) as exc:
                self.failed()
                log.debug("raw frames not sent to the other relays", error=str(exc), frames=len(batch))

    # Requests only the holder can serve ------------------------------------------------------

    async def holder_url(self, client_id: str) -> str | None:
        """The address of the relay holding the client, if another relay holds it."""
        token = await self.redis.get(f"relay:lease:{{{client_id}}}")
        holder = token.rpartition(":")[0] if isinstance(token, str) else None
        if holder is None or holder == self.replica:
            return None
        url = await self.redis.get(self._replica_key(holder))
        return str(url) if url else None

    async def pass_on(
        self, request: Request[Any], client_id: str, *, path: str, body: bytes | None
    ) -> Response:
        """One attempt to have the holder of ``client_id`` answer the request.

        Raises:
            UpstreamUnavailable: no other relay holds the client, or it did not answer
                (``kind`` ``client_moved`` when it no longer holds it).
        """
        try:
            url = await self.holder_url(client_id)
        except (RedisError, OSError) as exc:
            self.failed()
            raise UpstreamUnavailable(f"Redis is unreachable: {exc}") from None
        if url is None:
            raise UpstreamUnavailable("no relay holds this client", "client_moved")
        headers = {name: value for name, value in request.headers.items() if name in _KEEP}
        headers[FORWARDED] = self.replica
        if self.config.token:
            headers["authorization"] = f"Bearer {self.config.token}"
        try:
            answer = await self._http.request(
                request.method, f"{url}{path}", content=body, headers=headers, params=request.query_params
            )
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"the relay holding this client did not answer ({exc.__class__.__name__})"
            ) from None
        if answer.status_code == 503 and b"client_moved" in answer.content[:200]:
            raise UpstreamUnavailable("the client moved to another relay", "client_moved")
        kept = {
            name: value for name, value in answer.headers.items() if name in ("cache-control", "retry-after")
        }
        return Response(
            answer.content,
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type"),
            headers=kept,
        )

    async def forward(
        self, request: Request[Any], session: ClientSession, *, path: str, body: bytes | None = None
    ) -> Response | None:
        """Have the relay holding ``session``'s client answer the request, retrying while the
        client changes hands; None when this relay came to hold the client (serve it here).

        Raises:
            UpstreamUnavailable: no relay could serve it in time.
        """
        if request.headers.get(FORWARDED):
            # Passed on to this relay, which does not hold the client: the sender retries.
            raise UpstreamUnavailable("this client's relay changed; retry", "client_moved")
        deadline = time.monotonic() + self.config.upstream_connect_timeout
        reason = "no relay holds this client"
        while True:
            await session.ready()
            if session.owned:
                return None
            try:
                return await self.pass_on(request, session.client_id, path=path, body=body)
            except UpstreamUnavailable as exc:
                reason = exc.message
            if time.monotonic() >= deadline:
                raise UpstreamUnavailable(f"could not reach the relay serving this client: {reason}")
            await asyncio.sleep(0.2)
