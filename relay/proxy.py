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
import contextlib
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
from relay.backends import Backend, Backends
from relay.comfy import ComfyClient, UpstreamAnswer
from relay.errors import BadRequest, RelayError, UpstreamUnavailable
from relay.filenames import upstream_safe_name, upstream_safe_subfolder
from relay.merged import merge_history, merge_jobs, merge_queue
from relay.routing import canonical_uuid, restore_client_ids
from relay.streaming import BodyCutShort, StreamedAnswer, StreamingClient

__all__ = ["ProxyContext", "forward", "proxy_of", "proxy_routes", "upstream_headers", "validate_view_query"]

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

    backends: Backends
    max_upload_bytes: int
    # Prompts were deleted from ComfyUI's queue: the relay ends the removed ones as cancelled.
    queue_changed: Callable[[], Awaitable[None]]

    @property
    def comfy(self) -> ComfyClient:
        """The first backend's client (the only one's, without several)."""
        return self.backends.first().comfy

    @property
    def streams(self) -> StreamingClient:
        return self.backends.first().streams

    @property
    def pooled(self) -> bool:
        return self.backends.pooled


class _State(TypedDict):
    proxy: ProxyContext


def proxy_of(request: Request) -> ProxyContext:
    """The proxy's part of the lifespan state."""
    state: _State = request.scope["state"]
    return state["proxy"]


def upstream_headers(request: Request) -> list[tuple[str, str]]:
    return [(name, value) for name, value in request.headers.items() if name.lower() not in _NOT_FORWARDED]


def _returned_headers(headers: Any) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.lower() not in _NOT_RETURNED}


def _path_with_query(request: Request, path: str) -> str:
    query = request.url.query
    return f"{path}?{query}" if query else path


async def forward(
    request: Request,
    path: str,
    *,
    content: Any = None,
    length: int | None = None,
    backend: Backend | None = None,
) -> Response:
    """Send the request on to ComfyUI (``backend``; the first one) and stream its answer back,
    status and headers included.

    ``length`` is the size of a streamed ``content``, sent as its Content-Length.
    """
    comfy = backend.comfy if backend is not None else proxy_of(request).comfy
    sent = upstream_headers(request)
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
    """GET/HEAD /view on the download data path (:mod:`relay.streaming`), validated first.

    With several backends: from the one that made the file, when the relay saw it made, else
    from the first that has it."""
    query = request.query_params
    validate_view_query(query)
    context = proxy_of(request)
    target = _path_with_query(request, "/view")
    if not context.pooled:
        return Passthrough(await context.streams.open(request.method, target, upstream_headers(request)))
    backends = context.backends
    filename, subfolder, file_type = (
        query.get("filename") or "",
        query.get("subfolder") or "",
        query.get("type"),
    )
    # The prompt that made it (in the relay's own file URLs), else where the relay saw it made.
    hinted = query.get("prompt_id")
    known = (await backends.locate(hinted) if hinted else None) or backends.file_source(
        filename, subfolder, file_type or "output"
    )
    answer, backend = await _first_found(request, target, _candidates(backends, known))
    if answer.status == 200 and backend is not known:
        backends.found_file(filename, subfolder, file_type or "output", backend.name)
    return Passthrough(answer)


def _candidates(backends: Backends, known: Backend | None) -> list[Backend]:
    """The backends to ask, in order: ``known`` first, then every one up (the first, if none is)."""
    order: list[Backend] = [known] if known is not None else []
    order += [backend for backend in backends.up() if backend is not known]
    return order or [backends.first()]


