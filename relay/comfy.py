"""The relay's HTTP client for ComfyUI: one shared httpx client, errors mapped once.

httpx's exceptions never leave this module: connection failures become
:class:`UpstreamUnavailable` (502) and timeouts :class:`UpstreamTimeout` (504).

It also knows which ComfyUI it talks to (:meth:`ComfyClient.capabilities`): the version from
``/system_stats``, the feature flags, and whether the jobs API of current releases answers.
With it, a prompt's fate and its cancel are read and done one way or the other: from
``/api/jobs`` where present (one request per prompt, an atomic cancel), from ``/queue`` and
``/history`` (and ``/interrupt``) on 0.3.x servers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx
import orjson
import structlog

from relay.config import RelayConfig
from relay.errors import UpstreamTimeout, UpstreamUnavailable, UpstreamUnreached

__all__ = ["Capabilities", "ComfyClient", "Fate", "UpstreamAnswer"]

log = structlog.get_logger("relay.comfy")

# Output node classes assumed when /object_info cannot be read (the common built-ins).
_FALLBACK_OUTPUT_CLASSES = frozenset(
    {"SaveImage", "PreviewImage", "SaveImageWebsocket", "SaveAnimatedWEBP", "SaveAnimatedPNG", "PreviewAny",
     "VHS_VideoCombine", "SaveVideo", "SaveAudio", "PreviewAudio"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    status: int
    content: bytes
    content_type: str | None

    def json(self) -> Any:
        return orjson.loads(self.content)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the ComfyUI behind the relay offers."""

    version: str | None = None  # system.comfyui_version
    jobs: bool = False  # GET /api/jobs answers: job status and atomic cancel
    features: Mapping[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {"version": self.version, "jobs_api": self.jobs, "assets": bool(self.features.get("assets"))}


@dataclass(frozen=True, slots=True)
class Fate:
    """Where a prompt is: still ``alive`` (queued or running), ``ended`` (with its history
    entry: ``outputs`` and ``status``), or ``gone`` (ComfyUI does not know it)."""

    state: Literal["alive", "ended", "gone"]
    entry: dict[str, Any] | None = None


_ENDED_JOB = frozenset({"completed", "failed", "cancelled"})
# An answer that is not the JSON expected counts as no answer (the caller's default stands).
_NOT_JSON = (orjson.JSONDecodeError, AttributeError, TypeError)


class ComfyClient:
    def __init__(
        self,
        config: RelayConfig,
        *,
        base_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        timeout = httpx.Timeout(
            connect=config.http_connect_timeout,
            read=config.http_read_timeout,
            write=config.http_read_timeout,
            pool=config.http_connect_timeout,
        )
        limits = httpx.Limits(max_connections=config.http_max_connections, max_keepalive_connections=20)
        self.http = httpx.AsyncClient(
            base_url=(base_url or config.comfyui_url).rstrip("/"),
            timeout=timeout,
            limits=limits,
            transport=transport,
        )
        self._capabilities: Capabilities | None = None
        self._output_classes: frozenset[str] | None = None
        self._all_classes: frozenset[str] = frozenset()
        self._object_info_lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> UpstreamAnswer:
        """Send a request to ComfyUI; connection problems and timeouts become relay errors."""
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"ComfyUI did not answer {method} {path} in time") from exc
        except httpx.ConnectError as exc:
            raise UpstreamUnreached(f"ComfyUI is unreachable: {exc.__class__.__name__}") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"ComfyUI is unreachable: {exc.__class__.__name__}") from exc
        return UpstreamAnswer(response.status_code, response.content, response.headers.get("content-type"))

    async def open_stream(
        self, method: str, path: str, *, headers: list[tuple[str, str]], content: Any = None
    ) -> httpx.Response:
        """Send a request and return the response with its body still unread (the caller closes it)."""
        request = self.http.build_request(method, path, headers=headers, content=content)
        try:
            return await self.http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"ComfyUI did not answer {method} {request.url.path} in time") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"ComfyUI is unreachable: {exc.__class__.__name__}") from exc

    @staticmethod
    async def body_of(response: httpx.Response) -> AsyncIterator[bytes]:
        """A streamed response's raw bytes (not decoded), closing the response however it ends.

        A connection lost half-way ends the body early; the client sees a short download
        (its Content-Length says so) and the log says why.
        """
        try:
            # As the network delivers them: re-chunking would only add a copy.
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("ComfyUI response cut short", path=response.request.url.path, error=repr(exc))
        finally:
            await response.aclose()

    async def post_prompt(self, body: dict[str, Any]) -> UpstreamAnswer:
        return await self.post_json("/prompt", body)

    async def history(self, prompt_id: str) -> dict[str, Any]:
        # Prompt ids may be chosen by clients: never let one change the path.
        answer = await self.request("GET", f"/history/{quote(prompt_id, safe='')}")
        try:
            body = answer.json() if answer.status == 200 else {}
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable(
                f"ComfyUI's /history answer is not JSON: {answer.content[:80]!r}"
            ) from None
        return body if isinstance(body, dict) else {}

    async def capabilities(self, *, fresh: bool = False) -> Capabilities:
        """The server's version, flags and jobs API, asked once (again with ``fresh``).

        Raises:
            UpstreamUnavailable, UpstreamTimeout: ComfyUI could not be asked.
        """
        if self._capabilities is not None and not fresh:
            return self._capabilities
        version = None
        stats = await self.request("GET", "/system_stats")
        with contextlib.suppress(*_NOT_JSON):
            system = stats.json().get("system") if stats.status == 200 else None
            value = system.get("comfyui_version") if isinstance(system, dict) else None
            version = value if isinstance(value, str) else None
        features: dict[str, Any] = {}
        answer = await self.request("GET", "/features")
        with contextlib.suppress(*_NOT_JSON):
            body = answer.json() if answer.status == 200 else None
            features = body if isinstance(body, dict) else {}
        jobs = False
        answer = await self.request("GET", "/api/jobs", params={"limit": "1"})
        with contextlib.suppress(*_NOT_JSON):
            body = answer.json() if answer.status == 200 else None
            jobs = isinstance(body, dict) and isinstance(body.get("jobs"), list)
        self._capabilities = Capabilities(version, jobs, features)
        log.info("ComfyUI found", version=version, jobs_api=jobs)
        return self._capabilities

    async def fates(self, prompt_ids: Iterable[str]) -> dict[str, Fate]:
        """Where each prompt is now, from the jobs API when ComfyUI has it, else queue and history.

        Raises:
            UpstreamUnavailable, UpstreamTimeout: ComfyUI could not tell (nothing is concluded).
        """
        prompt_ids = list(prompt_ids)
        if (await self.capabilities()).jobs:
            fates = await self._job_fates(prompt_ids)
            if fates is not None:
                return fates
            await self.capabilities(fresh=True)  # the jobs API went away: a different server now
        alive = await self.queue_ids()
        fates = {}
        for prompt_id in prompt_ids:
            if prompt_id in alive:
                fates[prompt_id] = Fate("alive")
                continue
            entry = (await self.history(prompt_id)).get(prompt_id)
            fates[prompt_id] = Fate("ended", entry) if isinstance(entry, dict) else Fate("gone")
        return fates

    async def _job_fates(self, prompt_ids: list[str]) -> dict[str, Fate] | None:
        fates: dict[str, Fate] = {}
        for prompt_id in prompt_ids:
            answer = await self.request("GET", f"/api/jobs/{quote(prompt_id, safe='')}")
            try:
                job = answer.json()
            except orjson.JSONDecodeError:
                job = None
            if answer.status == 404 and isinstance(job, dict) and "error" in job:
                fates[prompt_id] = Fate("gone")
            elif answer.status == 404:
                return None  # no such route: not the server the capabilities were read from
            elif answer.status != 200 or not isinstance(job, dict):
                raise UpstreamUnavailable(f"ComfyUI answered GET /api/jobs/{{id}} with HTTP {answer.status}")
            elif job.get("status") in _ENDED_JOB:
                entry = {"outputs": job.get("outputs") or {}, "status": job.get("execution_status") or {}}
                fates[prompt_id] = Fate("ended", entry)
            else:
                fates[prompt_id] = Fate("alive")
        return fates

    async def cancel(self, prompt_id: str) -> bool:
        """Cancel a prompt whatever its state: dequeue it if it waits, interrupt it if it runs.
        Whether anything was cancelled (False: it had ended, or ComfyUI does not know it).

        Raises:
            UpstreamUnavailable, UpstreamTimeout: ComfyUI could not be asked.
        """
        if (await self.capabilities()).jobs:
            answer = await self.request("POST", f"/api/jobs/{quote(prompt_id, safe='')}/cancel")
            with contextlib.suppress(*_NOT_JSON):
                body = answer.json() if answer.status == 200 else None
                if isinstance(body, dict):
                    return bool(body.get("cancelled"))
        # 0.3.x: the same two moves, in the order that leaves no gap between them.
        running, pending = await self._queue_lists()
        cancelled = False
        if prompt_id in pending:
            await self.post_json("/queue", {"delete": [prompt_id]})
            running, pending = await self._queue_lists()
            cancelled = prompt_id not in pending and prompt_id not in running
        if prompt_id in running:
            await self.post_json("/interrupt", {"prompt_id": prompt_id})
            cancelled = True
        return cancelled

    async def post_json(self, path: str, body: Any) -> UpstreamAnswer:
        return await self.request(
            "POST", path, content=orjson.dumps(body), headers={"Content-Type": "application/json"}
        )

    async def queue_items(self) -> list[list[Any]]:
        """ComfyUI's queue, running first: ``[number, prompt_id, prompt, extra_data, ...]`` each.

        Raises:
            UpstreamUnavailable, UpstreamTimeout: ComfyUI could not be asked.
        """
        running, pending = await self._queue_answer()
        return running + pending

    async def _queue_lists(self) -> tuple[set[str], set[str]]:
        """Ids running and ids waiting."""
        running, pending = await self._queue_answer()
        return {str(i[1]) for i in running}, {str(i[1]) for i in pending}

    async def _queue_answer(self) -> tuple[list[list[Any]], list[list[Any]]]:
        answer = await self.request("GET", "/queue")
        if answer.status != 200:
            raise UpstreamUnavailable(f"ComfyUI answered GET /queue with HTTP {answer.status}")
        try:
            body = answer.json()
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable(
                f"ComfyUI's /queue answer is not JSON: {answer.content[:80]!r}"
            ) from None
        lists: list[list[list[Any]]] = []
        for key in ("queue_running", "queue_pending"):
            items = body.get(key, []) if isinstance(body, dict) else []
            lists.append(
                [i for i in items if isinstance(i, list) and len(i) > 1] if isinstance(items, list) else []
            )
        return lists[0], lists[1]

    async def queue_ids(self) -> set[str]:
        """Ids of the prompts ComfyUI is running or holding."""
        running, pending = await self._queue_lists()
        return running | pending

    async def output_classes(self, needed: Iterable[str] = ()) -> frozenset[str]:
        """Class types that are output nodes, from /object_info (read once, again on a new class)."""
        needed = set(needed)
        async with self._object_info_lock:
            known = self._output_classes
            if known is not None and needed <= self._all_classes:
                return known
            try:
                answer = await self.request("GET", "/object_info")
                info = answer.json() if answer.status == 200 else None
            except (UpstreamUnavailable, UpstreamTimeout, ValueError):
                info = None
            if not isinstance(info, dict):
                return known if known is not None else _FALLBACK_OUTPUT_CLASSES
            self._all_classes = frozenset(info)
            self._output_classes = frozenset(
                name for name, spec in info.items() if isinstance(spec, dict) and spec.get("output_node")
            )
            return self._output_classes
