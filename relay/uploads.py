"""Uploads (``/upload/image``, ``/upload/mask``, and ``POST /api/assets`` of current ComfyUI):
checked, then streamed to ComfyUI, never held in memory.

The relay reads the form until the first file part's headers, checking the file name and every
field before it; only then does it open the request to ComfyUI, forwarding what it read and
then the rest as it arrives. Fields after the file (browsers may put ``subfolder`` or ``type``
there) are checked as they complete; an unsafe one, or a body over the size limit, aborts the
request to ComfyUI half-way, so ComfyUI, which stores nothing until a form is complete, keeps
nothing, and the client gets the 400 or 413. Over the limit with a declared length: 413 before
anything is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from relay.backends import Backend, Backends
from relay.comfy import UpstreamAnswer
from relay.errors import BadRequest, Conflict, PayloadTooLarge, UpstreamUnavailable
from relay.filenames import upstream_safe_name, upstream_safe_subfolder
from relay.proxy import forward, proxy_of, upstream_headers

__all__ = ["upload_asset", "upload_image", "upload_mask", "upload_routes"]

log = structlog.get_logger("relay.uploads")

_FIELD_LIMIT = 64 * 1024
# The most the relay reads before the first file part: fields are small, a form is not a file.
_PREFETCH = 4 * 1024 * 1024
_UPLOAD_TYPES = ("input", "temp", "output")


@dataclass(slots=True)
class _Form:
    """What the parser saw: text field values, and the first file part's name and file name."""

    fields: dict[str, str] = field(default_factory=dict)
    first_file: tuple[str, str] | None = None
    file_parts: set[str] = field(default_factory=set)
    # What is wrong with a file part after the first (checked as each one's headers end).
    later_problem: BadRequest | None = None
    _headers: dict[str, bytes] = field(default_factory=dict)
    _part: dict[str, str] = field(default_factory=dict)
    _name: bytes = b""
    _value: bytes = b""
    _data: bytearray = field(default_factory=bytearray)

    def callbacks(self) -> Any:
        def header_field(data: bytes, start: int, end: int) -> None:
            self._name += data[start:end]

        def header_value(data: bytes, start: int, end: int) -> None:
            self._value += data[start:end]

        def header_end() -> None:
            self._headers[self._name.decode("latin-1").lower()] = self._value
            self._name = self._value = b""

        def headers_finished() -> None:
            self._part = self._disposition()
            if "filename" in self._part:
                name, filename = self._part.get("name", ""), self._part["filename"]
                if self.first_file is None:
                    self.first_file = (name, filename)
                elif name in self.file_parts and self.later_problem is None:
                    # Servers disagree on which of two same-named parts counts: refuse both.
                    self.later_problem = BadRequest(f"the form has more than one '{name}' file part",
                                                    "invalid_upload")  # fmt: skip
                elif not _plain(filename) and self.later_problem is None:
                    self.later_problem = BadRequest(_PLAIN, "bad_filename")
                self.file_parts.add(name)

        def part_data(data: bytes, start: int, end: int) -> None:
            # Called for every chunk of a file: keep it cheap, keep only small text fields.
            if "filename" not in self._part and len(self._data) < _FIELD_LIMIT:
                self._data += data[start:end]

        def part_end() -> None:
            if "filename" not in self._part:
                self.fields[self._part.get("name", "")] = self._data.decode("utf-8", errors="replace")
            self._headers = {}
            self._data = bytearray()

        return {
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_headers_finished": headers_finished,
            "on_part_data": part_data,
            "on_part_end": part_end,
        }

    def _disposition(self) -> dict[str, str]:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        return {k.decode("latin-1"): v.decode("utf-8", errors="replace") for k, v in params.items()}


def _multipart(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"uploads are limited to {limit} bytes")
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise BadRequest("an upload must be multipart/form-data with a file part", "invalid_upload")
    return boundary


def _plain(filename: str) -> bool:
    return upstream_safe_name(filename) and "/" not in filename


_PLAIN = "the file name must be a plain name (no '/', no '..')"


def _text_only(form: _Form, names: tuple[str, ...]) -> None:
    """ComfyUI reads these as text; sent as a file part, it fails on them with a 500."""
    if form.later_problem is not None:
        raise form.later_problem
    for name in names:
        if name in form.file_parts:
            raise BadRequest(f"'{name}' must be a text field, not a file part", "invalid_upload")


