"""The rest of ComfyUI's HTTP API through the relay: streamed, validated, and safe.

Bodies stream both ways chunk by chunk (memory does not grow with file size) over the one
shared HTTP client. Hop-by-hop headers are dropped, and so are the browser's ``Origin``,
``Referer`` and cookies: ComfyUI answers 403 when ``Origin`` does not match a loopback
``Host``, and it has no business with the browser's cookies. Requests that ComfyUI would answer
with a 500 are refused here with a 400; requests that try to leave ComfyUI's folders never
reach it. Every route is served at its own path and under ``/api``, as ComfyUI does; the jobs and
assets APIs of current ComfyUI releases (``/api/jobs``, ``/api/assets``, ``/api/tags``) only
under ``/api``, as there. Against a server without them they answer ComfyUI's own 404.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypedDict
from urllib.parse import quote

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from relay.asgi import RAW_SEND
from relay.comfy import ComfyClient
from relay.errors import BadRequest
from relay.filenames import upstream_safe_name, upstream_safe_subfolder
from relay.routing import canonical_uuid, restore_client_ids
from relay.streaming import BodyCutShort, StreamedAnswer, StreamingClient

__all__ = ["ProxyContext", "forward", "proxy_of", "proxy_routes", "validate_view_query"]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "origin", "referer", "cookie", "content-length", "x-client-id"}
_NOT_RETURNED = _HOP_BY_HOP | {"set-cookie", "server", "date"}
_NOT_RETURNED_RAW = frozenset(name.encode() for name in _NOT_RETURNED)
_FILE_TYPES = ("output", "input", "temp")
_ANNOTATIONS = (" [output]", " [input]", " [temp]", "[output]", "[input]", "[temp]")

log = structlog.get_logger("relay.proxy")

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class ProxyContext:
    """What the proxy needs from the running relay, and nothing more."""

    comfy: ComfyClient
    streams: StreamingClient
    max_upload_bytes: int
    # Prompts were deleted from ComfyUI's queue: the relay ends the removed ones as cancelled.
    queue_changed: Callable[[], Awaitable[None]]


class _State(TypedDict):
    proxy: ProxyContext


def proxy_of(request: Request) -> ProxyContext:
    """The proxy's part of the lifespan state."""
    state: _State = request.scope["state"]
    return state["proxy"]


def _upstream_headers(request: Request) -> list[tuple[str, str]]:
    return [(name, value) for name, value in request.headers.items() if name.lower() not in _NOT_FORWARDED]


def _returned_headers(headers: Any) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.lower() not in _NOT_RETURNED}


def _path_with_query(request: Request, path: str) -> str:
    query = request.url.query
    return f"{path}?{query}" if query else path


async def forward(request: Request, path: str, *, content: Any = None, length: int | None = None) -> Response:
    """Send the request on to ComfyUI and stream its answer back, status and headers included.

    ``length`` is the size of a streamed ``content``, sent as its Content-Length.
    """
    comfy = proxy_of(request).comfy
    sent = _upstream_headers(request)
    if length is not None:
        sent.append(("content-length", str(length)))
    upstream = await comfy.open_stream(
        request.method, _path_with_query(request, path), headers=sent, content=content
    )
    headers = _returned_headers(upstream.headers)
    if request.method == "HEAD" or upstream.status_code in (204, 304):
        await upstream.aclose()
        return Response(status_code=upstream.status_code, headers=headers)
    return StreamingResponse(comfy.body_of(upstream), status_code=upstream.status_code, headers=headers)


def validate_view_query(query: Any) -> None:
    """Refuse a /view request whose names try to leave ComfyUI's folders, or an unknown type.

    Raises:
        BadRequest: with a message saying which parameter is refused.
    """
    filename = query.get("filename")
    if filename is not None:
        bare = filename
        for annotation in _ANNOTATIONS:
            if bare.endswith(annotation):
                bare = bare[: -len(annotation)]
                break
        if not upstream_safe_name(bare):
            raise BadRequest("filename must stay inside its folder (no '..', no leading '/')", "bad_filename")
    if not upstream_safe_subfolder(query.get("subfolder") or ""):
        raise BadRequest("subfolder must stay inside its folder (no '..', no leading '/')", "bad_subfolder")
    file_type = query.get("type")
    if file_type is not None and file_type not in _FILE_TYPES:
        raise BadRequest("type must be output, input or temp", "bad_type")


async def view(request: Request) -> Response:
    """GET/HEAD /view on the download data path (:mod:`relay.streaming`), validated first."""
    validate_view_query(request.query_params)
    streams = proxy_of(request).streams
    target = _path_with_query(request, "/view")
    answer = await streams.open(request.method, target, _upstream_headers(request))
    return Passthrough(answer)


