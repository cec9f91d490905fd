"""The result cache, with the server's observable semantics (PROTOCOL.md §4, traces 02b, 03, 05).

A node's cache key is its class type, its widget values, its fingerprint (a file hash for
LoadImage) and, recursively, the keys of the nodes feeding it, so equal sub-graphs hit the
cache whatever their node ids. After each prompt only the entries that prompt's nodes use
are kept: a result survives from one prompt to the next, not across an unrelated prompt.
Node objects (which hold per-instance state such as PreviewImage's random file prefix)
are kept by (node id, class type) under the same rule.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from relay.emulator.nodes import Catalogue, Node, NodeEnv

__all__ = ["CachedUI", "ResultCache"]


@dataclass(frozen=True, slots=True)
class CachedUI:
    output: dict[str, Any] | None
    meta: dict[str, Any]


class ResultCache:
    def __init__(self) -> None:
        self._outputs: dict[str, tuple[Any, ...]] = {}
        self._ui: dict[str, CachedUI] = {}
        self._objects: dict[tuple[str, str], Node] = {}
        self._keys: dict[str, str] = {}

    def set_prompt(self, prompt: dict[str, Any], catalogue: Catalogue, env: NodeEnv) -> None:
        """Compute every node's key for this prompt and drop what it does not use."""
        keys: dict[str, str] = {}

        def key_of(node_id: str, trail: frozenset[str]) -> str:
            if node_id in keys:
                return keys[node_id]
            node = prompt[node_id]
            class_type = node["class_type"]
            node_type = catalogue.get(class_type)
            inputs = node.get("inputs", {})
            parts: list[Any] = [class_type]
            if node_type is not None:
                parts.append(
                    repr(node_type().fingerprint(env, inputs)) if _has_fingerprint(node_type) else None
                )
                if node_type.not_idempotent:
                    parts.append(node_id)
            for name in sorted(inputs):
                value = inputs[name]
                if (
                    isinstance(value, list)
                    and len(value) == 2
                    and isinstance(value[0], str)
                    and value[0] in prompt
                ):
                    if value[0] in trail:
                        parts.append([name, "cycle", value])
                    else:
                        parts.append([name, "link", key_of(value[0], trail | {node_id}), value[1]])
                else:
                    parts.append([name, "value", value])
            digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()
            keys[node_id] = digest
            return digest

        for node_id in prompt:
            key_of(node_id, frozenset())
        self._keys = keys
        used = set(keys.values())
        self._outputs = {k: v for k, v in self._outputs.items() if k in used}
        self._ui = {k: v for k, v in self._ui.items() if k in used}
        live = {(node_id, prompt[node_id]["class_type"]) for node_id in prompt}
        self._objects = {k: v for k, v in self._objects.items() if k in live}

    def outputs(self, node_id: str) -> tuple[Any, ...] | None:
        return self._outputs.get(self._keys[node_id])

    def is_cached(self, node_id: str) -> bool:
        return self._keys.get(node_id) in self._outputs

    def ui(self, node_id: str) -> CachedUI | None:
        return self._ui.get(self._keys[node_id])

    def store(self, node_id: str, outputs: tuple[Any, ...], ui: CachedUI | None) -> None:
        key = self._keys[node_id]
        self._outputs[key] = outputs
        if ui is not None:
            self._ui[key] = ui

    def node_object(self, node_id: str, node_type: type[Node]) -> Node:
        key = (node_id, node_type.class_type)
        obj = self._objects.get(key)
        if obj is None:
            obj = self._objects[key] = node_type()
        return obj

    def ui_for(self, node_ids: list[str]) -> dict[str, CachedUI]:
        """UI entries this prompt's nodes have, cached ones included (what history reports)."""
        found = {}
        for node_id in node_ids:
            entry = self._ui.get(self._keys.get(node_id, ""))
            if entry is not None:
                found[node_id] = entry
        return found


def _has_fingerprint(node_type: type[Node]) -> bool:
    return node_type.fingerprint is not Node.fingerprint