async def _first_found(request: Request, target: str, order: list[Backend]) -> tuple[StreamedAnswer, Backend]:
    """The first answer of ``order`` that is not a 404 (the last one's, if all are), streamed.

    Raises:
        UpstreamUnavailable, UpstreamTimeout: the last backend could not be asked.
    """
    headers = upstream_headers(request)
    for n, backend in enumerate(order):
        last = n == len(order) - 1
        try:
            answer = await backend.streams.open(request.method, target, headers)
        except RelayError:
            if last:
                raise
            continue
        if answer.status != 404 or last:
            return answer, backend
        answer.close()
    raise AssertionError("no backend to ask")  # _candidates never gives an empty list


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


async def post_queue(request: Request) -> Response:
    """``{"delete": [ids]}`` or ``{"clear": true}``; removed prompts then end as ``cancelled``.
    With several backends, each id goes to its prompt's backend (to every one when unknown),
    and a clear clears them all."""
    body = await _json_body(request)
    if proxy_of(request).pooled:
        response = await _post_routed(request, "/queue", orjson.loads(body), ids_key="delete")
    else:
        response = await forward(request, "/queue", content=body)
    if response.status_code == 200:
        await proxy_of(request).queue_changed()
    return response


async def post_history(request: Request) -> Response:
    """``{"delete": [ids]}`` or ``{"clear": true}``: with several backends, each id to its
    prompt's backend (every one when unknown), a clear to all."""
    body = await _json_body(request)
    if proxy_of(request).pooled:
        return await _post_routed(request, "/history", orjson.loads(body), ids_key="delete")
    return await forward(request, "/history", content=body)


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
    if proxy_of(request).pooled:
        # Targeted: on the prompt's backend. Global: every backend stops what it runs.
        data = orjson.loads(body) if body.strip() else {}
        return await _post_routed(request, "/interrupt", data, ids_key="prompt_id")
    return await forward(request, "/interrupt", content=body or b"{}")


async def _post_routed(request: Request, path: str, data: dict[str, Any], *, ids_key: str) -> Response:
    """A POST that names prompts (``ids_key``: a list or one id) sent, with several backends,
    to each prompt's backend with just its ids, or to every backend up when it names none or
    an unknown one. ComfyUI's empty 200, or the first refusal."""
    backends = proxy_of(request).backends
    named = data.get(ids_key)
    ids = [named] if isinstance(named, str) else named if isinstance(named, list) else []
    sends: list[tuple[Backend, dict[str, Any]]] = []
    if not ids:
        sends = [(backend, data) for backend in backends.up()]
    else:
        groups: dict[str, list[Any]] = {}
        everywhere: list[Any] = []
        for prompt_id in ids:
            known = await backends.locate(str(prompt_id))
            if known is None:
                everywhere.append(prompt_id)
            else:
                groups.setdefault(known.name, []).append(prompt_id)
        for backend in backends.up():
            mine = groups.get(backend.name, []) + everywhere
            if mine:
                sends.append((backend, {**data, ids_key: mine if isinstance(named, list) else mine[0]}))
        for name, mine in groups.items():  # a backend that is down still gets its own (it may answer)
            owner = backends.get(name)
            if owner is not None and owner.state != "up":
                sends.append((owner, {**data, ids_key: mine if isinstance(named, list) else mine[0]}))
    if not sends:
        raise UpstreamUnavailable("no ComfyUI backend is up")
    answers = await asyncio.gather(
        *(backend.comfy.post_json(path, payload) for backend, payload in sends), return_exceptions=True
    )
    for answer in answers:
        if isinstance(answer, UpstreamAnswer) and answer.status != 200:
            return Response(answer.content, status_code=answer.status, media_type=answer.content_type)
    if sends and all(isinstance(answer, BaseException) for answer in answers):
        first = answers[0]
        raise first if isinstance(first, BaseException) else AssertionError
    return Response(status_code=200)


