"""The latest live preview images per client, served over HTTP so events stay small JSON."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["Preview", "PreviewStore"]


@dataclass(frozen=True, slots=True)
class Preview:
    mime: str
    data: bytes
    version: int


class PreviewStore:
    """Keeps the newest preview of each (prompt, node), at most ``slots`` of them."""

    def __init__(self, client_id: str, *, slots: int, prefix: str = "") -> None:
        self.client_id = client_id
        self.slots = slots
        self.prefix = prefix
        self._items: OrderedDict[tuple[str, str], Preview] = OrderedDict()
        self._version = 0

    def put(self, prompt_id: str, node: str, mime: str, data: bytes) -> None:
        """Keep a preview (the newest of its prompt and node), forgetting the oldest past ``slots``."""
        self._version += 1
        key = (prompt_id, node)
        self._items.pop(key, None)
        self._items[key] = Preview(mime, data, self._version)
        while len(self._items) > self.slots:
            self._items.popitem(last=False)

    def forget(self) -> None:
        """Drop every kept preview (the session is gone)."""
        self._items.clear()

    def url(self, prompt_id: str, node: str, version: int) -> str:
        """Where a preview is served; ``version`` makes each new image a new URL for caches."""
        path = "/".join(quote(part, safe="") for part in (self.client_id, prompt_id, node))
        return f"{self.prefix}/previews/{path}?v={version}"

    def get(self, prompt_id: str, node: str) -> Preview | None:
        return self._items.get((prompt_id, node))
