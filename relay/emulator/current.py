"""What the current ComfyUI (0.38) serves beyond 0.3.64: the jobs API and the asset registry.

Only the ``current`` profile registers these routes. Each behaviour follows ComfyUI's current
source (``server.py``, ``comfy_execution/jobs.py``, ``app/assets/api/routes.py``); where the
emulator simplifies, ``docs/emulator.md`` says so.

* ``GET /api/jobs``: every job, running (``in_progress``), waiting (``pending``) and ended
  (``completed``, ``failed``, ``cancelled`` for an interrupted one), filtered by ``status``,
  sorted by ``created_at`` or ``execution_duration``, paged by ``offset``/``limit`` with
  ``{offset, limit, total, has_more}``; ``GET /api/jobs/{id}`` one job with its outputs.
* ``POST /api/jobs/{id}/cancel`` and ``POST /api/jobs/cancel`` (``{"job_ids": [...]}``):
  interrupt a running job, dequeue a pending one, and do nothing to an ended or unknown one;
  ``{"cancelled": bool}`` says whether anything was cancelled.
* Assets: every upload is registered with a content hash and served by id; ``/view`` takes
  ``filename=blake3:<hash>``.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from relay.emulator.prompt_queue import QueueItem
    from relay.emulator.server import EmulatorState

__all__ = ["AssetRegistry", "canonical_uuid", "current_routes"]

_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
_PREVIEWABLE = frozenset({"images", "video", "audio", "3d", "text"})


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status_code=status, media_type="application/json; charset=utf-8")


def canonical_uuid(value: Any) -> bool:
    """Whether ``value`` is a UUID written as ComfyUI wants a job id: lowercase, hyphenated."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


# Jobs ------------------------------------------------------------------------------------


def _job_metadata(extra_data: dict[str, Any]) -> dict[str, Any]:
    workflow = (extra_data.get("extra_pnginfo") or {}).get("workflow") or {}
    return {"create_time": extra_data.get("create_time"), "workflow_id": workflow.get("id")}


def _pruned(job: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in job.items() if value is not None}


def _queue_job(item: QueueItem, status: str, *, detail: bool) -> dict[str, Any]:
    job = _pruned(
        {
            "id": item.prompt_id,
            "status": status,
            "priority": item.number,
            **_job_metadata(item.extra_data),
            "outputs_count": 0,
            "previewable_outputs_count": 0,
        }
    )
    if detail:
        job["workflow"] = {"prompt": item.prompt, "extra_data": item.extra_data}
    return job


