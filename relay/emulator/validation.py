"""Prompt validation with the real server's error shapes (PROTOCOL.md §6, trace 06 and 07).

* An unknown or missing ``class_type`` rejects the whole prompt (``invalid_prompt``).
* No output node (or none among ``partial_execution_targets``): ``prompt_no_outputs``.
* Each output is validated with everything upstream of it. A prompt with at least one good
  output is accepted and runs only its good outputs; the others are reported in
  ``node_errors``. With no good output: ``prompt_outputs_failed_validation``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.emulator.errors import ServerCrash
from relay.emulator.nodes import Catalogue, NodeEnv

__all__ = ["Validation", "is_link", "validate_prompt"]

Reason = dict[str, Any]


@dataclass(slots=True)
class Validation:
    ok: bool
    error: dict[str, Any] | None = None
    outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)


def is_link(value: object) -> bool:
    """A link is ``[node_id, output_index]``: a two-item list with a string and an int."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _error(kind: str, message: str, details: str, extra: Mapping[str, Any] | None = None) -> Reason:
    return {"type": kind, "message": message, "details": details, "extra_info": dict(extra or {})}


def _types_match(received: str, expected: str) -> bool:
    if "*" in (received, expected) or received == expected:
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))


class _Validator:
    def __init__(self, prompt: dict[str, Any], catalogue: Catalogue, env: NodeEnv) -> None:
        self.prompt = prompt
        self.catalogue = catalogue
        self.env = env
        # node id -> (valid, reasons), filled as outputs are walked.
        self.validated: dict[str, tuple[bool, list[Reason]]] = {}
        self._in_progress: set[str] = set()

    def node(self, node_id: str) -> tuple[str, dict[str, Any]]:
        """class_type and inputs of a node; KeyError for a node that does not exist."""
        node = self.prompt[node_id]
        inputs = node.get("inputs", {})
        return node["class_type"], inputs if isinstance(inputs, dict) else {}

    def validate(self, node_id: str) -> tuple[bool, list[Reason]]:
        if node_id in self.validated:
            return self.validated[node_id]
        if node_id in self._in_progress:
            raise RecursionError(f"dependency cycle through node {node_id}")
        self._in_progress.add(node_id)
        try:
            result = self._validate(node_id)
        finally:
            self._in_progress.discard(node_id)
        self.validated[node_id] = result
        return result

    def _validate(self, node_id: str) -> tuple[bool, list[Reason]]:
        class_type, inputs = self.node(node_id)
        node_type = self.catalogue.get(class_type)
        assert node_type is not None  # unknown class types were rejected before
        errors: list[Reason] = []
        valid = True
        checked: dict[str, Any] = {}
        specs = [(name, spec, True) for name, spec in node_type.required.items()]
        specs += [(name, spec, False) for name, spec in node_type.optional.items()]
        for name, spec, required in specs:
            if name not in inputs:
                if required:
                    errors.append(
                        _error(
                            "required_input_missing", "Required input is missing", name, {"input_name": name}
                        )
                    )
                continue
            value = inputs[name]
            config = spec.published(self.env)
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append(
                        _error(
                            "bad_linked_input",
                            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            name,
                            {"input_name": name, "input_config": config, "received_value": value},
                        )
                    )
                    continue
                source_id = value[0]
                source_class, _ = self.node(source_id)  # KeyError for a dangling link, as the server
                source_type = self.catalogue.get(source_class)
                received = source_type.returns[value[1]] if source_type is not None else "*"
                if not spec.is_combo and not _types_match(received, spec.kind):
                    details = f"{name}, received_type({received}) mismatch input_type({spec.kind})"
                    errors.append(
                        _error(
                            "return_type_mismatch",
                            "Return type mismatch between linked nodes",
                            details,
                            {
                                "input_name": name,
                                "input_config": config,
                                "received_type": received,
                                "linked_node": value,
                            },
                        )
                    )
                    continue
                try:
                    upstream_ok, _ = self.validate(source_id)
                except Exception as exc:  # the server reports inner failures as a validation error
                    valid = False
                    self.validated[source_id] = (False, [_inner_exception(exc, name, config, value)])
                    continue
                if not upstream_ok:
                    valid = False
                continue
            if name in node_type.custom_validated:
                checked[name] = value
                continue
            converted, problem = self._convert(name, spec.kind, value, config)
            if problem is not None:
                errors.append(problem)
                continue
            checked[name] = converted
            problem = self._check_range(name, spec.options, converted, config)
            if problem is None and spec.is_combo:
                problem = self._check_choice(name, spec.choice_list(self.env), converted, config)
            if problem is not None:
                errors.append(problem)
        if node_type.custom_validated:
            for input_name, message in node_type().validate_inputs(self.env, checked).items():
                errors.append(
                    _error(
                        "custom_validation_failed",
                        "Custom validation failed for node",
                        f"{input_name} - {message}",
                        {"input_name": input_name},
                    )
                )
        if errors:
            return False, errors
        return valid, []

    @staticmethod
    def _convert(name: str, kind: str, value: Any, config: Any) -> tuple[Any, Reason | None]:
        if isinstance(value, dict) and "__value__" in value:
            value = value["__value__"]
        converters: dict[str, Callable[[Any], Any]] = {
            "INT": int,
            "FLOAT": float,
            "STRING": str,
            "BOOLEAN": bool,
        }
        convert = converters.get(kind)
        if convert is None:
            return value, None
        try:
            return convert(value), None
        except (TypeError, ValueError, OverflowError) as exc:
            extra = {
                "input_name": name,
                "input_config": config,
                "received_value": value,
                "exception_message": str(exc),
            }
            return value, _error(
                "invalid_input_type",
                f"Failed to convert an input value to a {kind} value",
                f"{name}, {value}, {exc}",
                extra,
            )

    @staticmethod
    def _check_range(name: str, options: Mapping[str, Any], value: Any, config: Any) -> Reason | None:
        extra = {"input_name": name, "input_config": config, "received_value": value}
        try:
            if "min" in options and value < options["min"]:
                return _error(
                    "value_smaller_than_min",
                    f"Value {value} smaller than min of {options['min']}",
                    name,
                    extra,
                )
            if "max" in options and value > options["max"]:
                return _error(
                    "value_bigger_than_max", f"Value {value} bigger than max of {options['max']}", name, extra
                )
        except TypeError:
            return None
        return None

    @staticmethod
    def _check_choice(name: str, choices: list[str], value: Any, config: Any) -> Reason | None:
        if value in choices:
            return None
        # Long lists (many model files) are summarized rather than echoed back.
        if len(choices) > 20:
            listing, config = f"(list of length {len(choices)})", None
        else:
            listing = str(choices)
        extra = {"input_name": name, "input_config": config, "received_value": value}
        return _error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listing}", extra)


