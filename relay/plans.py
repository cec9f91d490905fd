"""From a submitted graph to the steps a prompt will run (a translator Plan).

Which nodes are outputs comes from ComfyUI's ``/object_info`` (``output_node``); the nodes a
prompt considers are those outputs and everything feeding them, or only the
``partial_execution_targets``; outputs that failed validation (``node_errors``) do not run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from typing import Any

from relay.graph import expected_order, upstream_of
from relay.i18n import Text
from relay.translator import Plan, StepSpec, humanize

__all__ = ["build_plan", "failed_outputs", "graph_key", "output_nodes", "step_name"]


def graph_key(graph: Mapping[str, Any]) -> str:
    """A key for a graph no workflow names: its node ids and class types."""
    shape = sorted(
        f"{node_id}:{node.get('class_type')}" for node_id, node in graph.items() if isinstance(node, dict)
    )
    return "graph:" + hashlib.sha256("\n".join(shape).encode()).hexdigest()[:16]


def step_name(node: Mapping[str, Any], names: Mapping[str, Text] | None = None, node_id: str = "") -> Text:
    """A step's display name: the workflow's name for it, else the graph's title, else its class."""
    if names and node_id in names:
        return names[node_id]
    meta = node.get("_meta")
    if isinstance(meta, dict) and isinstance(meta.get("title"), str) and meta["title"].strip():
        return str(meta["title"]).strip()
    class_type = node.get("class_type")
    return humanize(class_type) if isinstance(class_type, str) else "node"


def output_nodes(graph: Mapping[str, Any], output_classes: Collection[str], targets: Any = None) -> list[str]:
    """Output node ids of the graph, limited to ``partial_execution_targets`` when given."""
    outputs = [
        node_id
        for node_id, node in graph.items()
        if isinstance(node, dict) and node.get("class_type") in output_classes
    ]
    if isinstance(targets, list):
        wanted = {str(t) for t in targets}
        outputs = [node_id for node_id in outputs if node_id in wanted]
    return outputs


def failed_outputs(node_errors: Any) -> set[str]:
    """Outputs ComfyUI will not run because a node they depend on failed validation."""
    failed: set[str] = set()
    if isinstance(node_errors, dict):
        for entry in node_errors.values():
            if isinstance(entry, dict) and isinstance(entry.get("dependent_outputs"), list):
                failed.update(str(o) for o in entry["dependent_outputs"])
    return failed


def build_plan(
    graph: Mapping[str, Any],
    output_classes: Collection[str],
    *,
    targets: Any = None,
    skip_outputs: Collection[str] = (),
    names: Mapping[str, Text] | None = None,
    workflow: str | None = None,
) -> Plan:
    """The expected steps of a graph, in the order ComfyUI will run them."""
    outputs = [o for o in output_nodes(graph, output_classes, targets) if o not in skip_outputs]
    considered = upstream_of(graph, outputs)

    def is_output(node_id: str) -> bool:
        node = graph.get(node_id)
        return isinstance(node, dict) and node.get("class_type") in output_classes

    # ComfyUI picks among independent outputs in an order of its own; highest id first is a
    # guess that keeps the prediction stable.
    ordered_outputs = sorted(outputs, key=_id_key, reverse=True)
    order = [n for n in expected_order(graph, ordered_outputs, is_output) if n in considered]

    def spec(node_id: str) -> StepSpec:
        node = graph[node_id] if isinstance(graph.get(node_id), dict) else {}
        class_type = node.get("class_type")
        kind = class_type if isinstance(class_type, str) else "unknown"
        inputs = node.get("inputs")
        iterations = inputs.get("steps") if isinstance(inputs, dict) else None
        expected = iterations if isinstance(iterations, int) and not isinstance(iterations, bool) else None
        return StepSpec(node_id, kind, step_name(node, names, node_id), expected)

    steps = tuple(spec(node_id) for node_id in order)
    others = {node_id: spec(node_id) for node_id in graph if node_id not in considered}
    return Plan(steps, others, workflow, workflow or graph_key(graph))


def _id_key(node_id: str) -> tuple[int, int, str]:
    return (1, int(node_id), node_id) if node_id.isdigit() else (0, 0, node_id)