def _output_files(outputs: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for node, output in outputs.items():
        if not isinstance(output, dict):
            continue
        for kind, entries in output.items():
            if kind == "animated" or not isinstance(entries, list):
                continue
            found += [(node, kind, entry) for entry in entries if isinstance(entry, dict)]
    return found


def _history_job(prompt_id: str, entry: dict[str, Any], *, detail: bool) -> dict[str, Any]:
    number, _, prompt, extra_data, _ = entry["prompt"]
    status_info = entry.get("status") or {}
    started = ended = error = None
    interrupted = False
    for name, data in status_info.get("messages", []):
        if name == "execution_start":
            started = data.get("timestamp")
        elif name in ("execution_success", "execution_error", "execution_interrupted"):
            ended = data.get("timestamp")
            error = data if name == "execution_error" else error
            interrupted = interrupted or name == "execution_interrupted"
    if status_info.get("status_str") == "error":
        status = "cancelled" if interrupted else "failed"
    else:
        status = "completed"
    files = _output_files(entry.get("outputs") or {})
    previewable = [(node, kind, ref) for node, kind, ref in files if kind in _PREVIEWABLE]
    preview = next((f for f in previewable if f[2].get("type") == "output"), None) or next(
        iter(previewable), None
    )
    job = _pruned(
        {
            "id": prompt_id,
            "status": status,
            "priority": number,
            **_job_metadata(extra_data),
            "execution_start_time": started,
            "execution_end_time": ended,
            "execution_error": error,
            "outputs_count": len(files),
            "previewable_outputs_count": len(previewable),
            "preview_output": {**preview[2], "nodeId": preview[0], "mediaType": preview[1]}
            if preview
            else None,
        }
    )
    if detail:
        job["outputs"] = entry.get("outputs") or {}
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


class _Jobs:
    def __init__(self, state: EmulatorState) -> None:
        self.s = state

    def _all(self) -> list[dict[str, Any]]:
        queue = self.s.queue
        jobs = [_queue_job(item, "in_progress", detail=False) for item in queue.running()]
        jobs += [_queue_job(item, "pending", detail=False) for item in queue.pending()]
        jobs += [_history_job(pid, entry, detail=False) for pid, entry in queue.history().items()]
        return jobs

    async def list(self, request: Request) -> Response:
        query = request.query_params
        wanted: list[str] = list(_STATUSES)
        if query.get("status"):
            wanted = [s.strip().lower() for s in query["status"].split(",") if s.strip()]
            invalid = [s for s in wanted if s not in _STATUSES]
            if invalid:
                message = (
                    f"Invalid status value(s): {', '.join(invalid)}. Valid values: {', '.join(_STATUSES)}"
                )
                return _json({"error": message}, 400)
        sort_by = query.get("sort_by", "created_at").lower()
        if sort_by not in ("created_at", "execution_duration"):
            return _json({"error": "sort_by must be 'created_at' or 'execution_duration'"}, 400)
        order = query.get("sort_order", "desc").lower()
        if order not in ("asc", "desc"):
            return _json({"error": "sort_order must be 'asc' or 'desc'"}, 400)
        limit: int | None = None
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                return _json({"error": "limit must be an integer"}, 400)
            if limit <= 0:
                return _json({"error": "limit must be a positive integer"}, 400)
        offset = 0
        if "offset" in query:
            try:
                offset = max(0, int(query["offset"]))
            except ValueError:
                return _json({"error": "offset must be an integer"}, 400)
        jobs = [job for job in self._all() if job["status"] in wanted]
        workflow_id = query.get("workflow_id")
        if workflow_id:
            jobs = [job for job in jobs if job.get("workflow_id") == workflow_id]

        def key(job: dict[str, Any]) -> Any:
            if sort_by == "execution_duration":
                start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
                return end - start if start and end else 0
            return job.get("create_time", 0)

        jobs.sort(key=key, reverse=order == "desc")
        total = len(jobs)
        page = jobs[offset:] if limit is None else jobs[offset : offset + limit]
        pagination = {
            "offset": offset,
            "limit": limit,
            "total": total,
            "has_more": offset + len(page) < total,
        }
        return _json({"jobs": page, "pagination": pagination})

    def find(self, job_id: str) -> dict[str, Any] | None:
        queue = self.s.queue
        entry = queue.history_item(job_id).get(job_id)
        if entry is not None:
            return _history_job(job_id, entry, detail=True)
        for item in queue.running():
            if item.prompt_id == job_id:
                return _queue_job(item, "in_progress", detail=True)
        for item in queue.pending():
            if item.prompt_id == job_id:
                return _queue_job(item, "pending", detail=True)
        return None

    async def get(self, request: Request) -> Response:
        job = self.find(request.path_params["job_id"])
        return _json(job) if job is not None else _json({"error": "Job not found"}, 404)

    def cancel(self, job_id: str) -> bool:
        """Interrupt it if it runs, dequeue it if it waits; False for an ended or unknown job."""
        queue = self.s.queue
        if any(item.prompt_id == job_id for item in queue.pending()) and queue.delete(job_id):
            return True
        if any(item.prompt_id == job_id for item in queue.running()):
            return self.s.executor.interrupt_if_running(job_id)
        return False

    async def cancel_one(self, request: Request) -> Response:
        return _json({"cancelled": self.cancel(request.path_params["job_id"])})

    async def cancel_many(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _json({"error": "Request body must be valid JSON"}, 400)
        job_ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(job_ids, list):
            return _json({"error": "job_ids must be a list"}, 400)
        invalid = [j if isinstance(j, str) else repr(j) for j in job_ids if not canonical_uuid(j)]
        if invalid:
            return _json({"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}, 400)
        cancelled = False
        for job_id in job_ids:
            cancelled = self.cancel(job_id) or cancelled
        return _json({"cancelled": cancelled})


# Assets ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Asset:
    id: str
    name: str
    hash: str
    path: Path
    size: int
    mime_type: str | None
    tags: list[str]
    created_at: str
    user_metadata: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return _pruned(
            {
                "id": self.id,
                "name": self.name,
                "hash": self.hash,
                "size": self.size,
                "mime_type": self.mime_type,
                "tags": self.tags,
                "user_metadata": self.user_metadata,
                "created_at": self.created_at,
                "updated_at": self.created_at,
            }
        )


def _content_hash(path: Path) -> str:
    # ComfyUI hashes with BLAKE3, which the standard library lacks; the emulator's hashes
    # have the same form ("blake3:" and 64 hex digits) but another digest.
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return "blake3:" + digest.hexdigest()


class AssetRegistry:
    """Every file uploaded through the server, by asset id and by content hash."""

    def __init__(self) -> None:
        self._by_id: dict[str, Asset] = {}

    def register(self, path: Path, name: str, upload_type: str, subfolder: str) -> Asset:
        content = _content_hash(path)
        for asset in self._by_id.values():
            if asset.hash == content and asset.name == name:
                return asset
        tags = [upload_type, *([subfolder] if subfolder else [])]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        asset = Asset(
            str(uuid.uuid4()), name, content, path, path.stat().st_size, mimetypes.guess_type(name)[0],
            tags, stamp,
        )  # fmt: skip
        self._by_id[asset.id] = asset
        return asset

    def upload_answer(self, asset: Asset) -> dict[str, Any]:
        """The ``asset`` object an /upload/image answer carries."""
        return {"id": asset.id, "name": asset.name, "asset_hash": asset.hash, "size": asset.size,
                "mime_type": asset.mime_type, "tags": asset.tags}  # fmt: skip

    def by_hash(self, content: str) -> Asset | None:
        return next((a for a in self._by_id.values() if a.hash == content and a.path.is_file()), None)

    def get(self, asset_id: str) -> Asset | None:
        return self._by_id.get(asset_id)

    def delete(self, asset_id: str) -> bool:
        return self._by_id.pop(asset_id, None) is not None

    def all(self) -> list[Asset]:
        return list(self._by_id.values())


def _asset_error(status: int, code: str, message: str) -> Response:
    return _json({"error": {"code": code, "message": message, "details": {}}}, status)


class _Assets:
    def __init__(self, registry: AssetRegistry, folder: Path) -> None:
        self.registry = registry
        self.folder = folder

    async def list(self, request: Request) -> Response:
        query = request.query_params
        try:
            limit = int(query.get("limit", 20))
            offset = int(query.get("offset", 0))
        except ValueError:
            return _asset_error(400, "INVALID_QUERY", "Validation failed.")
        assets = self.registry.all()
        name = query.get("name_contains")
        if name:
            assets = [a for a in assets if name.lower() in a.name.lower()]
        page = assets[offset : offset + limit]
        return _json({"assets": [a.public() for a in page], "total": len(assets),
                      "has_more": offset + len(page) < len(assets)})  # fmt: skip

    def _found(self, request: Request) -> Asset | Response:
        asset_id = str(request.path_params["id"])
        asset = self.registry.get(asset_id)
        if asset is None:
            return _asset_error(404, "ASSET_NOT_FOUND", f"AssetReference {asset_id} not found")
        return asset

    async def get(self, request: Request) -> Response:
        asset = self._found(request)
        return asset if isinstance(asset, Response) else _json(asset.public())

    async def content(self, request: Request) -> Response:
        asset = self._found(request)
        if isinstance(asset, Response):
            return asset
        if not asset.path.is_file():
            return _asset_error(404, "FILE_NOT_FOUND", "Underlying file not found on disk.")
        disposition = "inline" if request.query_params.get("disposition") == "inline" else "attachment"
        headers = {"Content-Disposition": f"{disposition}; filename*=UTF-8''{asset.name}",
                   "X-Content-Type-Options": "nosniff"}  # fmt: skip
        return FileResponse(
            asset.path, headers=headers, media_type=asset.mime_type or "application/octet-stream"
        )

    async def upload(self, request: Request) -> Response:
        """POST /api/assets: a multipart 'file' (and optional 'name'), kept in the input folder."""
        form = await request.form(max_part_size=4 << 20)
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return _asset_error(400, "MISSING_INPUT", "Provided hash not found and no file uploaded.")
            name = str(form.get("name") or upload.filename or "upload")
            if "/" in name or "\\" in name or ".." in name:
                return _asset_error(400, "INVALID_BODY", "Validation failed.")
            path = self.folder / name
            data = await upload.read()
            path.write_bytes(data)
            before = len(self.registry.all())
            asset = self.registry.register(path, name, "input", "")
            created = len(self.registry.all()) > before
            return _json({**asset.public(), "created_new": created}, 201 if created else 200)
        finally:
            await form.close()

    async def head_hash(self, request: Request) -> Response:
        found = self.registry.by_hash(str(request.path_params["hash"]).strip().lower())
        return Response(status_code=200 if found is not None else 404)

    async def delete(self, request: Request) -> Response:
        asset_id = str(request.path_params["id"])
        if not self.registry.delete(asset_id):
            return _asset_error(404, "ASSET_NOT_FOUND", f"AssetReference {asset_id} not found.")
        return Response(status_code=204)


def current_routes(state: EmulatorState) -> list[BaseRoute]:
    """The routes only the current profile serves (ComfyUI registers them under /api only)."""
    jobs = _Jobs(state)
    assets = _Assets(state.assets, state.folders.input)
    return [
        Route("/api/jobs", jobs.list, methods=["GET"]),
        Route("/api/jobs/cancel", jobs.cancel_many, methods=["POST"]),
        Route("/api/jobs/{job_id}", jobs.get, methods=["GET"]),
        Route("/api/jobs/{job_id}/cancel", jobs.cancel_one, methods=["POST"]),
        Route("/api/assets", assets.list, methods=["GET"]),
        Route("/api/assets", assets.upload, methods=["POST"]),
        Route("/api/assets/hash/{hash}", assets.head_hash, methods=["HEAD"]),
        Route("/api/assets/{id:uuid}", assets.get, methods=["GET"]),
        Route("/api/assets/{id:uuid}/content", assets.content, methods=["GET"]),
        Route("/api/assets/{id:uuid}", assets.delete, methods=["DELETE"]),
    ]
