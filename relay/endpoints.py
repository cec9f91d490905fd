"""The relay's small read-only endpoints: liveness, readiness, metrics and live previews."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from relay import __version__
from relay.cluster import FORWARDED
from relay.errors import NotFound, RelayError, UpstreamUnavailable
from relay.metrics import CONTENT_TYPE
from relay.state import Lifespan

__all__ = ["get_preview", "healthz", "metrics", "readyz"]

# How long /readyz waits for Redis to answer a ping.
_REDIS_PING_TIMEOUT = 2.0


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def get_preview(request: Request[Lifespan]) -> Response:
    params = request.path_params
    sessions = request.state["relay"].sessions
    session = sessions.find(params["client_id"])
    preview = session.previews.get(params["prompt_id"], params["node"]) if session is not None else None
    if preview is None and sessions.cluster is not None and (session is None or not session.owned):
        # Previews are kept by the relay holding the client.
        with contextlib.suppress(UpstreamUnavailable):
            if not request.headers.get(FORWARDED):
                return await sessions.cluster.pass_on(
                    request, params["client_id"], path=request.url.path, body=None
                )
    if preview is None:
        raise NotFound("no such preview (it may have been replaced)")
    return Response(preview.data, media_type=preview.mime, headers={"Cache-Control": "no-store"})


async def healthz(request: Request[Lifespan]) -> Response:
    """The process is alive and serving (no I/O: a liveness probe must not fail for others' sake)."""
    return _json({"status": "ok", "version": __version__})


async def readyz(request: Request[Lifespan]) -> Response:
    """Whether to send this relay traffic: accepting, with room, and ComfyUI answering."""
    state = request.state["relay"]

    def unready(reason: str, message: str, **more: Any) -> Response:
        return _json({"status": "unready", "reason": reason, "message": message, **more}, 503)

    if state.closing:
        return unready("shutting_down", "the relay is shutting down")
    if state.connections >= state.config.max_connections:
        return unready("at_capacity", f"{state.connections} sockets open, the limit is reached")
    body: dict[str, Any] = {"status": "ready", "version": __version__}
    degraded: list[str] = []
    if state.readiness is None:
        # Several backends: ready while one is up; each one's state from the relay's checks.
        backends = [backend.public() for backend in state.backends]
        if not state.backends.up():
            return unready("comfyui_unreachable", "no ComfyUI backend is up", backends=backends)
        body["backends"] = backends
        if any(backend["state"] == "down" for backend in backends):
            degraded.append("backend_down")
    else:
        check = await state.readiness.comfyui()
        if not check.reachable:
            return unready(
                "comfyui_unreachable", check.problem or "ComfyUI did not answer", comfyui=check.public()
            )
        comfyui = check.public()
        with contextlib.suppress(RelayError):  # which ComfyUI: asked once, then remembered
            comfyui.update((await state.comfy.capabilities()).public())
        body["comfyui"] = comfyui
    body["connections"] = state.connections
    if state.redis is not None:
        # Without Redis the relay still relays; only resuming across restarts waits for it.
        # Ready, then, but saying so: taking every replica out of service would be worse.
        redis = await _redis_check(state.redis)
        body["redis"] = redis
        if not redis["reachable"]:
            degraded.append("redis_unreachable")
    if degraded:
        body["degraded"] = degraded
    cluster = state.sessions.cluster
    if cluster is not None:
        live = state.sessions.live_state()
        body["replica"] = {"id": cluster.replica, "url": cluster.url, "clients": live.roles}
    return _json(body)


async def _redis_check(redis: Redis) -> dict[str, Any]:
    try:
        async with asyncio.timeout(_REDIS_PING_TIMEOUT):
            await redis.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        return {"reachable": False, "problem": str(exc) or exc.__class__.__name__}
    return {"reachable": True}


async def metrics(request: Request[Lifespan]) -> Response:
    return Response(request.state["relay"].metrics.render(), media_type=CONTENT_TYPE)
