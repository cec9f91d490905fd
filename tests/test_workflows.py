"""The workflows in workflows/: valid graphs, named steps in both languages, templates and their checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.emulator import RunningEmulator
from relay.server import RunningRelay
from relay.workflows import Library, WorkflowError, default_folder, load_workflow
from tests.relay_client import open_tab

FILES = sorted(default_folder().glob("*.json"))
WORKFLOWS = {path.stem: json.loads(path.read_text()) for path in FILES}
# Cheaper video for the suite; everything else runs with the file's defaults.
PARAMS: dict[str, dict[str, Any]] = {"animatediff": {"frames": 6}}
SAVES = {
    "portrait_mode": "50",
    "product_mode": "50",
    "hybrid_mode": "70",
    "text2img": "9",
    "animatediff": "10",
}


def test_the_five_pipelines_are_there_with_their_tables() -> None:
    assert set(WORKFLOWS) == set(SAVES)
    library = Library.load(default_folder())
    for name, data in WORKFLOWS.items():
        workflow = library.get(name)
        assert workflow is not None
        # Every node of the graph is a named step, in both languages.
        assert set(data["steps"]) == set(data["graph"]), name
        assert all(texts["ko"] and texts["en"] for texts in data["steps"].values())
    assert len(WORKFLOWS["hybrid_mode"]["graph"]) == 20
    assert len(WORKFLOWS["portrait_mode"]["graph"]) == 16
    assert WORKFLOWS["portrait_mode"]["steps"]["12"]["ko"] == "👤 얼굴 영역 감지 중..."


@pytest.mark.parametrize("name", sorted(SAVES))
async def test_each_workflow_runs_through_the_relay_with_named_steps(
    name: str, relay: RunningRelay, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    """Submitted by name: every step reported with its name (Korean by default, English on request),
    totals from the graph, the save step included, and a file that /view serves."""
    data = WORKFLOWS[name]
    korean = await open_tab(relay.ws_url, "clientId=wf")
    english = await open_tab(relay.ws_url, "clientId=wf&lang=en")
    response = await relay_http.post(
        f"/workflows/{name}/prompt", json={"client_id": "wf", "params": PARAMS.get(name, {})}
    )
    assert response.status_code == 200, response.text
    assert response.json()["workflow"] == name
    prompt_id = response.json()["prompt_id"]
    done = await korean.wait_done(prompt_id, timeout=60)
    await english.wait_done(prompt_id, timeout=60)
    assert done["status"] == "success"

    total = len(data["graph"])
    for tab, lang in ((korean, "ko"), (english, "en")):
        queued = tab.of("relay.queued", prompt_id)[0]
        assert (queued["workflow"], queued["total"]) == (name, total)
        assert {s["node"]: s["name"] for s in queued["steps"]} == {
            node: texts[lang] for node, texts in data["steps"].items()
        }
        running = tab.started(prompt_id)
        assert [e["index"] for e in running] == list(range(1, total + 1))
        assert all(e["name"] == data["steps"][e["node"]][lang] for e in running)
        assert running[-1]["node"] == SAVES[name]  # the save step is always reported
        assert running[-1]["name"] == data["steps"][SAVES[name]][lang]

    files = [f for output in korean.of("relay.output", prompt_id) for f in output["files"]]
    assert [f["filename"] for f in files] == [
        entry["filename"] for entries in done["outputs"][SAVES[name]].values() for entry in entries
    ]
    served = await relay_http.get(files[0]["url"])
    assert served.status_code == 200
    assert len(served.content) > 1000
    if name == "animatediff":
        assert files[0]["kind"] == "gifs"
        assert served.headers["content-type"] in ("video/mp4", "image/webp")
    await korean.close()
    await english.close()


async def test_a_graph_is_recognised_by_its_nodes_or_by_name(
    relay: RunningRelay, relay_http: httpx.AsyncClient
) -> None:
    tab = await open_tab(relay.ws_url, "clientId=shape&lang=en")
    graph = copy.deepcopy(WORKFLOWS["hybrid_mode"]["graph"])
    graph["60"]["inputs"]["seed"] = 7  # other values, same nodes
    plain = await relay_http.post("/prompt", json={"prompt": graph, "client_id": "shape"})
    assert plain.json()["workflow"] == "hybrid_mode"
    queued = await tab.wait_type("relay.queued")
    assert queued["steps"][-1]["name"] == "💾 Saving the result"

    # A graph with a node more is not the workflow, unless extra_data says it is.
    bigger = copy.deepcopy(WORKFLOWS["text2img"]["graph"])
    bigger["99"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    other = await relay_http.post("/prompt", json={"prompt": bigger, "client_id": "shape"})
    assert "workflow" not in other.json()
    named = await relay_http.post(
        "/prompt", json={"prompt": bigger, "client_id": "shape", "extra_data": {"workflow": "text2img"}}
    )
    assert named.json()["workflow"] == "text2img"
    unknown = await relay_http.post(
        "/prompt", json={"prompt": bigger, "client_id": "shape", "extra_data": {"workflow": "nope"}}
    )
    assert unknown.status_code == 400
    assert unknown.json()["error"]["type"] == "unknown_workflow"
    await tab.close()


async def test_parameters_fill_the_template(relay_http: httpx.AsyncClient, emulator: RunningEmulator) -> None:
    params = {"prompt": "a lighthouse", "seed": 1234, "steps": 8, "controlnet_type": "canny", "denoise": 0.5}
    response = await relay_http.post("/workflows/portrait_mode/prompt", json={"params": params})
    assert response.status_code == 200, response.text
    history = await relay_http.get(f"/history/{response.json()['prompt_id']}")
    for _ in range(100):
        if history.json():
            break
        history = await relay_http.get(f"/history/{response.json()['prompt_id']}")
    graph = next(iter(history.json().values()))["prompt"][2]
    assert graph["3"]["inputs"]["text"] == "a lighthouse"
    assert (graph["40"]["inputs"]["seed"], graph["40"]["inputs"]["steps"]) == (1234, 8)
    assert graph["40"]["inputs"]["denoise"] == 0.5
    assert graph["20"]["inputs"]["preprocessor"] == "CannyEdgePreprocessor"
    assert (
        graph["6"]["inputs"]["text"] == WORKFLOWS["portrait_mode"]["parameters"]["negative_prompt"]["default"]
    )


@pytest.mark.parametrize(
    ("params", "named", "says"),
    [
        ({"sed": 1}, "sed", "unknown parameter"),
        ({"seed": "1"}, "seed", "integer"),
        ({"seed": 1.5}, "seed", "integer"),
        ({"steps": 0}, "steps", "at least 1"),
        ({"steps": 101}, "steps", "at most 100"),
        ({"cfg": True}, "cfg", "number"),
        ({"controlnet_type": "pose"}, "controlnet_type", "one of depth, canny"),
        ({"prompt": 5}, "prompt", "string"),
        ({"image": "../secret.png"}, "image", "input folder"),
        ({"image": "/etc/passwd"}, "image", "input folder"),
    ],
)
async def test_bad_parameters_are_a_400_naming_them(
    params: dict[str, Any], named: str, says: str, relay_http: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    before = len(emulator.state.requests)
    response = await relay_http.post("/workflows/portrait_mode/prompt", json={"params": params})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "bad_parameter"
    assert repr(named) in error["message"]
    assert says in error["message"]
    assert not [r for r in list(emulator.state.requests)[before:] if r[1] == "/prompt"]


async def test_width_must_be_a_multiple_of_8_and_unknown_workflows_are_404(
    relay_http: httpx.AsyncClient,
) -> None:
    odd = await relay_http.post("/workflows/text2img/prompt", json={"params": {"width": 1001}})
    assert odd.status_code == 400
    assert "multiple of 8" in odd.json()["error"]["message"]
    missing = await relay_http.post("/workflows/nope/prompt", json={})
    assert missing.status_code == 404
    assert (await relay_http.get("/workflows/nope")).status_code == 404
    raw = await relay_http.post("/workflows/text2img/prompt", json={"params": [1]})
    assert raw.status_code == 400


async def test_the_workflow_list(relay_http: httpx.AsyncClient) -> None:
    listing = (await relay_http.get("/workflows")).json()
    assert listing["language"] == "ko"
    by_name = {w["name"]: w for w in listing["workflows"]}
    assert set(by_name) == set(SAVES)
    portrait = by_name["portrait_mode"]
    assert len(portrait["steps"]) == 16
    assert portrait["steps"][0] == {"node": "1", "name": {"ko": "📥 이미지 로드", "en": "📥 Loading image"}}
    assert portrait["parameters"]["controlnet_type"]["choices"] == ["depth", "canny"]
    assert portrait["parameters"]["steps"] | {"description": None} == {
        "type": "int", "required": False, "default": 20, "min": 1, "max": 100, "description": None,
    }  # fmt: skip
    one = (await relay_http.get("/workflows/text2img")).json()
    assert one["graph"] == WORKFLOWS["text2img"]["graph"]


async def test_an_unknown_language_is_refused(relay: RunningRelay) -> None:
    tab = await open_tab(relay.ws_url, "clientId=x&lang=fr")
    await tab.closed.wait()
    assert tab.close_code == 4400


def test_broken_workflow_files_are_refused_with_their_name(tmp_path: Path) -> None:
    good = json.loads(FILES[0].read_text())
    cases = {
        "no-graph.json": {**good, "graph": {}},
        "bad-target.json": {**good, "parameters": {"seed": {"type": "int", "targets": ["999.seed"]}}},
        "bad-step.json": {**good, "steps": {**good["steps"], "999": {"ko": "x", "en": "x"}}},
        "missing-input.json": {
            **good, "parameters": {"seed": {"type": "int", "targets": [f"{next(iter(good['graph']))}.x"]}},
        },
    }  # fmt: skip
    for filename, data in cases.items():
        path = tmp_path / filename
        path.write_text(json.dumps(data))
        with pytest.raises(WorkflowError, match=filename):
            load_workflow(path)
