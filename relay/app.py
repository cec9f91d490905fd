"""The relay's ASGI app: ``/ws`` for browsers, ``POST /prompt``, previews, health, metrics.

The lifespan owns every long-lived resource (the HTTP client to ComfyUI, the client
sessions and their sockets) and closes them in order. In front of the routes, outermost
first: request ids, access logs and HTTP metrics (:mod:`relay.telemetry`); CORS, when
origins are allowed; the token, origin and request-limit rules (:mod:`relay.access`).
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from relay import __version__
from relay.access import AccessControl, choose_subprotocol
from relay.comfy import ComfyClient
from relay.config import RelayConfig
from relay.errors import (
    CLOSE_BAD_REQUEST,
    CLOSE_GOING_AWAY,
    CLOSE_TOO_MANY,
    BadRequest,
    PayloadTooLarge,
    RelayError,
    error_response,
)
from relay.eta import Durations, durations_file
from relay.fanout import RAW_SEND, Mode, Outgoing, RawSend, Subscriber
from relay.health import Readiness
from relay.i18n import LANGUAGES, Localized
from relay.metrics import CONTENT_TYPE, Metrics, workflow_label
from relay.page import page_routes
from relay.plans import build_plan, failed_outputs
from relay.proxy import proxy_routes
from relay.routing import routed_prompt
from relay.sessions import ClientSession, Sessions
from relay.streaming import StreamingClient
from relay.telemetry import Telemetry
from relay.uploads import upload_routes
from relay.workflows import Library, Workflow, default_folder

__all__ = ["RelayState", "create_app"]

log = structlog.get_logger("relay.app")

CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MODES: tuple[Mode, ...] = ("relay", "comfy", "all")


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class RelayState:
    """What the lifespan creates and closes; reachable as ``app.state.relay``."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.comfy = ComfyClient(config)
        folder = Path(config.workflows_dir) if config.workflows_dir else default_folder()
        self.workflows = Library.load(folder)
        self.streams = StreamingClient(
            config.comfyui_url,
            connect_timeout=config.http_connect_timeout,
            read_timeout=config.http_read_timeout,
            max_connections=config.http_max_connections,
        )
        self.durations = Durations(durations_file(config.eta_file))
        self.metrics = Metrics()
        self.sessions = Sessions(config, self.comfy, self.durations, self.metrics)
        self.metrics.watch(lambda: self.sessions)
        self.readiness = Readiness(self.comfy, self.metrics, timeout=config.ready_timeout)
        # Browser sockets open now (RELAY_MAX_CONNECTIONS).
        self.connections = 0
        self.closing = False

    async def start(self) -> None:
        self.sessions.start()

    async def close_clients(self, code: int = CLOSE_GOING_AWAY) -> None:
        """Close every browser socket (shutdown); called before the server drops connections."""
        self.closing = True
        for session in self.sessions:
            for subscriber in list(session.channel.subscribers):
                await subscriber.close(code, "relay shutting down")

    async def stop(self) -> None:
        await self.close_clients()
        await self.sessions.close()
        await self.comfy.aclose()
        self.durations.save()
        await self.streams.aclose()


# WebSocket ---------------------------------------------------------------------------------


class SocketParams(NamedTuple):
    client_id: str | None
    mode: Mode
    since: int | None
    epoch: str | None
    lang: str | None


def _socket_params(websocket: WebSocket) -> SocketParams:
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


async def _refuse(websocket: WebSocket, code: int, kind: str, message: str) -> None:
    """Accept, say why in a ``relay.error`` frame (browsers see no handshake refusal), close."""
    await websocket.accept(subprotocol=choose_subprotocol(websocket.scope.get("subprotocols") or []))
    error = {"type": "relay.error", "code": kind, "message": message}
    await websocket.send_text(orjson.dumps(error).decode())
    await websocket.close(code, message[:120])


