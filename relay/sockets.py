"""``/ws``: the relay's socket protocol for browsers, wscat and ComfyUI-style clients.

A socket names its client (``clientId``), the events it wants (``events=relay|comfy|all``),
where to resume (``since``/``epoch``) and its language (``lang``). It is greeted with
``relay.hello`` and either the events it missed or a snapshot of each active prompt, then
joins the client's channel. The socket is read-only: only a ComfyUI-style ``feature_flags``
first message means anything; anything else a relay-events socket sends gets a
``relay.error``. Refusals (bad parameters, limits, shutdown) go through the error boundary.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import NamedTuple

import orjson
import structlog
from redis.exceptions import RedisError
from starlette.websockets import WebSocket

from relay import __version__
from relay.asgi import RAW_SEND, choose_subprotocol
from relay.errors import BadRequest, RelayError, ShuttingDown, TooManyConnections, refuse_socket
from relay.events import Error, Hello
from relay.fanout import Mode, Outgoing, Subscriber
from relay.i18n import LANGUAGES
from relay.routing import CLIENT_ID
from relay.sessions import ClientSession
from relay.state import Lifespan, RelayState

__all__ = ["relay_socket"]

log = structlog.get_logger("relay.socket")

_MODES: tuple[Mode, ...] = ("relay", "comfy", "all")


class SocketParams(NamedTuple):
    client_id: str | None
    mode: Mode
    since: int | None
    epoch: str | None
    lang: str | None


def _socket_params(websocket: WebSocket[Lifespan]) -> SocketParams:
    """clientId, events, since, epoch and lang from the query string.

    Raises:
        BadRequest: a parameter is malformed.
    """
    query = websocket.query_params
    client_id = query.get("clientId")
    if client_id is not None and not CLIENT_ID.fullmatch(client_id):
        raise BadRequest("clientId must be 1-64 characters of A-Z, a-z, 0-9, _ and -", "bad_client_id")
    events = query.get("events", "relay")
    if events not in _MODES:
        raise BadRequest("events must be relay, comfy or all", "bad_events")
    since: int | None = None
    if "since" in query:
        try:
            since = int(query["since"])
        except ValueError:
            raise BadRequest(
                "since must be a whole number (the last seq you received)", "bad_since"
            ) from None
        if since < 0:
            raise BadRequest("since must not be negative", "bad_since")
    lang = query.get("lang")
    if lang is not None and lang not in LANGUAGES:
        raise BadRequest(f"lang must be one of {', '.join(LANGUAGES)}", "bad_lang")
    mode: Mode = "relay" if events == "relay" else "comfy" if events == "comfy" else "all"
    return SocketParams(client_id, mode, since, query.get("epoch"), lang)


def _admit(state: RelayState, client_id: str) -> None:
    """Raises the error that refuses this socket, if any: shutdown or a connection limit."""
    config = state.config
    if state.closing:
        raise ShuttingDown("the relay is shutting down; reconnect shortly")
    if state.connections >= config.max_connections:
        state.metrics.refused.labels("connections_total").inc()
        log.warning("socket refused: connection limit", client_id=client_id, limit=config.max_connections)
        raise TooManyConnections("the relay has too many open sockets; retry later")
    existing = state.sessions.find(client_id)
    if existing is not None and len(existing.channel.subscribers) >= config.max_connections_per_client:
        state.metrics.refused.labels("connections_per_client").inc()
        log.info("socket refused: per-client limit", client_id=client_id,
                 limit=config.max_connections_per_client)  # fmt: skip
        raise TooManyConnections(
            f"this client id already has {config.max_connections_per_client} open sockets"
        )


async def relay_socket(websocket: WebSocket[Lifespan]) -> None:
    state = websocket.state["relay"]
    try:
        params = _socket_params(websocket)
        client_id = params.client_id or uuid.uuid4().hex
        _admit(state, client_id)
    except RelayError as error:
        await refuse_socket(websocket, error)
        return
    await websocket.accept(subprotocol=choose_subprotocol(websocket.scope.get("subprotocols") or []))
    state.connections += 1
    try:
        with structlog.contextvars.bound_contextvars(client_id=client_id):
            await _serve_socket(state, websocket, client_id, params)
    finally:
        state.connections -= 1


async def _serve_socket(
    state: RelayState, websocket: WebSocket[Lifespan], client_id: str, params: SocketParams
) -> None:
    session = state.sessions.get(client_id)
    await session.ready()
    subscriber = Subscriber(
        websocket,
        mode=params.mode,
        limit=state.config.subscriber_queue,
        send=websocket.scope.get(RAW_SEND),
        lang=params.lang,
    )
    session.start_upstream()
    upstream = await _upstream_state(session)
    # The replay (or the snapshots) read the ring last; from there to joining the channel
    # nothing awaits, so the tab misses nothing and gets nothing twice.
    replay = None
    if params.since is not None and params.epoch in (None, session.channel.epoch):
        replay = await session.channel.replay(params.since, params.lang)
    snapshots: list[str] = []
    at = None
    if replay is None and subscriber.wants_relay:
        snapshots, at = await _snapshots(session, params.lang)
    _greet(session, subscriber, params, replay, snapshots, upstream, at)
    # Greeting and replay were queued with no await since reading the ring: joining now
    # leaves neither a gap nor a duplicate between replayed and live events.
    session.add(subscriber)
    subscriber.start()
    if subscriber.wants_comfy:
        await session.ask_for_raw()
    log.info("client connected", events=params.mode, since=params.since, lang=params.lang)
    try:
        await _read_client(session, subscriber)
    finally:
        session.remove(subscriber)
        subscriber.stop()
        state.metrics.retire(
            coalesced=subscriber.coalesced, dropped=subscriber.dropped, overflowed=subscriber.overflowed
        )
        log.info("client disconnected", coalesced=subscriber.coalesced, dropped=subscriber.dropped)


async def _upstream_state(session: ClientSession) -> str:
    """The state of the client's ComfyUI socket, as ``relay.hello`` names it. On a relay that
    follows another: connected while some relay holds the client."""
    if session.owned:
        return session.upstream_state()
    with contextlib.suppress(RedisError, OSError):
        return "connected" if await session.lease_current() is not None else "connecting"
    return "down"


async def _snapshots(session: ClientSession, lang: str | None) -> tuple[list[str], int]:
    """Each active prompt's state for a tab that cannot resume, then the events delivered while
    it was read (on a relay following another, the prompts' state is read from Redis); and the
    seq the snapshots are as of."""
    channel = session.channel
    seq = channel.seq
    if session.owned:
        return [channel.stamp(snapshot, lang=lang) for snapshot in session.snapshots()], seq
    snapshots = [channel.stamp(snapshot, seq=seq, lang=lang) for snapshot in await session.remote_snapshots()]
    return snapshots + (channel.since(seq, lang) or []), seq


def _greet(  # noqa: PLR0917 - one call site, every argument a different thing
    session: ClientSession,
    subscriber: Subscriber,
    params: SocketParams,
    replay: list[str] | None,
    snapshots: list[str],
    upstream: str,
    at: int | None,
) -> None:
    channel = session.channel
    lang, since = subscriber.lang, params.since
    resumed = replay is not None
    if since is not None:
        session.metrics.resumes.labels("replayed" if resumed else "gap").inc()
        if replay:
            session.metrics.replayed.inc(len(replay))
    if subscriber.wants_relay:
        hello = Hello(
            upstream=upstream,
            resumed=resumed,
            version=__version__,
            epoch=channel.epoch,
            assigned=params.client_id is None,
            missed=len(replay) if replay is not None else None,
        )
        subscriber.preload(channel.stamp(hello, seq=at, lang=lang))
        for payload in replay if replay is not None else snapshots:
            subscriber.preload(payload)
    if subscriber.wants_comfy:
        remaining = session.translator.queue_remaining or 0
        status = {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": session.client_id},
        }
        subscriber.preload(orjson.dumps(status).decode())


async def _read_client(session: ClientSession, subscriber: Subscriber) -> None:
    """Read what the client sends; only a ComfyUI-style feature_flags first message means anything."""
    websocket = subscriber.websocket
    first = True
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            continue
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            data = None
        if (
            first
            and subscriber.wants_comfy
            and isinstance(data, dict)
            and data.get("type") == "feature_flags"
        ):
            flags = data.get("data")
            subscriber.legacy_previews = not (
                isinstance(flags, dict) and flags.get("supports_preview_metadata")
            )
            reply = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
            subscriber.offer(Outgoing(orjson.dumps(reply).decode()))
        elif subscriber.wants_relay:
            code = "invalid_json" if data is None else "unsupported_message"
            error = Error(code, "the relay does not take commands on this socket")
            subscriber.offer(Outgoing(session.channel.stamp(error)))
        first = False