async def _answer_with_client_ids(
    request: Request, path: str, shape: str, backend: Backend | None = None
) -> Any:
    """ComfyUI's JSON answer to a GET (from ``backend``; the first one), each prompt's
    ``client_id`` the one its client used (``relay.routing``); a Response to pass on as it is
    when the answer is not a JSON 200.

    The answer is read whole to rewrite it, as ComfyUI builds it whole: ask /history with
    ``max_items`` for a long one.
    """
    comfy = backend.comfy if backend is not None else proxy_of(request).comfy
    answer = await comfy.request("GET", _path_with_query(request, path))
    try:
        body = answer.json() if answer.status == 200 else None
    except orjson.JSONDecodeError:
        body = None
    if body is None:
        return Response(answer.content, status_code=answer.status, media_type=answer.content_type)
    return restore_client_ids(body, shape=shape)


async def queue(request: Request) -> Response:
    """GET /queue with pending prompts in the order they will run (ComfyUI gives its heap array)."""
    if proxy_of(request).pooled:
        return await _merged_queue(request)
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
        if proxy_of(request).pooled:
            return await _merged_history(request, path_of(request))
        body = await _answer_with_client_ids(request, path_of(request), "history")
        return (
            body
            if isinstance(body, Response)
            else Response(orjson.dumps(body), media_type="application/json")
        )

    return handler


# Several backends ---------------------------------------------------------------------------


async def _json_of(backend: Backend, request: Request, path: str, shape: str) -> Any:
    """A backend's JSON answer with clients' own ids, or None when it gave none."""
    try:
        body = await _answer_with_client_ids(request, path, shape, backend)
    except RelayError as exc:
        log.warning("a backend did not answer", backend=backend.name, path=path, reason=exc.message)
        return None
    return None if isinstance(body, Response) else body


async def _merged_queue(request: Request) -> Response:
    """Every backend's queue, each prompt labelled with its backend (``relay.merged``)."""
    backends = list(proxy_of(request).backends)
    bodies = await asyncio.gather(*(_json_of(b, request, "/queue", "queue") for b in backends))
    merged = merge_queue([(b.name, b.state, body) for b, body in zip(backends, bodies, strict=True)])
    return Response(orjson.dumps(merged), media_type="application/json")


async def _merged_history(request: Request, path: str) -> Response:
    """``/history``: every backend's, merged; ``/history/{id}``: from the prompt's backend (or
    from whichever has it)."""
    backends = proxy_of(request).backends
    if path != "/history":
        prompt_id = str(request.path_params["prompt_id"])
        known = await backends.locate(prompt_id)
        for backend in _candidates(backends, known):
            body = await _json_of(backend, request, path, "history")
            if isinstance(body, dict) and body:
                return Response(
                    orjson.dumps(merge_history([(backend.name, body)])), media_type="application/json"
                )
        return Response(b"{}", media_type="application/json")
    everyone = list(backends)
    bodies = await asyncio.gather(*(_json_of(b, request, path, "history") for b in everyone))
    raw = request.query_params.get("max_items")
    max_items = int(raw) if raw is not None and raw.isdigit() else None
    merged = merge_history([(b.name, body) for b, body in zip(everyone, bodies, strict=True)], max_items)
    return Response(orjson.dumps(merged), media_type="application/json")


async def _pooled_jobs(request: Request) -> Response:
    """GET /api/jobs across backends: each asked for the first offset + limit, one page made."""
    query = request.query_params
    try:
        offset = max(0, int(query.get("offset") or 0))
        limit = int(query["limit"]) if "limit" in query else None
    except ValueError:
        raise BadRequest("offset and limit must be integers", "invalid_query") from None
    if limit is not None and limit <= 0:
        raise BadRequest("limit must be a positive integer", "invalid_query")
    params = [(k, v) for k, v in query.multi_items() if k not in ("offset", "limit")]
    if limit is not None:
        params.append(("limit", str(offset + limit)))
    backends = list(proxy_of(request).backends)
    answers = await asyncio.gather(
        *(b.comfy.request("GET", "/api/jobs", params=params) for b in backends), return_exceptions=True
    )
    bodies: list[tuple[str, Any]] = []
    for backend, answer in zip(backends, answers, strict=True):
        if isinstance(answer, BaseException):
            continue
        if answer.status != 200:  # a bad query: every backend says the same
            return Response(answer.content, status_code=answer.status, media_type=answer.content_type)
        try:
            bodies.append((backend.name, answer.json()))
        except orjson.JSONDecodeError:
            continue
    if not bodies:
        raise UpstreamUnavailable("no ComfyUI backend answered GET /api/jobs")
    merged = merge_jobs(
        bodies,
        sort_by=(query.get("sort_by") or "created_at").lower(),
        descending=(query.get("sort_order") or "desc").lower() == "desc",
        offset=offset,
        limit=limit,
    )
    for job in merged["jobs"]:
        restore_client_ids(job, shape="job")
    return Response(orjson.dumps(merged), media_type="application/json")