async def relay_socket(websocket: WebSocket) -> None:
    state: RelayState = websocket.app.state.relay
    config = state.config
    try:
        params = _socket_params(websocket)
    except BadRequest as problem:
        await _refuse(websocket, CLOSE_BAD_REQUEST, problem.kind, problem.message)
        return
    if state.closing:
        await websocket.close(CLOSE_GOING_AWAY)
        return
    assigned = params.client_id is None
    client_id = params.client_id or uuid.uuid4().hex
    existing = state.sessions.find(client_id)
    if state.connections >= config.max_connections:
        state.metrics.refused.labels("connections_total").inc()
        log.warning("socket refused: connection limit", client_id=client_id, limit=config.max_connections)
        await _refuse(websocket, CLOSE_TOO_MANY, "too_many_connections",
                      "the relay has too many open sockets; retry later")  # fmt: skip
        return
    if existing is not None and len(existing.channel.subscribers) >= config.max_connections_per_client:
        state.metrics.refused.labels("connections_per_client").inc()
        log.info("socket refused: per-client limit", client_id=client_id,
                 limit=config.max_connections_per_client)  # fmt: skip
        message = f"this client id already has {config.max_connections_per_client} open sockets"
        await _refuse(websocket, CLOSE_TOO_MANY, "too_many_connections", message)
        return
    await websocket.accept(subprotocol=choose_subprotocol(websocket.scope.get("subprotocols") or []))
    state.connections += 1
    try:
        with structlog.contextvars.bound_contextvars(client_id=client_id):
            await _serve_socket(state, websocket, client_id, params, assigned=assigned)
    finally:
        state.connections -= 1


async def _serve_socket(
    state: RelayState, websocket: WebSocket, client_id: str, params: SocketParams, *, assigned: bool
) -> None:
    mode, since, lang = params.mode, params.since, params.lang
    session = state.sessions.get(client_id)
    subscriber = Subscriber(
        websocket,
        mode=mode,
        limit=state.config.subscriber_queue,
        send=websocket.scope.get(RAW_SEND),
        lang=lang,
    )
    session.upstream.start()
    _greet(session, subscriber, since=since, epoch=params.epoch, assigned=assigned)
    # Greeting and replay were queued with no await since reading the ring: joining now
    # leaves neither a gap nor a duplicate between replayed and live events.
    session.add(subscriber)
    subscriber.start()
    log.info("client connected", events=mode, since=since, lang=lang)
    try:
        await _read_client(session, subscriber)
    finally:
        session.remove(subscriber)
        subscriber.stop()
        state.metrics.retire(subscriber)
        log.info("client disconnected", coalesced=subscriber.coalesced, dropped=subscriber.dropped)


def _greet(
    session: ClientSession, subscriber: Subscriber, *, since: int | None, epoch: str | None, assigned: bool
) -> None:
    channel = session.channel
    lang = subscriber.lang
    replay = channel.since(since, lang) if since is not None and epoch in (None, channel.epoch) else None
    resumed = replay is not None
    if since is not None:
        session.metrics.resumes.labels("replayed" if resumed else "gap").inc()
        if replay:
            session.metrics.replayed.inc(len(replay))
    if subscriber.wants_relay:
        upstream = session.upstream.state
        hello = {
            "type": "relay.hello",
            "upstream": "down" if upstream == "closed" else upstream,
            "resumed": resumed,
            "version": __version__,
            "epoch": channel.epoch,
            "assigned": assigned,
            "missed": len(replay) if replay is not None else None,
        }
        subscriber.offer(Outgoing(channel.stamp(hello, lang=lang)))
        if replay is not None:
            for payload in replay:
                subscriber.offer(Outgoing(payload))
        else:
            for snapshot in session.snapshots():
                subscriber.offer(Outgoing(channel.stamp(snapshot, lang=lang)))
    if subscriber.wants_comfy:
        remaining = session.translator.queue_remaining or 0
        status = {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": session.client_id},
        }
        subscriber.offer(Outgoing(orjson.dumps(status).decode()))


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
            error = {
                "type": "relay.error",
                "code": code,
                "message": "the relay does not take commands on this socket",
            }
            subscriber.offer(Outgoing(session.channel.stamp(error)))
        first = False