class Passthrough(Response):
    """ComfyUI's answer sent on as it arrives: each chunk read is one write to the browser.

    A browser that goes away stops the download from ComfyUI too. If ComfyUI's body ends
    early the response is left incomplete, so the server closes the connection and the
    browser sees a short download rather than a file that looks whole.
    """

    def __init__(self, answer: StreamedAnswer) -> None:
        self.answer = answer
        self.status_code = answer.status
        self.raw_headers = [(name, value) for name, value in answer.headers if name not in _NOT_RETURNED_RAW]
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = self.answer
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            # Started: the body goes to the server directly, past the framework's layers.
            send = scope.get(RAW_SEND, send)
            gone = asyncio.ensure_future(_disconnected(receive))
            try:
                while chunk := await answer.read():
                    if gone.done():
                        return
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except BodyCutShort as exc:
                log.warning("ComfyUI response cut short", path=scope["path"], error=str(exc))
                return
            finally:
                gone.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            answer.close()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json_body(request: Request, *, limit: int = 1024 * 1024) -> bytes:
    """A small JSON object body, checked: ComfyUI answers 500 to empty or malformed ones."""
    body = await request.body()
    if len(body) > limit:
        raise BadRequest(f"the body must be a JSON object of at most {limit} bytes", "invalid_body")
    try:
        data = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object", "invalid_body")
    return body


def _passthrough(path_of: Callable[[Request], str]) -> Handler:
    async def handler(request: Request) -> Response:
        return await forward(request, path_of(request))

    return handler


def _checked_post(path: str) -> Handler:
    async def handler(request: Request) -> Response:
        return await forward(request, path, content=await _json_body(request))

    return handler


async def post_queue(request: Request) -> Response:
    """``{"delete": [ids]}`` or ``{"clear": true}``; removed prompts then end as ``cancelled``."""
    body = await _json_body(request)
    response = await forward(request, "/queue", content=body)
    if response.status_code == 200:
        await proxy_of(request).queue_changed()
    return response


async def interrupt(request: Request) -> Response:
    """Global with no body or ``{}``; targeted with ``{"prompt_id": ...}``."""
    body = await request.body()
    if body.strip():
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRequest("the body must be empty or a JSON object", "invalid_body") from None
        if not isinstance(data, dict) or not isinstance(data.get("prompt_id", ""), str):
            raise BadRequest('the body must be empty or {"prompt_id": "..."}', "invalid_body")
    return await forward(request, "/interrupt", content=body or b"{}")


async def _answer_with_client_ids(request: Request, path: str, shape: str) -> Any:
    """ComfyUI's JSON answer to a GET, each prompt's ``client_id`` the one its client used
    (``relay.routing``); a Response to pass on as it is when the answer is not a JSON 200.

    The answer is read whole to rewrite it, as ComfyUI builds it whole: ask /history with
    ``max_items`` for a long one.
    """
    answer = await proxy_of(request).comfy.request("GET", _path_with_query(request, path))
    try:
        body = answer.json() if answer.status == 200 else None
    except orjson.JSONDecodeError:
        body = None
    if body is None:
        return Response(answer.content, status_code=answer.status, media_type=answer.content_type)
    return restore_client_ids(body, shape=shape)


async def queue(request: Request) -> Response:
    """GET /queue with pending prompts in the order they will run (ComfyUI gives its heap array)."""
    body = await _answer_with_client_ids(request, "/queue", "queue")
    if isinstance(body, Response):
        return body
    pending = body.get("queue_pending") if isinstance(body, dict) else None
    if isinstance(pending, list):
        body["queue_pending"] = sorted(pending, key=_run_order)
    return Response(orjson.dumps(body), media_type="application/json")


def _history(path_of: Callable[[Request], str]) -> Handler:
    """GET /history or /history/{id}."""

    async def handler(request: Request) -> Response:
        body = await _answer_with_client_ids(request, path_of(request), "history")
        return (
            body
            if isinstance(body, Response)
            else Response(orjson.dumps(body), media_type="application/json")
        )

    return handler


# Jobs and assets (current ComfyUI) ---------------------------------------------------------

_BLAKE3 = re.compile(r"blake3:[0-9a-f]{64}")


def _job_id(request: Request) -> str:
    """The job id of the path, checked before ComfyUI hears of it."""
    job_id = str(request.path_params["job_id"])
    if not canonical_uuid(job_id):
        raise BadRequest("a job id is a UUID in canonical lowercase hyphenated form", "invalid_job_id")
    return job_id


async def get_job(request: Request) -> Response:
    """GET /api/jobs/{id}: one job, with its client's own id in its extra_data."""
    body = await _answer_with_client_ids(request, f"/api/jobs/{_job_id(request)}", "job")
    return body if isinstance(body, Response) else Response(orjson.dumps(body), media_type="application/json")


