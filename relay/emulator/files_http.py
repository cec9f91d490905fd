"""GET/HEAD /view and POST /upload/image, /upload/mask (traces 07, 12; PROTOCOL.md §6).

/view serves a file with ``Content-Disposition``, ``ETag`` (aiohttp's ``"<mtime ns>-<size>"``
in hex), ``Last-Modified`` and ``Accept-Ranges``; ``Range`` gives 206 and a matching
``If-None-Match``/``If-Modified-Since`` gives 304. ``preview=`` and ``channel=`` re-encode the
picture and carry neither ETag nor Range support.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import mimetypes
import os
import shutil
from collections.abc import Callable
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from relay.emulator.errors import ServerCrash
from relay.emulator.files import Folders, ViewRejected

__all__ = ["serve_view", "upload"]

# Served as downloads, never rendered (the server's own rule).
_DOWNGRADED = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}
_COPY_CHUNK = 1 << 20


def _disposition(filename: str) -> dict[str, str]:
    return {"Content-Disposition": f'filename="{filename}"'}


async def serve_view(
    request: Request, folders: Folders, *, by_hash: Callable[[str], Path | None] | None = None
) -> Response:
    """GET /view. With ``by_hash`` (servers with an asset system), ``filename=blake3:...``
    names a registered file by its content hash."""
    query = request.query_params
    if "filename" not in query:
        return Response(status_code=404)
    if by_hash is not None and query["filename"].startswith("blake3:"):
        found = by_hash(query["filename"])
        if found is None:
            return Response(status_code=404)
        path = found
    else:
        try:
            path = folders.view_path(query["filename"], query.get("type"), query.get("subfolder"))
        except ViewRejected as rejected:
            return Response(status_code=rejected.status)
    filename = path.name
    if "preview" in query:
        return await asyncio.to_thread(_preview, path, query["preview"], query.get("channel", ""))
    channel = query.get("channel", "rgba")
    if channel in ("rgb", "a"):
        return await asyncio.to_thread(_channel, path, channel)
    return _file(request, path, filename)


def _file(request: Request, path: Path, filename: str) -> Response:
    stat = path.stat()
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if content_type in _DOWNGRADED:
        content_type = "application/octet-stream"
    etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
    last_modified = formatdate(stat.st_mtime, usegmt=True)
    headers = {
        **_disposition(filename),
        "Content-Type": content_type,
        "ETag": etag,
        "Last-Modified": last_modified,
    }
    if _not_modified(request, etag, stat.st_mtime):
        return Response(status_code=304, headers=headers)
    return FileResponse(path, headers=headers, stat_result=stat)


def _not_modified(request: Request, etag: str, mtime: float) -> bool:
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        tags = {tag.strip() for tag in if_none_match.split(",")}
        return etag in tags or "*" in tags
    if_modified_since = request.headers.get("if-modified-since")
    if if_modified_since:
        try:
            since = parsedate_to_datetime(if_modified_since).timestamp()
        except (TypeError, ValueError):
            return False
        return int(mtime) <= since
    return False


def _preview(path: Path, spec: str, channel: str) -> Response:
    parts = spec.split(";")
    fmt = parts[0]
    if fmt not in ("webp", "jpeg") or "a" in channel:
        fmt = "webp"
    quality = int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 90
    with Image.open(path) as picture:
        out = io.BytesIO()
        picture.convert("RGB").save(out, fmt.upper(), quality=quality)
    return Response(out.getvalue(), headers={**_disposition(path.name), "Content-Type": f"image/{fmt}"})


def _channel(path: Path, channel: str) -> Response:
    with Image.open(path) as picture:
        if channel == "rgb":
            result = picture.convert("RGB")
        else:
            alpha = (
                picture.getchannel("A") if "A" in picture.getbands() else Image.new("L", picture.size, 255)
            )
            result = Image.new("RGBA", picture.size, (0, 0, 0, 0))
            result.putalpha(alpha)
        out = io.BytesIO()
        result.save(out, "PNG")
    return Response(out.getvalue(), headers={**_disposition(path.name), "Content-Type": "image/png"})


# Registers an uploaded file as an asset: (path, name, type, subfolder) -> the answer's "asset".
Register = Callable[[Path, str, str, str], dict[str, Any] | None]


async def upload(
    request: Request, folders: Folders, *, mask: bool = False, register: Register | None = None
) -> Response:
    """POST /upload/image (and /upload/mask, which takes the mask's alpha onto an original)."""
    form = await request.form(max_part_size=4 << 20)
    try:
        image = form.get("image")
        file_type = form.get("type") or "input"
        if file_type not in ("input", "temp", "output"):
            # The server fails here with an UnboundLocalError (trace 07).
            raise ServerCrash(f"unknown upload type {file_type!r}")
        folder = folders.by_type(str(file_type))
        assert folder is not None
        if isinstance(image, str):
            raise ServerCrash("image sent as a plain field")
        if image is None or not image.filename:
            return Response(status_code=400)
        subfolder = str(form.get("subfolder") or "")
        target = folders.upload_target(folder, subfolder, image.filename)
        if target is None:
            return Response(status_code=400)
        target_dir, path = target
        filename = path.name
        overwrite = form.get("overwrite") in ("true", "1")
        duplicate = False
        if not overwrite:
            digest = await _digest(image)
            stem, suffix = os.path.splitext(image.filename)
            counter = 1
            while path.exists():
                if await asyncio.to_thread(_file_digest, path) == digest:
                    duplicate = True
                    break
                filename = f"{stem} ({counter}){suffix}"
                path = target_dir / filename
                counter += 1
        if not duplicate:
            await asyncio.to_thread(target_dir.mkdir, parents=True, exist_ok=True)
            if mask:
                failure = await _apply_mask(form.get("original_ref"), image, path, folders)
                if failure is not None:
                    return failure
            else:
                await _copy(image, path)
        body: dict[str, Any] = {"name": filename, "subfolder": subfolder, "type": file_type}
        asset = register(path, filename, str(file_type), subfolder) if register is not None else None
        if asset is not None:
            body["asset"] = asset
        return Response(json.dumps(body), media_type="application/json; charset=utf-8")
    finally:
        await form.close()


async def _digest(upload_file: UploadFile) -> str:
    digest = hashlib.sha256()
    await upload_file.seek(0)
    while chunk := await upload_file.read(_COPY_CHUNK):
        digest.update(chunk)
    await upload_file.seek(0)
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


async def _copy(upload_file: UploadFile, path: Path) -> None:
    await upload_file.seek(0)

    def write() -> None:
        with path.open("wb") as out:
            shutil.copyfileobj(upload_file.file, out, _COPY_CHUNK)

    await asyncio.to_thread(write)


async def _apply_mask(
    original_ref: Any, mask_file: UploadFile, path: Path, folders: Folders
) -> Response | None:
    try:
        ref = json.loads(original_ref) if isinstance(original_ref, str) else None
    except ValueError:
        ref = None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        return Response(status_code=400)
    try:
        original = folders.view_path(ref["filename"], ref.get("type", "output"), ref.get("subfolder") or None)
    except ViewRejected as rejected:
        return Response(status_code=rejected.status)
    await mask_file.seek(0)
    mask_bytes = await mask_file.read()

    def compose() -> None:
        with Image.open(original) as base, Image.open(io.BytesIO(mask_bytes)) as mask:
            result = base.convert("RGBA")
            result.putalpha(mask.convert("RGBA").getchannel("A").resize(result.size))
            result.save(path, "PNG", compress_level=4)

    await asyncio.to_thread(compose)
    return None
