"""POST /upload/image and /upload/mask: checked, then streamed to ComfyUI, never held in memory.

A multipart form's fields may come after its file, so the relay cannot judge an upload until
it has seen all of it. The body goes to a spooled temporary file (memory up to a small
threshold, then disk) while a streaming multipart parser notes each part's name, file name and
small field values. Then the relay refuses what ComfyUI must not get (a file name or subfolder
leaving its folder, an unknown type, no file, a text field where the file belongs) with a 400,
and streams the spooled body to ComfyUI unchanged. Over the size limit: 413, before reading
anything when the client declared its length.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from relay.errors import BadRequest, PayloadTooLarge
from relay.proxy import forward, upstream_safe_name, upstream_safe_subfolder

__all__ = ["upload_image", "upload_mask", "upload_routes"]

_SPOOL_IN_MEMORY = 1024 * 1024
_FIELD_LIMIT = 64 * 1024
_READ = 1024 * 1024
_UPLOAD_TYPES = ("input", "temp", "output")


@dataclass(slots=True)
class _Form:
    """What the parser saw: field values, and the file parts by name with their file names."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
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

        def part_data(data: bytes, start: int, end: int) -> None:
            # Called for every chunk of a file: keep it cheap, keep only small text fields.
            if "filename" not in self._part and len(self._data) < _FIELD_LIMIT:
                self._data += data[start:end]

        def part_end() -> None:
            disposition = self._part
            name = disposition.get("name", "")
            if "filename" in disposition:
                self.files[name] = disposition["filename"]
            else:
                self.fields[name] = self._data.decode("utf-8", errors="replace")
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


async def _spool(request: Request, limit: int) -> tuple[IO[bytes], _Form, int]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"uploads are limited to {limit} bytes")
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise BadRequest("an upload must be multipart/form-data with an 'image' file", "invalid_upload")
    form = _Form()
    parser = MultipartParser(boundary, form.callbacks())
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                break
            spool.write(chunk)
            parser.write(chunk)
        else:
            parser.finalize()
    except Exception as exc:  # the multipart parser's own errors: a malformed body
        spool.close()
        raise BadRequest(f"the upload is not a well-formed multipart form: {exc}", "invalid_upload") from None
    if size > limit:
        spool.close()
        raise PayloadTooLarge(f"uploads are limited to {limit} bytes")
    spool.seek(0)
    return spool, form, size


def _check(form: _Form) -> None:
    if "image" not in form.files:
        if "image" in form.fields:
            raise BadRequest("'image' must be a file part, not a text field", "invalid_upload")
        raise BadRequest("the form needs an 'image' file part", "invalid_upload")
    if not upstream_safe_name(form.files["image"]) or "/" in form.files["image"]:
        raise BadRequest("the file name must be a plain name (no '/', no '..')", "bad_filename")
    if not upstream_safe_subfolder(form.fields.get("subfolder", "")):
        raise BadRequest("subfolder must stay inside its folder (no '..', no leading '/')", "bad_subfolder")
    if form.fields.get("type", "input") not in _UPLOAD_TYPES:
        raise BadRequest("type must be input, temp or output", "bad_type")


async def _stream(spool: IO[bytes]) -> AsyncIterator[bytes]:
    try:
        while chunk := spool.read(_READ):
            yield chunk
    finally:
        spool.close()


async def _upload(request: Request, path: str, *, mask: bool) -> Response:
    limit = request.app.state.relay.config.max_upload_bytes
    spool, form, size = await _spool(request, limit)
    try:
        _check(form)
        if mask:
            _check_original_ref(form.fields.get("original_ref"))
    except BadRequest:
        spool.close()
        raise
    return await forward(request, path, content=_stream(spool), length=size)


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


def upload_routes() -> list[BaseRoute]:
    return [
        Route(prefix + path, handler, methods=["POST"])
        for prefix in ("", "/api")
        for path, handler in (("/upload/image", upload_image), ("/upload/mask", upload_mask))
    ]