async def _everywhere(request: Request, path: str, content: bytes) -> Response:
    """A POST for every backend up (``/free``, ``/api/jobs/cancel``): the first's answer, with
    ``cancelled`` true when any backend cancelled."""
    backends = proxy_of(request).backends.up()
    if not backends:
        raise UpstreamUnavailable("no ComfyUI backend is up")
    answers = await asyncio.gather(
        *(b.comfy.request("POST", path, content=content, headers={"Content-Type": "application/json"})
          for b in backends),
        return_exceptions=True,
    )  # fmt: skip
    done = [answer for answer in answers if isinstance(answer, UpstreamAnswer)]
    if not done:
        first = answers[0]
        raise first if isinstance(first, BaseException) else AssertionError
    for answer in done:
        if answer.status != 200:
            return Response(answer.content, status_code=answer.status, media_type=answer.content_type)
    cancelled = False
    for answer in done:
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            cancelled = cancelled or bool(answer.json().get("cancelled"))
    if path.endswith("/cancel"):
        return Response(orjson.dumps({"cancelled": cancelled}), media_type="application/json")
    return Response(done[0].content, status_code=200, media_type=done[0].content_type)


async def get_prompt_info(request: Request) -> Response:
    """GET /prompt: ComfyUI's queue count; with several backends, theirs added up."""
    context = proxy_of(request)
    if not context.pooled:
        return await forward(request, "/prompt")
    body = {"exec_info": {"queue_remaining": context.backends.total_remaining()}}
    return Response(orjson.dumps(body), media_type="application/json")


async def free(request: Request) -> Response:
    body = await _json_body(request)
    if proxy_of(request).pooled:
        return await _everywhere(request, "/free", body)
    return await forward(request, "/free", content=body)


# Jobs and assets (current ComfyUI) ---------------------------------------------------------

_BLAKE3 = re.compile(r"blake3:[0-9a-f]{64}")


def _job_id(request: Request) -> str:
    """The job id of the path, checked before ComfyUI hears of it."""
    job_id = str(request.path_params["job_id"])
    if not canonical_uuid(job_id):
        raise BadRequest("a job id is a UUID in canonical lowercase hyphenated form", "invalid_job_id")
    return job_id


async def get_job(request: Request) -> Response:
    """GET /api/jobs/{id}: one job, with its client's own id in its extra_data (with several
    backends: from the prompt's, or from whichever knows it)."""
    job_id = _job_id(request)
    context = proxy_of(request)
    if not context.pooled:
        body = await _answer_with_client_ids(request, f"/api/jobs/{job_id}", "job")
        return (
            body
            if isinstance(body, Response)
            else Response(orjson.dumps(body), media_type="application/json")
        )
    found: Any = None
    for backend in _candidates(context.backends, await context.backends.locate(job_id)):
        found = await _answer_with_client_ids(request, f"/api/jobs/{job_id}", "job", backend)
        if not isinstance(found, Response):
            return Response(orjson.dumps({**found, "backend": backend.name}), media_type="application/json")
    return found if isinstance(found, Response) else Response(b"{}", status_code=404)