def _exception_info(exc: BaseException) -> tuple[str, list[str]]:
    kind = type(exc)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return name, traceback.format_tb(exc.__traceback__)


def _inner_exception(exc: Exception, input_name: str, config: Any, link: Any) -> Reason:
    kind, tb = _exception_info(exc)
    extra = {
        "input_name": input_name,
        "input_config": config,
        "exception_message": str(exc),
        "exception_type": kind,
        "traceback": tb,
        "linked_node": link,
    }
    return _error(
        "exception_during_inner_validation", "Exception when validating inner node", str(exc), extra
    )


def validate_prompt(
    prompt: Any,
    catalogue: Catalogue,
    env: NodeEnv,
    *,
    targets: list[str] | None = None,
    order: Callable[[list[str]], list[str]] = list,
) -> Validation:
    """Validate an API-format graph.

    Args:
        prompt: the ``prompt`` field of POST /prompt (a dict of node id -> node).
        targets: ``partial_execution_targets``: only these output nodes are run.
        order: puts the output node ids in the order the server will run them.

    Raises:
        ServerCrash: for shapes the real server answers with a 500.
    """
    if not isinstance(prompt, dict):
        raise ServerCrash("prompt is not an object")
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            raise ServerCrash(f"node {node_id} is not an object")
        if "class_type" not in node:
            error = _error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
            return Validation(False, error)
        class_type = node["class_type"]
        node_type = catalogue.get(class_type) if isinstance(class_type, str) else None
        if node_type is None:
            error = _error(
                "invalid_prompt",
                f"Cannot execute because node {class_type} does not exist.",
                f"Node ID '#{node_id}'",
            )
            return Validation(False, error)
        if node_type.output_node and (targets is None or node_id in targets):
            outputs.append(node_id)
    if not outputs:
        return Validation(False, _error("prompt_no_outputs", "Prompt has no outputs", ""))

    validator = _Validator(prompt, catalogue, env)
    good: list[str] = []
    failed: list[tuple[str, list[Reason]]] = []
    for output in order(outputs):
        try:
            ok, reasons = validator.validate(output)
        except Exception as exc:  # the server turns any exception into a validation error
            kind, tb = _exception_info(exc)
            reasons = [
                _error(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(exc),
                    {"exception_type": kind, "traceback": tb},
                )
            ]
            ok = False
            validator.validated[output] = (False, reasons)
        if ok:
            good.append(output)
        else:
            failed.append((output, reasons))

    node_errors: dict[str, Any] = {}
    for output, _ in failed:
        for node_id in _upstream(prompt, output):
            valid, reasons = validator.validated.get(node_id, (True, []))
            if valid or not reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {"errors": reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]},
            )
            entry["dependent_outputs"].append(output)

    if good:
        return Validation(True, outputs=good, node_errors=node_errors)
    details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
    error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
    return Validation(False, error, node_errors=node_errors)


def _upstream(prompt: dict[str, Any], start: str) -> list[str]:
    """``start`` and every node it depends on that exists, each once."""
    seen: list[str] = []
    stack = [start]
    while stack:
        node_id = stack.pop()
        if node_id in seen or node_id not in prompt:
            continue
        seen.append(node_id)
        inputs = prompt[node_id].get("inputs", {})
        if isinstance(inputs, dict):
            stack.extend(v[0] for v in inputs.values() if isinstance(v, list) and v and isinstance(v[0], str))
    return seen