# HTTP ----------------------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _client_id_of(request: Request, body: dict[str, Any]) -> str:
    """The client id from the body, else X-Client-Id, else ?clientId=; a new one if none."""
    for candidate in (
        body.get("client_id"),
        request.headers.get("x-client-id"),
        request.query_params.get("clientId"),
    ):
        if candidate is None or candidate == "":
            continue
        if not isinstance(candidate, str) or not CLIENT_ID.fullmatch(candidate):
            raise BadRequest("client_id must be 1-64 characters of A-Z, a-z, 0-9, _ and -", "bad_client_id")
        return candidate
    return uuid.uuid4().hex


async def _json_object(request: Request, limit: int) -> dict[str, Any]:
    raw = await _read_body(request, limit)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", "invalid_body")
    return body


async def post_prompt(request: Request) -> Response:
    state: RelayState = request.app.state.relay
    body = await _json_object(request, state.config.max_prompt_bytes)
    if "prompt" not in body:
        raise BadRequest("no prompt: the body needs a 'prompt' object (an API-format graph)", "no_prompt")
    graph = body["prompt"]
    if not isinstance(graph, dict) or not all(isinstance(node, dict) for node in graph.values()):
        raise BadRequest("'prompt' must be an object of nodes (an API-format graph)", "invalid_prompt")
    workflow = state.workflows.recognise(graph, body.get("extra_data"))
    return await _submit(request, body, graph, workflow)


async def post_workflow_prompt(request: Request) -> Response:
    """Fill a workflow's template with ``params`` and submit it as POST /prompt does."""
    state: RelayState = request.app.state.relay
    name = request.path_params["name"]
    workflow = state.workflows.get(name)
    if workflow is None:
        return _json({"error": {"type": "not_found", "message": f"no workflow named {name!r}"}}, 404)
    body = await _json_object(request, state.config.max_prompt_bytes)
    params = body.pop("params", {})
    if not isinstance(params, dict):
        raise BadRequest("'params' must be an object of parameter values", "bad_parameter")
    if "prompt" in body:
        raise BadRequest("the workflow is the graph: send 'params', not 'prompt'", "invalid_body")
    graph = workflow.fill(params)
    extra = body.get("extra_data")
    body["extra_data"] = {**(extra if isinstance(extra, dict) else {}), "workflow": workflow.name}
    body["prompt"] = graph
    return await _submit(request, body, graph, workflow)


def _step_names(workflow: Workflow | None, language: str) -> dict[str, Localized] | None:
    if workflow is None:
        return None
    return {node: Localized(texts, language) for node, texts in workflow.steps.items()}


async def _submit(
    request: Request, body: dict[str, Any], graph: dict[str, Any], workflow: Workflow | None
) -> Response:
    state: RelayState = request.app.state.relay
    client_id = _client_id_of(request, body)
    prompt_id = str(body.get("prompt_id") or uuid.uuid4())
    names = _step_names(workflow, state.config.language)
    workflow_name = workflow.name if workflow is not None else None
    session = state.sessions.get(client_id)
    session.registering += 1
    try:
        await session.ensure_upstream()
        classes = {str(node.get("class_type")) for node in graph.values()}
        output_classes = await state.comfy.output_classes(classes)
        targets = body.get("partial_execution_targets")
        plan = build_plan(graph, output_classes, targets=targets, names=names, workflow=workflow_name)
        session.translator.register(prompt_id, plan, time.monotonic())
        forward = routed_prompt({**body, "prompt_id": prompt_id}, client_id, session.route(prompt_id))
        try:
            answer = await state.comfy.post_prompt(forward)
        except RelayError:
            session.translator.reject(prompt_id)
            session.unroute(prompt_id)
            raise
        if answer.status != 200:
            session.translator.reject(prompt_id)
            session.unroute(prompt_id)
            state.metrics.prompts.labels("rejected", workflow_label(workflow_name)).inc()
            return Response(answer.content, status_code=answer.status, media_type=answer.content_type)
        accepted = answer.json()
        skip = failed_outputs(accepted.get("node_errors"))
        if skip:
            plan = build_plan(
                graph, output_classes, targets=targets, skip_outputs=skip, names=names, workflow=workflow_name
            )
        session.publish(session.translator.accept(prompt_id, accepted.get("number"), time.monotonic(), plan))
        answer_body = {**accepted, "client_id": client_id}
        if workflow_name is not None:
            answer_body["workflow"] = workflow_name
        return _json(answer_body)
    finally:
        session.registering -= 1