def _check_fields(form: _Form, *, mask: bool) -> None:
    """Fields complete so far; raise for the first unsafe one."""
    _text_only(form, ("subfolder", "type", "overwrite", "original_ref"))
    if "image" in form.fields:
        raise BadRequest("'image' must be a file part, not a text field", "invalid_upload")
    if not upstream_safe_subfolder(form.fields.get("subfolder", "")):
        raise BadRequest("subfolder must stay inside its folder (no '..', no leading '/')", "bad_subfolder")
    if form.fields.get("type", "input") not in _UPLOAD_TYPES:
        raise BadRequest("type must be input, temp or output", "bad_type")
    if mask and "original_ref" in form.fields:
        _check_original_ref(form.fields["original_ref"])


def _check_file(form: _Form, part: str = "image") -> None:
    """The first file part, whose headers have been read: it must be ``part`` with a plain name."""
    name, filename = form.first_file or ("", "")
    if name != part:
        raise BadRequest(f"the form needs a '{part}' file part", "invalid_upload")
    if not _plain(filename):
        raise BadRequest(_PLAIN, "bad_filename")


def _check_asset_fields(form: _Form) -> None:
    """An asset's fields: a plain name, if one is given, and no file sent as text."""
    _text_only(form, ("name", "tags", "user_metadata", "hash", "mime_type"))
    if "file" in form.fields:
        raise BadRequest("'file' must be a file part, not a text field", "invalid_upload")
    name = form.fields.get("name")
    if name is not None and (not upstream_safe_name(name) or "/" in name):
        raise BadRequest("the asset name must be a plain name (no '/', no '..')", "bad_filename")


def _feed(parser: MultipartParser, chunk: bytes) -> None:
    try:
        parser.write(chunk)
    except Exception as exc:  # the multipart parser's own errors: a malformed body
        raise BadRequest(f"the upload is not a well-formed multipart form: {exc}", "invalid_upload") from None


async def _upload(request: Request, path: str, *, mask: bool) -> Response:
    return await _stream_form(
        request,
        path,
        check_fields=lambda form: _check_fields(form, mask=mask),
        check_file=_check_file,
        everywhere=True,
    )


async def _stream_form(
    request: Request,
    path: str,
    *,
    check_fields: Callable[[_Form], None],
    check_file: Callable[[_Form], None],
    everywhere: bool = False,
) -> Response:
    """Check the form as it streams through to ComfyUI; with ``everywhere`` and several
    backends, to every one (an input a prompt on any of them may name)."""
    limit = proxy_of(request).max_upload_bytes
    form = _Form()
    parser = MultipartParser(_multipart(request, limit), form.callbacks())
    incoming = request.stream().__aiter__()
    head: list[bytes] = []
    size = 0
    ended = False
    # Read up to the first file's headers: what comes before it is checked before ComfyUI hears of it.
    while form.first_file is None and not ended:
        try:
            chunk = await incoming.__anext__()
        except StopAsyncIteration:
            ended = True
            break
        size += len(chunk)
        if size > min(limit, _PREFETCH):
            if size > limit:
                raise PayloadTooLarge(f"uploads are limited to {limit} bytes")
            raise BadRequest("the fields before the file are too large", "invalid_upload")
        head.append(chunk)
        _feed(parser, chunk)
        check_fields(form)
    check_file(form)

    async def body() -> AsyncIterator[bytes]:
        nonlocal size
        for chunk in head:
            yield chunk
        async for chunk in incoming:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"uploads are limited to {limit} bytes")
            _feed(parser, chunk)
            check_fields(form)
            yield chunk
        parser.finalize()

    declared = request.headers.get("content-length")
    length = int(declared) if declared is not None and declared.isdigit() else None
    if everywhere and proxy_of(request).pooled:
        return await _to_every_backend(request, path, body(), length)
    return await forward(request, path, content=body(), length=length)


