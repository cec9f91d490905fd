"""The pipelines the relay knows by name: their graphs, step names and parameters.

Each file in the workflows folder (``workflows/`` of the project, or ``RELAY_WORKFLOWS_DIR``)
is one JSON object::

    {"name": "portrait_mode",
     "title": {"ko": ..., "en": ...}, "description": {"ko": ..., "en": ...},
     "parameters": {"seed": {"type": "int", "targets": ["40.seed"], "default": 42,
                             "min": 0, "max": ..., "description": {"ko": ..., "en": ...}}, ...},
     "steps": {"40": {"ko": "🚀 이미지 생성 중... (KSampler)", "en": "🚀 Generating..."}, ...},
     "graph": {API-format ComfyUI graph, runnable as it stands}}

Parameter types: ``string``, ``int``, ``float``, ``bool``, ``choice`` (``choices`` maps each
name a caller may give to the value put in the graph) and ``image`` (a file name in ComfyUI's
input folder, as ``/upload/image`` answers it). A parameter's ``targets`` are the
``node.input`` places it fills.

A submitted graph is recognised as a workflow when ``extra_data.workflow`` names it, or when it
has the same nodes (ids and class types) as the workflow's graph.

``"store": true`` asks for every prompt of the workflow to have its output files copied to
S3-compatible storage (relay.storage), as ``extra_data.store`` does for one prompt.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from relay.errors import BadRequest
from relay.filenames import upstream_safe_name, upstream_safe_subfolder
from relay.i18n import LANGUAGES

__all__ = ["LANGUAGES", "Library", "Parameter", "Workflow", "WorkflowError", "default_folder"]

_TYPES = ("string", "int", "float", "bool", "choice", "image")
_MAX_STRING = 10_000


class WorkflowError(ValueError):
    """A workflow file the relay cannot use (said at start-up, with the file's name)."""


def default_folder() -> Path:
    """The project's ``workflows/`` folder, beside the package."""
    return Path(__file__).resolve().parent.parent / "workflows"


def _texts(value: Any, where: str) -> dict[str, str]:
    if isinstance(value, str):
        return dict.fromkeys(LANGUAGES, value)
    if not isinstance(value, dict) or not all(isinstance(value.get(lang), str) for lang in LANGUAGES):
        raise WorkflowError(f"{where} must give a text for each of {', '.join(LANGUAGES)}")
    return {lang: value[lang] for lang in LANGUAGES}


@dataclass(frozen=True, slots=True)
class Parameter:
    name: str
    kind: str
    targets: tuple[tuple[str, str], ...]
    default: Any
    description: Mapping[str, str]
    minimum: float | None = None
    maximum: float | None = None
    multiple_of: int | None = None
    choices: Mapping[str, Any] | None = None

    @property
    def required(self) -> bool:
        return self.default is None

    def public(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": self.kind, "required": self.required}
        if self.default is not None:
            spec["default"] = self.default
        limits = {"min": self.minimum, "max": self.maximum, "multiple_of": self.multiple_of}
        spec.update({key: value for key, value in limits.items() if value is not None})
        if self.choices is not None:
            spec["choices"] = list(self.choices)
        spec["description"] = dict(self.description)
        return spec

    def convert(self, value: Any) -> Any:
        """The value to put in the graph for what a caller gave; BadRequest naming this parameter."""
        name = self.name
        if self.kind == "string":
            if not isinstance(value, str) or len(value) > _MAX_STRING:
                raise _bad(name, f"must be a string of at most {_MAX_STRING} characters")
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise _bad(name, "must be true or false")
            return value
        if self.kind == "choice":
            assert self.choices is not None
            if not isinstance(value, str) or value not in self.choices:
                raise _bad(name, f"must be one of {', '.join(self.choices)}")
            return self.choices[value]
        if self.kind == "image":
            if not isinstance(value, str) or not value or not _safe_input_name(value):
                raise _bad(name, "must name a file in ComfyUI's input folder (as /upload/image answered)")
            return value
        return self._number(value)

    def _number(self, value: Any) -> int | float:
        name = self.name
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(name, f"must be {'an integer' if self.kind == 'int' else 'a number'}")
        if self.kind == "int" and not float(value).is_integer():
            raise _bad(name, "must be an integer")
        if not math.isfinite(value):
            raise _bad(name, "must be a finite number")
        number: int | float = int(value) if self.kind == "int" else float(value)
        if self.minimum is not None and number < self.minimum:
            raise _bad(name, f"must be at least {self.minimum:g}")
        if self.maximum is not None and number > self.maximum:
            raise _bad(name, f"must be at most {self.maximum:g}")
        if self.multiple_of and int(number) % self.multiple_of:
            raise _bad(name, f"must be a multiple of {self.multiple_of}")
        return number


def _safe_input_name(value: str) -> bool:
    folder, _, name = value.rpartition("/")
    return upstream_safe_name(name) and upstream_safe_subfolder(folder) and bool(name)


def _bad(name: str, message: str) -> BadRequest:
    return BadRequest(f"parameter {name!r} {message}", "bad_parameter")


@dataclass(frozen=True, slots=True)
class Workflow:
    name: str
    title: Mapping[str, str]
    description: Mapping[str, str]
    graph: Mapping[str, Any]
    steps: Mapping[str, Mapping[str, str]]  # node id -> language -> name
    parameters: Mapping[str, Parameter]
    store: bool = False

    @property
    def shape(self) -> frozenset[tuple[str, str]]:
        return _shape(self.graph)

    def names(self, lang: str) -> dict[str, str]:
        """Step names in one language, by node id."""
        return {node: texts[lang] for node, texts in self.steps.items()}

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": dict(self.title),
            "description": dict(self.description),
            "steps": [{"node": node, "name": dict(texts)} for node, texts in self.steps.items()],
            "parameters": {name: p.public() for name, p in self.parameters.items()},
            "store": self.store,
        }

    def fill(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The graph with the given parameters set (defaults for the others).

        Raises:
            BadRequest: an unknown parameter, a missing required one, or a bad value.
        """
        unknown = sorted(set(values) - set(self.parameters))
        if unknown:
            known = ", ".join(self.parameters)
            message = f"unknown parameter {unknown[0]!r} (this workflow takes: {known})"
            raise BadRequest(message, "bad_parameter")
        graph = copy.deepcopy(dict(self.graph))
        for name, parameter in self.parameters.items():
            if name in values:
                value = parameter.convert(values[name])
            elif parameter.required:
                raise _bad(name, "is required")
            else:
                value = parameter.convert(parameter.default)
            for node, input_name in parameter.targets:
                graph[node]["inputs"][input_name] = value
        return graph


def _shape(graph: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    return frozenset(
        (str(node_id), str(node.get("class_type")))
        for node_id, node in graph.items()
        if isinstance(node, dict)
    )


def _parameter(name: str, spec: Any, graph: Mapping[str, Any], where: str) -> Parameter:
    if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
        raise WorkflowError(f"{where}: parameter {name!r} needs a type, one of {', '.join(_TYPES)}")
    targets: list[tuple[str, str]] = []
    for target in spec.get("targets") or ():
        node, _, input_name = str(target).partition(".")
        if not isinstance(graph.get(node), dict) or input_name not in graph[node].get("inputs", {}):
            raise WorkflowError(f"{where}: parameter {name!r} targets {target!r}, which the graph lacks")
        targets.append((node, input_name))
    if not targets:
        raise WorkflowError(f"{where}: parameter {name!r} has no targets")
    choices = spec.get("choices")
    if spec["type"] == "choice" and (not isinstance(choices, dict) or not choices):
        raise WorkflowError(f"{where}: choice parameter {name!r} needs a 'choices' object")
    parameter = Parameter(
        name=name,
        kind=spec["type"],
        targets=tuple(targets),
        default=spec.get("default"),
        description=_texts(spec.get("description", ""), f"{where}: {name}.description"),
        minimum=spec.get("min"),
        maximum=spec.get("max"),
        multiple_of=spec.get("multiple_of"),
        choices=choices if spec["type"] == "choice" else None,
    )
    if parameter.default is not None:
        try:
            parameter.convert(parameter.default)
        except BadRequest as exc:
            raise WorkflowError(f"{where}: default of {exc.message}") from None
    return parameter


def load_workflow(path: Path) -> Workflow:
    where = path.name
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise WorkflowError(f"{where}: {exc}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{where}: must hold a JSON object")
    name, graph, steps = data.get("name"), data.get("graph"), data.get("steps")
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise WorkflowError(f"{where}: 'name' must be letters, digits and '_'")
    if not isinstance(graph, dict) or not graph or not all(isinstance(n, dict) for n in graph.values()):
        raise WorkflowError(f"{where}: 'graph' must be an API-format graph")
    if not isinstance(steps, dict) or set(steps) - set(graph):
        raise WorkflowError(f"{where}: 'steps' must name nodes of the graph")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise WorkflowError(f"{where}: 'parameters' must be an object")
    store = data.get("store", False)
    if not isinstance(store, bool):
        raise WorkflowError(f"{where}: 'store' must be true or false")
    return Workflow(
        name=name,
        title=_texts(data.get("title", name), f"{where}: title"),
        description=_texts(data.get("description", ""), f"{where}: description"),
        graph=graph,
        steps={str(node): _texts(texts, f"{where}: steps.{node}") for node, texts in steps.items()},
        parameters={pname: _parameter(pname, spec, graph, where) for pname, spec in parameters.items()},
        store=store,
    )


class Library:
    """The workflows loaded at start-up, by name and by graph shape."""

    def __init__(self, workflows: list[Workflow]) -> None:
        self._by_name = {w.name: w for w in workflows}
        self._by_shape = {w.shape: w for w in workflows}

    @classmethod
    def load(cls, folder: Path) -> Library:
        if not folder.is_dir():
            return cls([])
        workflows = [load_workflow(path) for path in sorted(folder.glob("*.json"))]
        names = [w.name for w in workflows]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise WorkflowError(f"two workflow files are named {sorted(duplicates)[0]!r}")
        return cls(workflows)

    def __iter__(self) -> Iterator[Workflow]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Workflow | None:
        return self._by_name.get(name)

    def recognise(self, graph: Mapping[str, Any], extra_data: Any = None) -> Workflow | None:
        """The workflow a submitted graph is: named in ``extra_data.workflow``, else by its nodes.

        Raises:
            BadRequest: ``extra_data.workflow`` names no known workflow.
        """
        named = extra_data.get("workflow") if isinstance(extra_data, dict) else None
        if named is not None:
            workflow = self._by_name.get(named) if isinstance(named, str) else None
            if workflow is None:
                raise BadRequest(f"unknown workflow {named!r} in extra_data.workflow", "unknown_workflow")
            return workflow
        return self._by_shape.get(_shape(graph))
