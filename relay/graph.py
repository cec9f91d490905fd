"""ComfyUI's graph rules: which nodes a prompt runs, and in what order (PROTOCOL.md §4).

Shared by the emulator, which runs graphs, and the relay, which predicts the steps of a
prompt before it runs.

Only nodes that feed the chosen outputs run, and a node whose result is cached is not
visited at all unless it is itself an output. Among the nodes that are ready, the server
prefers, in turn: an output node; a node that directly feeds an output; a node two steps
from an output; then the earliest discovered. Discovery walks each output's inputs
depth-first, last input first, which is what makes ``EmptyImage -> PreviewImage`` run before
``ImageInvert -> SaveImage`` in trace 01.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["CycleError", "ExecutionList", "expected_order", "links", "upstream_of"]


def links(node: Mapping[str, Any]) -> list[str]:
    """Ids of the nodes this node takes input from (``[node_id, output_index]`` values)."""
    inputs = node.get("inputs", {})
    if not isinstance(inputs, dict):
        return []
    return [v[0] for v in inputs.values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]


def upstream_of(prompt: Mapping[str, Any], outputs: Iterable[str]) -> set[str]:
    """The outputs and every node they depend on (the nodes a prompt considers)."""
    seen: set[str] = set()
    stack = [o for o in outputs if o in prompt]
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        node = prompt[node_id]
        if isinstance(node, dict):
            stack.extend(source for source in links(node) if source in prompt)
    return seen


def expected_order(
    prompt: Mapping[str, Any], outputs: Iterable[str], is_output: Callable[[str], bool]
) -> list[str]:
    """The order ComfyUI will run the nodes in, assuming nothing is cached.

    Nodes caught in a dependency cycle are appended at the end in graph order.
    """
    plan = ExecutionList(prompt, is_output, lambda _node_id: False)
    plan.add_outputs(o for o in outputs if o in prompt)
    order: list[str] = []
    while plan:
        try:
            node_id = plan.next_node()
        except CycleError:
            order.extend(plan.remaining())
            break
        order.append(node_id)
        plan.complete(node_id)
    return order


class CycleError(Exception):
    """The graph has a dependency cycle: no node is ready while some remain."""


class ExecutionList:
    def __init__(
        self,
        prompt: Mapping[str, Any],
        is_output: Callable[[str], bool],
        is_cached: Callable[[str], bool],
    ) -> None:
        self._prompt = prompt
        self._is_output = is_output
        self._is_cached = is_cached
        # Insertion order matters: it is the tie-breaker among ready nodes.
        self._pending: dict[str, int] = {}
        self._blocking: dict[str, set[str]] = {}

    def add_outputs(self, outputs: Iterable[str]) -> None:
        for output in outputs:
            self._add(output)

    def _links(self, node_id: str) -> list[str]:
        """The nodes ``node_id`` takes input from; a link to a node the graph lacks leads nowhere
        (ComfyUI refuses such a prompt itself)."""
        return [source for source in links(self._prompt[node_id]) if source in self._prompt]

    def _add(self, start: str) -> None:
        stack = [start]
        edges: list[tuple[str, str]] = []
        while stack:
            node_id = stack.pop()
            if node_id in self._pending:
                continue
            self._pending[node_id] = 0
            self._blocking.setdefault(node_id, set())
            for source in self._links(node_id):
                if not self._is_cached(source):
                    stack.append(source)
                    edges.append((source, node_id))
        for source, target in edges:
            if target not in self._blocking[source]:
                self._blocking[source].add(target)
                self._pending[target] += 1

    def __bool__(self) -> bool:
        return bool(self._pending)

    def next_node(self) -> str:
        """The node to run next.

        Raises:
            CycleError: nodes remain but none is ready.
        """
        ready = [node_id for node_id, blockers in self._pending.items() if blockers == 0]
        if not ready:
            raise CycleError("Dependency cycle detected")
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self._blocking[node_id]):
                return node_id
        for node_id in ready:
            for blocked in self._blocking[node_id]:
                if any(self._is_output(b) for b in self._blocking.get(blocked, ())):
                    return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        self._pending.pop(node_id, None)
        for blocked in self._blocking.get(node_id, ()):
            if blocked in self._pending:
                self._pending[blocked] -= 1

    def remaining(self) -> list[str]:
        return list(self._pending)