async def cancel_job(request: Request) -> Response:
    """POST /api/jobs/{id}/cancel; a prompt taken out of the queue then ends as cancelled."""
    job_id = _job_id(request)
    context = proxy_of(request)
    known = await context.backends.locate(job_id) if context.pooled else None
    if context.pooled and known is None:
        response = await _everywhere(request, f"/api/jobs/{job_id}/cancel", b"")
    else:
        response = await forward(request, f"/api/jobs/{job_id}/cancel", content=b"", backend=known)
    if response.status_code == 200:
        await proxy_of(request).queue_changed()
    return response


async def cancel_jobs(request: Request) -> Response:
    """POST /api/jobs/cancel ``{"job_ids": [...]}``, every id checked first."""
    body = await _json_body(request)
    job_ids = orjson.loads(body).get("job_ids")
    if not isinstance(job_ids, list) or not all(canonical_uuid(job_id) for job_id in job_ids):
        raise BadRequest("job_ids must be a list of canonical lowercase UUIDs", "invalid_job_id")
    if proxy_of(request).pooled:
        response = await _everywhere(request, "/api/jobs/cancel", body)
    else:
        response = await forward(request, "/api/jobs/cancel", content=body)
    if response.status_code == 200:
        await proxy_of(request).queue_changed()
    return response


def _asset_path(request: Request, tail: str = "") -> str:
    # The route's uuid convertor matched it; written canonically for ComfyUI.
    return f"/api/assets/{request.path_params['asset_id']}{tail}"


async def asset_content(request: Request) -> Response:
    """GET /api/assets/{id}/content on the download data path, like /view."""
    context = proxy_of(request)
    target = _path_with_query(request, _asset_path(request, "/content"))
    if context.pooled:
        answer, _ = await _first_found(request, target, _candidates(context.backends, None))
        return Passthrough(answer)
    answer = await context.streams.open(request.method, target, upstream_headers(request))
    return Passthrough(answer)


async def head_asset_hash(request: Request) -> Response:
    content_hash = str(request.path_params["content_hash"])
    if not _BLAKE3.fullmatch(content_hash):
        raise BadRequest("the hash must be blake3: and 64 lowercase hex digits", "bad_hash")
    return await forward(request, f"/api/assets/hash/{content_hash}")


async def _jobs(request: Request) -> Response:
    if proxy_of(request).pooled:
        return await _pooled_jobs(request)
    return await forward(request, "/api/jobs")


def _current_routes() -> list[BaseRoute]:
    """The jobs and assets APIs, under /api only (asset uploads are in relay.uploads)."""

    def asset(tail: str = "") -> Handler:
        async def handler(request: Request) -> Response:
            body = await _json_body(request) if request.method == "PUT" else None
            return await forward(request, _asset_path(request, tail), content=body)

        return handler

    return [
        Route("/api/jobs", _jobs, methods=["GET"]),
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
        ("/history", post_history, ["POST"]),
        ("/history/{prompt_id}", _history(lambda r: "/history/" + _segment(r, "prompt_id")), ["GET"]),
        ("/interrupt", interrupt, ["POST"]),
        ("/prompt", get_prompt_info, ["GET"]),
        ("/object_info", _passthrough(lambda r: "/object_info"), ["GET"]),
        (
            "/object_info/{node_class}",
            _passthrough(lambda r: "/object_info/" + _segment(r, "node_class")),
            ["GET"],
        ),
        ("/system_stats", _passthrough(lambda r: "/system_stats"), ["GET"]),
        ("/features", _passthrough(lambda r: "/features"), ["GET"]),
        ("/free", free, ["POST"]),
    ]
    own: list[BaseRoute] = [
        Route(prefix + path, handler, methods=methods)
        for prefix in ("", "/api")
        for path, handler, methods in routes
    ]
    return [*own, *_current_routes()]
