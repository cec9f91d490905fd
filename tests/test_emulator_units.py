"""The emulator's pure parts: execution order, validation rules and cache keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.emulator.cache import ResultCache
from relay.emulator.errors import ServerCrash
from relay.emulator.files import Folders
from relay.emulator.nodes import NodeEnv, default_catalogue
from relay.emulator.validation import validate_prompt
from relay.graph import CycleError, ExecutionList
from tests.tracekit import load_trace

CATALOGUE = default_catalogue()


@pytest.fixture
def env(tmp_path: Path) -> NodeEnv:
    folders = Folders(tmp_path / "output", tmp_path / "input", tmp_path / "temp")
    folders.create()
    return NodeEnv(folders, {"checkpoints": tuple(f"model{i}.safetensors" for i in range(25))})


def run_order(prompt: dict[str, Any], outputs: list[str], cached: set[str] = frozenset()) -> list[str]:
    def is_output(node_id: str) -> bool:
        node_type = CATALOGUE.get(prompt[node_id]["class_type"])
        return node_type is not None and node_type.output_node

    plan = ExecutionList(prompt, is_output, lambda node_id: node_id in cached)
    plan.add_outputs(outputs)
    order = []
    while plan:
        node_id = plan.next_node()
        order.append(node_id)
        plan.complete(node_id)
    return order


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def test_ready_output_nodes_run_first() -> None:
    """Graph 01: the PreviewImage fed by node 1 runs before the invert/save branch."""
    assert run_order(load_trace("01").workflow(), ["4", "3"]) == ["1", "4", "2", "3"]


def test_nodes_feeding_an_output_are_preferred() -> None:
    """Among ready non-output nodes, one that feeds an output goes before one two steps away."""
    prompt = {
        "1": node("EmptyImage", width=8, height=8, batch_size=1, color=0),
        "2": node("ImageInvert", image=["1", 0]),
        "3": node("ImageInvert", image=["2", 0]),
        "4": node("SaveImage", images=["3", 0], filename_prefix="far"),
        "5": node("ImageInvert", image=["1", 0]),
        "6": node("SaveImage", images=["5", 0], filename_prefix="near"),
    }
    assert run_order(prompt, ["4", "6"]) == ["1", "5", "6", "2", "3", "4"]


def test_cached_inputs_are_not_visited() -> None:
    """Graph 05's second run: cached 1, 4, 5 — only the output 5 is visited among them (trace 05)."""
    order = run_order(load_trace("05").workflow(), ["5", "3"], cached={"1", "4", "5"})
    assert order == ["5", "2", "3"]


def test_cycle_is_detected() -> None:
    """A dependency cycle stops with CycleError instead of spinning."""
    prompt = {
        "1": node("ImageInvert", image=["2", 0]),
        "2": node("ImageInvert", image=["1", 0]),
        "3": node("SaveImage", images=["2", 0], filename_prefix="x"),
    }
    with pytest.raises(CycleError):
        run_order(prompt, ["3"])


def test_validation_reports_cycles_as_validation_errors(env: NodeEnv) -> None:
    """A cyclic graph is rejected with a 400-style error, not a crash."""
    prompt = {
        "1": node("ImageInvert", image=["2", 0]),
        "2": node("ImageInvert", image=["1", 0]),
        "3": node("SaveImage", images=["2", 0], filename_prefix="x"),
    }
    result = validate_prompt(prompt, CATALOGUE, env)
    assert not result.ok
    assert result.error is not None
    assert result.error["type"] == "prompt_outputs_failed_validation"


def test_validation_type_mismatch_range_and_choices(env: NodeEnv) -> None:
    """Linked types must match, numbers stay in range, long choice lists are summarised."""
    prompt = {
        "1": node("EmptyImage", width=20000, height=8, batch_size=1, color=0),
        "2": node("VAEDecode", samples=["1", 0], vae=["3", 2]),
        "3": node("CheckpointLoaderSimple", ckpt_name="missing.safetensors"),
        "4": node("SaveImage", images=["2", 0], filename_prefix="x"),
        "5": node("SaveImage", images=["1", 0], filename_prefix="y"),
    }
    result = validate_prompt(prompt, CATALOGUE, env)
    assert not result.ok
    errors = {node_id: [e["type"] for e in entry["errors"]] for node_id, entry in result.node_errors.items()}
    assert errors == {
        "1": ["value_bigger_than_max"],
        "2": ["return_type_mismatch"],
        "3": ["value_not_in_list"],
    }
    choice_error = result.node_errors["3"]["errors"][0]
    assert choice_error["details"] == "ckpt_name: 'missing.safetensors' not in (list of length 25)"
    assert choice_error["extra_info"]["input_config"] is None
    assert sorted(result.node_errors["1"]["dependent_outputs"]) == ["4", "5"]
    assert result.node_errors["3"]["dependent_outputs"] == ["4"]


def test_partial_execution_targets_limit_outputs(env: NodeEnv) -> None:
    """Only the targeted output nodes run; a target that is not an output node is ignored."""
    prompt = load_trace("01").workflow()
    result = validate_prompt(prompt, CATALOGUE, env, targets=["3", "2"])
    assert (result.ok, result.outputs) == (True, ["3"])
    none_left = validate_prompt(prompt, CATALOGUE, env, targets=["2"])
    assert none_left.error is not None
    assert none_left.error["type"] == "prompt_no_outputs"


def test_shapes_the_server_crashes_on(env: NodeEnv) -> None:
    """A non-object prompt or node is what the real server answers with a 500."""
    with pytest.raises(ServerCrash):
        validate_prompt("not a dict", CATALOGUE, env)
    with pytest.raises(ServerCrash):
        validate_prompt({"1": 5}, CATALOGUE, env)


def test_cache_keys_ignore_node_ids_and_keep_only_the_last_prompt(env: NodeEnv) -> None:
    """Equal sub-graphs hit whatever their ids; an unrelated prompt empties the cache."""
    cache = ResultCache()
    first = {"1": node("EmptyImage", width=8, height=8, batch_size=1, color=5)}
    cache.set_prompt(first, CATALOGUE, env)
    cache.store("1", ("image",), None)
    renamed = {"9": node("EmptyImage", width=8, height=8, batch_size=1, color=5)}
    cache.set_prompt(renamed, CATALOGUE, env)
    assert cache.is_cached("9")
    unrelated = {"1": node("EmptyImage", width=8, height=8, batch_size=1, color=6)}
    cache.set_prompt(unrelated, CATALOGUE, env)
    cache.set_prompt(first, CATALOGUE, env)
    assert not cache.is_cached("1")


def test_load_image_key_follows_file_content(env: NodeEnv) -> None:
    """LoadImage is re-run when the file behind the same name changes (its fingerprint is a hash)."""
    picture = env.folders.input / "a.png"
    picture.write_bytes(b"one")
    prompt = {"1": node("LoadImage", image="a.png")}
    cache = ResultCache()
    cache.set_prompt(prompt, CATALOGUE, env)
    cache.store("1", ("image", "mask"), None)
    cache.set_prompt(prompt, CATALOGUE, env)
    assert cache.is_cached("1")
    picture.write_bytes(b"two")
    cache.set_prompt(prompt, CATALOGUE, env)
    assert not cache.is_cached("1")