async def list_workflows(request: Request) -> Response:
    state: RelayState = request.app.state.relay
    return _json(
        {"language": state.config.language, "workflows": [workflow.public() for workflow in state.workflows]}
    )


async def get_workflow(request: Request) -> Response:
    state: RelayState = request.app.state.relay
    workflow = state.workflows.get(request.path_params["name"])
    if workflow is None:
        name = request.path_params["name"]
        return _json({"error": {"type": "not_found", "message": f"no workflow named {name!r}"}}, 404)
    return _json({**workflow.public(), "graph": workflow.graph})


async def get_preview(request: Request) -> Response:
    state: RelayState = request.app.state.relay
    params = request.path_params
    session = state.sessions.find(params["client_id"])
    preview = session.previews.get(params["prompt_id"], params["node"]) if session is not None else None
    if preview is None:
        return _json(
            {"error": {"type": "not_found", "message": "no such preview (it may have been replaced)"}}, 404
        )
    return Response(preview.data, media_type=preview.mime, headers={"Cache-Control": "no-store"})


async def healthz(request: Request) -> Response:
    """The process is alive and serving (no I/O: a liveness probe must not fail for others' sake)."""
    return _json({"status": "ok", "version": __version__})


async def readyz(request: Request) -> Response:
    """Whether to send this relay traffic: accepting, with room, and ComfyUI answering."""
    state: RelayState = request.app.state.relay

    def unready(reason: str, message: str, **more: Any) -> Response:
        return _json({"status": "unready", "reason": reason, "message": message, **more}, 503)

    if state.closing:
        return unready("shutting_down", "the relay is shutting down")
    if state.connections >= state.config.max_connections:
        return unready("at_capacity", f"{state.connections} sockets open, the limit is reached")
    check = await state.readiness.comfyui()
    if not check.reachable:
        return unready(
            "comfyui_unreachable", check.problem or "ComfyUI did not answer", comfyui=check.public()
        )
    return _json(
        {
            "status": "ready",
            "version": __version__,
            "comfyui": check.public(),
            "connections": state.connections,
        }
    )


async def metrics(request: Request) -> Response:
    state: RelayState = request.app.state.relay
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def _relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    if exc.status >= 500:
        log.warning("request failed", path=request.url.path, error=exc.message)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _json({"error": {"type": kind, "message": str(exc.detail)}}, exc.status_code)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error", path=request.url.path)
    return _json(
        {"error": {"type": "internal_error", "message": "the relay failed to handle this request"}}, 500
    )


def routes() -> list[BaseRoute]:
    return [
        WebSocketRoute("/ws", relay_socket),
        WebSocketRoute("/api/ws", relay_socket),
        Route("/prompt", post_prompt, methods=["POST"]),
        Route("/api/prompt", post_prompt, methods=["POST"]),
        Route("/workflows", list_workflows, methods=["GET"]),
        Route("/workflows/{name}", get_workflow, methods=["GET"]),
        Route("/workflows/{name}/prompt", post_workflow_prompt, methods=["POST"]),
        Route("/previews/{client_id}/{prompt_id}/{node}", get_preview, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
        *proxy_routes(),
        *upload_routes(),
        *page_routes(),
    ]


def create_app(config: RelayConfig | None = None) -> Starlette:
    """Build the relay app. Nothing starts until the lifespan runs."""
    config = config or RelayConfig.from_env()
    state = RelayState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        log.info("relay started", comfyui=config.comfyui_url, version=__version__)
        try:
            yield
        finally:
            await state.stop()
            log.info("relay stopped")

    route_list = routes()
    middleware = [Middleware(Telemetry, metrics=state.metrics, routes=route_list)]
    if config.origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=["*"] if "*" in config.origins else list(config.origins),
                allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "X-Client-Id", "X-Request-ID"],
                expose_headers=["X-Request-ID"],
                max_age=600,
            )
        )
    middleware += [Middleware(AccessControl, config=config, metrics=state.metrics), Middleware(RawSend)]
    app = Starlette(
        routes=route_list,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={RelayError: _relay_error, HTTPException: _http_error, Exception: _unexpected},
    )
    app.state.relay = state
    return app