async def _to_every_backend(
    request: Request, path: str, body: AsyncIterator[bytes], length: int | None
) -> Response:
    """With several backends: the same upload to every one up, at once, as it arrives (the
    slowest sets the pace; memory holds a few chunks per backend). A backend that fails drops
    out; the others go on. The answer is theirs when they agree; a 409 when they stored the
    file under different names (one already had another file by that name)."""
    backends = proxy_of(request).backends
    targets = backends.up()
    if not targets:
        raise UpstreamUnavailable("no ComfyUI backend is up to take the upload")
    queues: list[asyncio.Queue[bytes | None]] = [asyncio.Queue(maxsize=4) for _ in targets]
    headers = upstream_headers(request)
    if length is not None:
        headers.append(("content-length", str(length)))

    async def chunks(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    senders = [
        asyncio.create_task(backend.comfy.request("POST", path, content=chunks(queue), headers=headers))
        for backend, queue in zip(targets, queues, strict=True)
    ]

    async def put(n: int, chunk: bytes | None) -> None:
        if senders[n].done():
            return  # this backend failed: the others go on
        putting = asyncio.ensure_future(queues[n].put(chunk))
        await asyncio.wait({putting, senders[n]}, return_when=asyncio.FIRST_COMPLETED)
        putting.cancel()

    try:
        async for chunk in body:
            await asyncio.gather(*(put(n, chunk) for n in range(len(targets))))
        await asyncio.gather(*(put(n, None) for n in range(len(targets))))
    except BaseException:
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        raise
    answers = await asyncio.gather(*senders, return_exceptions=True)
    return _agreed(backends, targets, answers)


def _agreed(backends: Backends, targets: list[Backend], answers: list[Any]) -> Response:
    taken: list[tuple[Backend, UpstreamAnswer, Any]] = []
    for backend, answer in zip(targets, answers, strict=True):
        if isinstance(answer, UpstreamAnswer) and answer.status == 200:
            try:
                taken.append((backend, answer, answer.json()))
            except orjson.JSONDecodeError:
                continue
        elif isinstance(answer, BaseException):
            log.warning("a backend did not take the upload", backend=backend.name, error=repr(answer))
    if not taken:
        for answer in answers:
            if isinstance(answer, UpstreamAnswer):  # ComfyUI's own refusal, passed on
                return Response(answer.content, status_code=answer.status, media_type=answer.content_type)
        first = answers[0]
        raise first if isinstance(first, BaseException) else UpstreamUnavailable("the upload failed")
    names = {(body.get("name"), body.get("subfolder")) for _, _, body in taken if isinstance(body, dict)}
    for backend, _, body in taken:
        backends.uploaded(body, backend.name)
    if len(names) > 1:
        stored = {backend.name: body for backend, _, body in taken}
        raise Conflict(
            "the backends stored the upload under different names (one already had another file by "
            f"this name): {orjson.dumps(stored).decode()}; upload with overwrite=true or a unique name",
            "upload_diverged",
        )
    _, answer, _ = taken[0]
    return Response(answer.content, status_code=200, media_type=answer.content_type)


def _check_original_ref(raw: str | None) -> None:
    try:
        ref = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        ref = None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise BadRequest(
            'a mask upload needs original_ref: {"filename", "subfolder", "type"}', "invalid_upload"
        )
    if not upstream_safe_name(ref["filename"]) or not upstream_safe_subfolder(
        str(ref.get("subfolder") or "")
    ):
        raise BadRequest("original_ref must stay inside its folder", "bad_filename")
    if ref.get("type", "output") not in ("output", "input", "temp"):
        raise BadRequest("original_ref.type must be output, input or temp", "bad_type")


async def upload_image(request: Request) -> Response:
    return await _upload(request, "/upload/image", mask=False)


async def upload_mask(request: Request) -> Response:
    return await _upload(request, "/upload/mask", mask=True)


async def upload_asset(request: Request) -> Response:
    """POST /api/assets: a 'file' part and its fields (current ComfyUI's asset upload)."""
    return await _stream_form(
        request,
        "/api/assets",
        check_fields=_check_asset_fields,
        check_file=lambda form: _check_file(form, "file"),
    )


def upload_routes() -> list[BaseRoute]:
    routes: list[BaseRoute] = [
        Route(prefix + path, handler, methods=["POST"])
        for prefix in ("", "/api")
        for path, handler in (("/upload/image", upload_image), ("/upload/mask", upload_mask))
    ]
    return [*routes, Route("/api/assets", upload_asset, methods=["POST"])]
