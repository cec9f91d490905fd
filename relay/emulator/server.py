"""The emulated server: state, lifespan, HTTP routes and the WebSocket endpoint.

Every public route is served at its own path and again under ``/api`` (``/api/ws``,
``/api/prompt``...); ``/internal/*`` is not mirrored, as on the real server (PROTOCOL.md §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from relay.emulator import images
from relay.emulator.cache import ResultCache
from relay.emulator.config import EmulatorConfig
from relay.emulator.current import AssetRegistry, canonical_uuid, current_routes
from relay.emulator.edge import RequestLog, ServerEdge
from relay.emulator.errors import ServerCrash
from relay.emulator.executor import Executor
from relay.emulator.files import Folders
from relay.emulator.files_http import serve_view, upload
from relay.emulator.nodes import Catalogue, NodeEnv, default_catalogue
from relay.emulator.prompt_queue import PromptQueue
from relay.emulator.sockets import Connection, SocketHub
from relay.emulator.validation import validate_prompt
from relay.protocol import encode_message

__all__ = ["EmulatorState", "create_app"]

logger = logging.getLogger("relay.emulator")

# extra_data keys the server strips before a prompt is queued or stored in history.
_SENSITIVE_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
_JSON = "application/json; charset=utf-8"


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status_code=status, media_type=_JSON)


async def _request_json(request: Request) -> Any:
    """The body as JSON; the server answers malformed or empty bodies with its 500 page."""
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise ServerCrash("body is not JSON") from exc


async def _clear_or_delete(
    request: Request, clear: Callable[[], None], delete: Callable[[str], object]
) -> None:
    """POST /queue and /history: ``{"clear": true}`` and/or ``{"delete": [ids]}``."""
    body = await _request_json(request)
    if not isinstance(body, dict):
        raise ServerCrash("operation is not an object")
    if body.get("clear"):
        clear()
    for prompt_id in body.get("delete", []) or []:
        delete(str(prompt_id))


@dataclass(slots=True)
class LogBook:
    """The server log lines that PATCH /internal/logs/subscribe streams over the socket."""

    hub: SocketHub
    entries: deque[dict[str, str]] = field(default_factory=lambda: deque(maxlen=300))
    subscribers: set[str] = field(default_factory=set)

    def add(self, message: str) -> None:
        entry = {"t": datetime.now().isoformat(), "m": message}
        self.entries.append(entry)
        for sid in list(self.subscribers):
            self.hub.send_json_nowait("logs", {"entries": [entry], "size": None}, sid)


class EmulatorState:
    """Everything one emulated server process holds. Created by the app factory."""

    def __init__(self, config: EmulatorConfig, folders: Folders, catalogue: Catalogue) -> None:
        self.config = config
        self.folders = folders
        self.catalogue = catalogue
        self.env = NodeEnv(folders, config.models)
        self.hub = SocketHub(duplicate_client_quirk=config.duplicate_client_quirk)
        self.queue = PromptQueue(self._queue_changed, config.history_size)
        self.cache = ResultCache()
        self.executor = Executor(
            catalogue=catalogue,
            env=self.env,
            cache=self.cache,
            hub=self.hub,
            speed=config.speed,
            reports_activity=config.current,
            preview_method_per_prompt=config.current,
        )
        # Uploads registered as assets (the current profile; 0.3.64 has no asset system).
        self.assets = AssetRegistry()
        self.logs = LogBook(self.hub)
        # What reached this server, newest last (tests check what a proxy let through).
        self.requests: deque[tuple[str, str, str, Headers]] = deque(maxlen=1000)
        self._rng = random.Random(config.seed)
        self._tasks: list[asyncio.Task[None]] = []
        self._scanned = False

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue.remaining}}

    def _queue_changed(self) -> None:
        self.hub.send_json_nowait("status", {"status": self.queue_info()}, None)

    def features(self) -> dict[str, Any]:
        if not self.config.current:
            return {"supports_preview_metadata": True, "max_upload_size": self.config.advertised_upload_size}
        return {
            "supports_preview_metadata": True,
            "supports_model_type_tags": True,
            "max_upload_size": self.config.advertised_upload_size,
            "extension": {"manager": {"supports_v4": True}},
            "node_replacements": True,
            "assets": True,
        }

    def announce_scan(self) -> None:
        """The asset seeder's scan, announced to every socket (current ComfyUI scans when the
        node list is first asked for): message types a client has never seen before."""
        if not self.config.current or self._scanned:
            return
        self._scanned = True
        roots = ["models", "input", "output"]
        files = sum(1 for folder in (self.folders.input, self.folders.output) for _ in folder.rglob("*"))
        self.hub.send_json_nowait(
            "assets.seed.started", {"roots": roots, "total": files, "phase": "fast"}, None
        )
        self.hub.send_json_nowait(
            "assets.seed.completed", {"roots": roots, "total": files, "phase": "fast", "created": files}, None
        )

    def order_outputs(self, outputs: list[str]) -> list[str]:
        if self.config.output_order == "random":
            shuffled = list(outputs)
            self._rng.shuffle(shuffled)
            return shuffled

        def key(node_id: str) -> tuple[int, int, str]:
            return (1, int(node_id), node_id) if node_id.isdigit() else (0, 0, node_id)

        return sorted(outputs, key=key, reverse=True)

    async def start(self) -> None:
        self.folders.create()
        # ComfyUI ships an example.png in its input folder; graphs and demos may rely on it.
        example = self.folders.input / "example.png"
        if not example.exists():
            picture = images.generated_art(768, 1024, 7, "example portrait")
            example.write_bytes(images.encode(picture, "PNG"))
        # The server empties its temp folder when it starts.
        for entry in self.folders.temp.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self._tasks = [
            asyncio.create_task(self.hub.publish_forever(), name="emulator-publisher"),
            asyncio.create_task(self._work_forever(), name="emulator-worker"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.hub.close_all(1001)

    async def _work_forever(self) -> None:
        while True:
            item = await self.queue.get()
            started = time.perf_counter()
            outcome = await self.executor.execute(item)
            self.queue.task_done(item, {"outputs": outcome.outputs, "meta": outcome.meta}, outcome.status)
            if item.client_id is not None:
                await self.hub.send_json(
                    "executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id
                )
            self.logs.add(f"Prompt executed in {time.perf_counter() - started:.2f} seconds\n")


class _Routes:
    """Request handlers bound to one EmulatorState."""

    def __init__(self, state: EmulatorState) -> None:
        self.s = state

    # WebSocket ---------------------------------------------------------------------------

    async def websocket(self, websocket: WebSocket) -> None:
        sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
        await websocket.accept()
        connection = Connection(websocket, sid)
        hub = self.s.hub
        hub.register(connection)
        try:
            await connection.send(encode_message("status", {"status": self.s.queue_info(), "sid": sid}))
            current = self.s.executor.current
            if current is not None and current.client_id == sid and current.node is not None:
                # Reconnect replay: no prompt_id and no display_node (trace 08, socket C).
                await connection.send(encode_message("executing", {"node": current.node}))
            first = True
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    continue  # binary frames from clients are ignored
                try:
                    data = json.loads(text)
                except ValueError:
                    data = None
                if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                    flags = data.get("data")
                    if isinstance(flags, dict) and sid in hub.feature_flags:
                        hub.feature_flags[sid] = flags
                    await connection.send(encode_message("feature_flags", self.s.features()))
                first = False
        except WebSocketDisconnect:
            pass
        finally:
            hub.unregister(connection)

    # Prompt and queue --------------------------------------------------------------------

    async def get_prompt(self, request: Request) -> Response:
        return _json(self.s.queue_info())

    async def post_prompt(self, request: Request) -> Response:
        self.s.logs.add("got prompt\n")
        body = await _request_json(request)
        if not isinstance(body, (dict, list, str)):
            raise ServerCrash("unusable body")
        if isinstance(body, dict) and "number" in body:
            try:
                number: float | int = float(body["number"])
            except (TypeError, ValueError) as exc:
                raise ServerCrash("number is not a number") from exc
        else:
            number = self.s.queue.next_number(front=isinstance(body, dict) and bool(body.get("front")))
        if not isinstance(body, dict) or "prompt" not in body:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return _json({"error": error, "node_errors": {}}, 400)
        prompt = body["prompt"]
        if not self.s.config.current:
            prompt_id = str(body["prompt_id"]) if "prompt_id" in body else str(uuid.uuid4())
        elif body.get("prompt_id") is None:  # absent or null: the server makes one
            prompt_id = str(uuid.uuid4())
        elif canonical_uuid(body["prompt_id"]):
            prompt_id = body["prompt_id"]
        else:
            error = {
                "type": "invalid_prompt_id",
                "message": "prompt_id must be a valid UUID",
                "details": "prompt_id must be a canonical lowercase hyphenated UUID; leave it out for one",
                "extra_info": {},
            }
            return _json({"error": error, "node_errors": {}}, 400)
        targets = body.get("partial_execution_targets")
        if targets is not None and not isinstance(targets, list):
            raise ServerCrash("partial_execution_targets is not a list")
        validation = validate_prompt(
            prompt, self.s.catalogue, self.s.env, targets=targets, order=self.s.order_outputs
        )
        if not validation.ok:
            return _json({"error": validation.error, "node_errors": validation.node_errors}, 400)
        extra_data = body.get("extra_data", {})
        if not isinstance(extra_data, dict):
            raise ServerCrash("extra_data is not an object")
        extra_data = dict(extra_data)
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        for key in _SENSITIVE_KEYS:
            extra_data.pop(key, None)
        if self.s.config.current:
            extra_data["create_time"] = int(time.time() * 1000)
        item = self.s.queue.new_item(number, prompt_id, prompt, extra_data, validation.outputs)
        await self.s.queue.put(item)
        return _json({"prompt_id": prompt_id, "number": number, "node_errors": validation.node_errors})

    async def get_queue(self, request: Request) -> Response:
        return _json(self.s.queue.snapshot())

    async def post_queue(self, request: Request) -> Response:
        await _clear_or_delete(request, self.s.queue.wipe, self.s.queue.delete)
        return Response(status_code=200)

    async def post_interrupt(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        self.s.executor.interrupt(str(prompt_id) if prompt_id is not None else None)
        return Response(status_code=200)

    async def get_history(self, request: Request) -> Response:
        query = request.query_params
        try:
            max_items = int(query["max_items"]) if "max_items" in query else None
            offset = int(query.get("offset", -1))
        except ValueError as exc:
            raise ServerCrash("bad paging parameter") from exc
        return _json(self.s.queue.history(max_items, offset))

    async def get_history_item(self, request: Request) -> Response:
        return _json(self.s.queue.history_item(request.path_params["prompt_id"]))

    async def post_history(self, request: Request) -> Response:
        await _clear_or_delete(request, self.s.queue.wipe_history, self.s.queue.delete_history)
        return Response(status_code=200)

    async def post_free(self, request: Request) -> Response:
        await _request_json(request)
        return Response(status_code=200)

    # Files --------------------------------------------------------------------------------

    async def view(self, request: Request) -> Response:
        resolve = self._by_hash if self.s.config.current else None
        return await serve_view(request, self.s.folders, by_hash=resolve)

    def _by_hash(self, content: str) -> Path | None:
        asset = self.s.assets.by_hash(content)
        return asset.path if asset is not None else None

    def _register(self, path: Path, name: str, upload_type: str, subfolder: str) -> dict[str, Any] | None:
        if not self.s.config.current:
            return None
        return self.s.assets.upload_answer(self.s.assets.register(path, name, upload_type, subfolder))

    async def upload_image(self, request: Request) -> Response:
        return await upload(request, self.s.folders, register=self._register)

    async def upload_mask(self, request: Request) -> Response:
        return await upload(request, self.s.folders, mask=True, register=self._register)

    async def view_metadata(self, request: Request) -> Response:
        # No model file carries safetensors metadata here.
        return Response(status_code=404)

    # Information ---------------------------------------------------------------------------

    async def object_info(self, request: Request) -> Response:
        self.s.announce_scan()
        return _json(self.s.catalogue.object_info(self.s.env))

    async def object_info_node(self, request: Request) -> Response:
        node_class = request.path_params["node_class"]
        node_type = self.s.catalogue.get(node_class)
        return _json({node_class: node_type.object_info(self.s.env)} if node_type is not None else {})

    async def system_stats(self, request: Request) -> Response:
        total, free = _memory()
        stats: dict[str, Any] = {
            "system": {
                "os": os.name,
                "ram_total": total,
                "ram_free": free,
                "comfyui_version": self.s.config.version,
                "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.95",
                "required_templates_version": "0.1.95",
                "python_version": sys.version,
                "pytorch_version": "emulated",
                "embedded_python": False,
                "argv": ["comfy-relay", "emulator"],
            },
            "devices": [
                {
                    "name": "cpu",
                    "type": "cpu",
                    "index": None,
                    "vram_total": total,
                    "vram_free": free,
                    "torch_vram_total": total,
                    "torch_vram_free": free,
                }
            ],
        }
        if self.s.config.current:
            # Current ComfyUI lists every device (the primary first) and says more about itself.
            stats["system"].update(
                {
                    "required_frontend_version": "1.30.2",
                    "installed_templates_version": "0.3.12",
                    "required_templates_version": "0.3.12",
                    "comfy_package_versions": {"comfyui-frontend-package": "1.30.2"},
                    "deploy_environment": "local",
                }
            )
        return _json(stats)

    async def features(self, request: Request) -> Response:
        return _json(self.s.features())

    async def models(self, request: Request) -> Response:
        return _json(list(self.s.config.models))

    async def model_folder(self, request: Request) -> Response:
        folder = request.path_params["folder"]
        if folder not in self.s.config.models:
            return Response(status_code=404)
        return _json(list(self.s.config.models[folder]))

    def constant(self, value: Any) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return _json(value)

        return handler

    async def userdata(self, request: Request) -> Response:
        return Response("Directory not found", status_code=404, media_type="text/plain")

    async def index(self, request: Request) -> Response:
        headers = {"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"}
        return HTMLResponse(_INDEX_HTML, headers=headers)

    # Internal (not mirrored under /api) ----------------------------------------------------

    async def internal_logs(self, request: Request) -> Response:
        return _json("".join(entry["m"] for entry in self.s.logs.entries))

    async def internal_logs_raw(self, request: Request) -> Response:
        return _json({"entries": list(self.s.logs.entries), "size": {"cols": 80, "rows": 24}})

    async def internal_logs_subscribe(self, request: Request) -> Response:
        body = await _request_json(request)
        if not isinstance(body, dict):
            raise ServerCrash("subscription is not an object")
        client_id = str(body.get("clientId"))
        if body.get("enabled"):
            self.s.logs.subscribers.add(client_id)
        else:
            self.s.logs.subscribers.discard(client_id)
        return Response(status_code=200)

    async def internal_folder_paths(self, request: Request) -> Response:
        base = self.s.folders.output.parent / "models"
        return _json({folder: [str(base / folder)] for folder in self.s.config.models})

    async def internal_files(self, request: Request) -> Response:
        folder = self.s.folders.by_type(request.path_params["directory_type"])
        if folder is None:
            return Response("Invalid directory type", status_code=400, media_type="text/plain")
        files = [entry for entry in folder.iterdir() if entry.is_file()]
        files.sort(key=lambda entry: entry.stat().st_mtime, reverse=True)
        return _json([entry.name for entry in files])

    def routes(self) -> list[BaseRoute]:
        public: list[tuple[str, Any, list[str]]] = [
            ("/", self.index, ["GET"]),
            ("/embeddings", self.constant([]), ["GET"]),
            ("/models", self.models, ["GET"]),
            ("/models/{folder}", self.model_folder, ["GET"]),
            ("/extensions", self.constant([]), ["GET"]),
            ("/upload/image", self.upload_image, ["POST"]),
            ("/upload/mask", self.upload_mask, ["POST"]),
            ("/view", self.view, ["GET"]),
            ("/view_metadata/{folder_name}", self.view_metadata, ["GET"]),
            ("/system_stats", self.system_stats, ["GET"]),
            ("/features", self.features, ["GET"]),
            ("/prompt", self.get_prompt, ["GET"]),
            ("/prompt", self.post_prompt, ["POST"]),
            ("/object_info", self.object_info, ["GET"]),
            ("/object_info/{node_class}", self.object_info_node, ["GET"]),
            ("/history", self.get_history, ["GET"]),
            ("/history", self.post_history, ["POST"]),
            ("/history/{prompt_id}", self.get_history_item, ["GET"]),
            ("/queue", self.get_queue, ["GET"]),
            ("/queue", self.post_queue, ["POST"]),
            ("/interrupt", self.post_interrupt, ["POST"]),
            ("/free", self.post_free, ["POST"]),
            ("/users", self.constant({"storage": "server", "migrated": True}), ["GET"]),
            ("/settings", self.constant({}), ["GET"]),
            ("/i18n", self.constant(None), ["GET"]),
            ("/workflow_templates", self.constant({}), ["GET"]),
            ("/userdata", self.userdata, ["GET"]),
        ]
        routes: list[BaseRoute] = current_routes(self.s) if self.s.config.current else []
        for prefix in ("", "/api"):
            routes.append(WebSocketRoute(prefix + "/ws", self.websocket))
            routes += [Route(prefix + path, handler, methods=methods) for path, handler, methods in public]
        routes += [
            Route("/internal/logs", self.internal_logs, methods=["GET"]),
            Route("/internal/logs/raw", self.internal_logs_raw, methods=["GET"]),
            Route("/internal/logs/subscribe", self.internal_logs_subscribe, methods=["PATCH"]),
            Route("/internal/folder_paths", self.internal_folder_paths, methods=["GET"]),
            Route("/internal/files/{directory_type}", self.internal_files, methods=["GET"]),
        ]
        return routes


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


async def _not_found(request: Request, exc: Exception) -> Response:
    # The server's 404 for an unknown path: an empty octet-stream body (trace 13).
    return Response(status_code=404, media_type="application/octet-stream")


def _folders(config: EmulatorConfig) -> tuple[Folders, Path | None]:
    scratch: Path | None = None
    if config.output_dir is None or config.input_dir is None or config.temp_dir is None:
        scratch = Path(tempfile.mkdtemp(prefix="comfy-emulator-"))
    base = scratch or Path()
    folders = Folders(
        output=(config.output_dir or base / "output").resolve(),
        input=(config.input_dir or base / "input").resolve(),
        temp=(config.temp_dir or base / "temp").resolve(),
    )
    return folders, scratch


def create_app(config: EmulatorConfig | None = None, *, catalogue: Catalogue | None = None) -> Starlette:
    """Build the emulated server as an ASGI app. Its state is ``app.state.emulator``."""
    config = config or EmulatorConfig()
    folders, scratch = _folders(config)
    state = EmulatorState(config, folders, catalogue or default_catalogue())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    edge = Middleware(
        ServerEdge,
        cors_origin=config.cors_origin,
        max_body=config.max_upload_bytes,
        compress=config.compress_responses,
    )
    app = Starlette(
        routes=_Routes(state).routes(),
        middleware=[Middleware(RequestLog, log=state.requests), edge],
        exception_handlers={404: _not_found, HTTPException: _http_exception},
        lifespan=lifespan,
    )
    app.state.emulator = state
    return app


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return await _not_found(request, exc)
    text = f"{exc.status_code}: {exc.detail}"
    return Response(text, status_code=exc.status_code, media_type="text/plain", headers=exc.headers)


_INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ComfyUI emulator</title></head>
<body style="font-family: sans-serif; max-width: 40rem; margin: 3rem auto">
<h1>ComfyUI emulator</h1>
<p>This server speaks ComfyUI's HTTP and WebSocket protocol for tests and demos.
It has no user interface: submit API-format graphs to <code>POST /prompt</code> and watch
<code>/ws?clientId=...</code>. <code>GET /object_info</code> lists the node types it knows.</p>
</body></html>
"""