async def cancel_job(request: Request) -> Response:
    """POST /api/jobs/{id}/cancel; a prompt taken out of the queue then ends as cancelled."""
    response = await forward(request, f"/api/jobs/{_job_id(request)}/cancel", content=b"")
    if response.status_code == 200:
        await proxy_of(request).queue_changed()
    return response


async def cancel_jobs(request: Request) -> Response:
    """POST /api/jobs/cancel ``{"job_ids": [...]}``, every id checked first."""
    body = await _json_body(request)
    job_ids = orjson.loads(body).get("job_ids")
    if not isinstance(job_ids, list) or not all(canonical_uuid(job_id) for job_id in job_ids):
        raise BadRequest("job_ids must be a list of canonical lowercase UUIDs", "invalid_job_id")
    response = await forward(request, "/api/jobs/cancel", content=body)
    if response.status_code == 200:
        await proxy_of(request).queue_changed()
    return response


def _asset_path(request: Request, tail: str = "") -> str:
    # The route's uuid convertor matched it; written canonically for ComfyUI.
    return f"/api/assets/{request.path_params['asset_id']}{tail}"


async def asset_content(request: Request) -> Response:
    """GET /api/assets/{id}/content on the download data path, like /view."""
    streams = proxy_of(request).streams
    target = _path_with_query(request, _asset_path(request, "/content"))
    answer = await streams.open(request.method, target, _upstream_headers(request))
    return Passthrough(answer)


async def head_asset_hash(request: Request) -> Response:
    content_hash = str(request.path_params["content_hash"])
    if not _BLAKE3.fullmatch(content_hash):
        raise BadRequest("the hash must be blake3: and 64 lowercase hex digits", "bad_hash")
    return await forward(request, f"/api/assets/hash/{content_hash}")


def _current_routes() -> list[BaseRoute]:
    """The jobs and assets APIs, under /api only (asset uploads are in relay.uploads)."""

    def asset(tail: str = "") -> Handler:
        async def handler(request: Request) -> Response:
            body = await _json_body(request) if request.method == "PUT" else None
            return await forward(request, _asset_path(request, tail), content=body)

        return handler

    return [
        Route("/api/jobs", _passthrough(lambda r: "/api/jobs"), methods=["GET"]),
        Route("/api/jobs/cancel", cancel_jobs, methods=["POST"]),
        Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/api/assets", _passthrough(lambda r: "/api/assets"), methods=["GET"]),
        Route("/api/assets/hash/{content_hash}", head_asset_hash, methods=["HEAD"]),
        Route("/api/assets/{asset_id:uuid}", asset(), methods=["GET", "PUT", "DELETE"]),
        Route("/api/assets/{asset_id:uuid}/content", asset_content, methods=["GET", "HEAD"]),
        Route("/api/tags", _passthrough(lambda r: "/api/tags"), methods=["GET"]),
    ]


def _run_order(item: Any) -> tuple[float, str]:
    if isinstance(item, list) and len(item) > 1 and isinstance(item[0], (int, float)):
        return (float(item[0]), str(item[1]))
    return (float("inf"), "")


def _segment(request: Request, name: str) -> str:
    """A path parameter quoted again for the upstream URL: it cannot add path segments there."""
    return quote(str(request.path_params[name]), safe="")


def proxy_routes() -> list[BaseRoute]:
    """The proxied routes, each at its own path and under /api."""
    routes: list[tuple[str, Handler, list[str]]] = [
        ("/view", view, ["GET", "HEAD"]),
        ("/queue", queue, ["GET"]),
        ("/queue", post_queue, ["POST"]),
        ("/history", _history(lambda r: "/history"), ["GET"]),
        ("/history", _checked_post("/history"), ["POST"]),
        ("/history/{prompt_id}", _history(lambda r: "/history/" + _segment(r, "prompt_id")), ["GET"]),
        ("/interrupt", interrupt, ["POST"]),
        ("/prompt", _passthrough(lambda r: "/prompt"), ["GET"]),
        ("/object_info", _passthrough(lambda r: "/object_info"), ["GET"]),
        (
            "/object_info/{node_class}",
            _passthrough(lambda r: "/object_info/" + _segment(r, "node_class")),
            ["GET"],
        ),
        ("/system_stats", _passthrough(lambda r: "/system_stats"), ["GET"]),
        ("/features", _passthrough(lambda r: "/features"), ["GET"]),
        ("/free", _checked_post("/free"), ["POST"]),
    ]
    own: list[BaseRoute] = [
        Route(prefix + path, handler, methods=methods)
        for prefix in ("", "/api")
        for path, handler, methods in routes
    ]
    return [*own, *_current_routes()]
