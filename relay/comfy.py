"""The relay's HTTP client for ComfyUI: one shared httpx client, errors mapped once.

httpx's exceptions never leave this module: connection failures become
:class:`UpstreamUnavailable` (502) and timeouts :class:`UpstreamTimeout` (504).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import structlog

from relay.config import RelayConfig
from relay.errors import UpstreamTimeout, UpstreamUnavailable

__all__ = ["ComfyClient", "UpstreamAnswer"]

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


class ComfyClient:
    def __init__(self, config: RelayConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        timeout = httpx.Timeout(
            connect=config.http_connect_timeout,
            read=config.http_read_timeout,
            write=config.http_read_timeout,
            pool=config.http_connect_timeout,
        )
        limits = httpx.Limits(max_connections=config.http_max_connections, max_keepalive_connections=20)
        self.http = httpx.AsyncClient(
            base_url=config.comfyui_url.rstrip("/"), timeout=timeout, limits=limits, transport=transport
        )
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
        return await self.request(
            "POST", "/prompt", content=orjson.dumps(body), headers={"Content-Type": "application/json"}
        )

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

    async def queue_ids(self) -> set[str]:
        """Ids of the prompts ComfyUI is running or holding."""
        answer = await self.request("GET", "/queue")
        if answer.status != 200:
            # Without the queue nothing can be called finished or lost.
            raise UpstreamUnavailable(f"ComfyUI answered GET /queue with HTTP {answer.status}")
        try:
            body = answer.json()
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable(
                f"ComfyUI's /queue answer is not JSON: {answer.content[:80]!r}"
            ) from None
        ids: set[str] = set()
        for key in ("queue_running", "queue_pending"):
            for item in body.get(key, []) if isinstance(body, dict) else []:
                if isinstance(item, list) and len(item) > 1:
                    ids.add(str(item[1]))
        return ids

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
