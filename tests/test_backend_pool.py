"""The backend pool on its own: picking, routes, files, name lookups, health, merged answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay.backends import Backend, Backends, affinity_of, input_names
from relay.config import ConfigError, RelayConfig
from relay.emulator import RunningEmulator
from relay.merged import merge_history, merge_jobs, merge_queue
from tests.redis_server import RedisServer

A, B, C = "http://10.0.0.1:8188", "http://10.0.0.2:8188", "http://10.0.0.3:8188"


def pool(*urls: str, **settings: Any) -> Backends:
    return Backends(RelayConfig(comfyui_urls=",".join(urls), eta_file="", **settings))


def names(backends: list[Backend]) -> list[str]:
    return [backend.name for backend in backends]


def test_the_setting_lists_backends_and_refuses_what_is_not_one() -> None:
    config = RelayConfig(comfyui_urls=f" {A}/ , dns+http://comfyui-pods.default.svc:8188 ")
    assert config.backend_entries == (A, "dns+http://comfyui-pods.default.svc:8188")
    assert config.pooled
    assert RelayConfig(comfyui_url=A).backend_entries == (A,)
    assert not RelayConfig(comfyui_url=A).pooled
    for bad in ("ftp://x:1", f"{A}/api", "http://a:1;b", ","):
        with pytest.raises(ConfigError, match="RELAY_COMFYUI_URLS"):
            RelayConfig(comfyui_urls=bad)
    with pytest.raises(ConfigError, match="RELAY_ROUTING"):
        RelayConfig(comfyui_urls=f"{A},{B}", routing="random")


def test_least_loaded_first_and_a_workflow_keeps_to_its_backend() -> None:
    """Each new prompt goes where fewest wait; a backend whose last prompt was the same
    workflow has a one-prompt head start; ties go to the busier-less, then the first."""
    backends = pool(A, B, C)
    a, b, c = list(backends)
    backends.assign(a, "p1", "workflow:portrait")
    assert backends.pick("workflow:portrait") is b  # a: 1 waiting + 0, b: 0 + a switch: tie, b less loaded
    backends.assign(b, "p2", "workflow:landscape")
    backends.assign(c, "p3", "workflow:portrait")
    # Everyone has one; the portrait prompt goes to a portrait backend, the landscape one to b.
    assert backends.pick("workflow:portrait") is a
    assert backends.pick("workflow:landscape") is b
    # Queues say more than this relay's own prompts (other relays, other front ends).
    backends.note_queue(a.name, 5)
    backends.note_queue(c.name, 4)
    assert backends.pick("workflow:portrait") is b  # 1 + switch beats 4 + 0
    backends.finished("p2")
    assert b.in_flight == set()
    assert backends.route_of("p2") is b  # the route outlives the run: history and files follow it


def test_never_a_backend_that_is_down_or_draining() -> None:
    backends = pool(A, B, C)
    a, b, c = list(backends)
    backends.failed(a, "connection refused")
    b.state = "draining"
    assert [backends.pick() for _ in range(3)] == [c, c, c]
    backends.failed(c, "timed out")
    with pytest.raises(Exception, match="no ComfyUI backend is up"):
        backends.pick()


def test_round_robin_rotates_whatever_the_load() -> None:
    backends = pool(A, B, C, routing="round-robin")
    a, _, _ = list(backends)
    backends.note_queue(a.name, 50)
    assert names([backends.pick("workflow:x") for _ in range(6)]) == names(list(backends)) * 2


def test_a_prompt_naming_an_upload_prefers_the_backends_that_have_it() -> None:
    backends = pool(A, B, C)
    a, b, c = list(backends)
    backends.uploaded({"name": "face.png", "subfolder": "people", "type": "input"}, c.name)
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "people/face.png [input]"}}}
    assert "people/face.png" in input_names(graph)
    backends.assign(c, "busy", None)
    assert backends.pick(affinity_of(graph, None), input_names(graph)) is c
    assert backends.file_source("face.png", "people", "input") is c
    # Nobody up has it: any backend rather than none.
    backends.failed(c, "refused")
    assert backends.pick(None, input_names(graph)) in (a, b)


def test_a_graph_is_recognised_by_its_workflow_or_nodes_and_its_models() -> None:
    one = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl.safetensors"}}}
    other = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux.safetensors"}}}
    seeded = {"9": {**one["4"], "inputs": {**one["4"]["inputs"], "seed": 7}}}
    assert affinity_of(one, None) == affinity_of(seeded, None)  # a seed loads no other model
    assert affinity_of(one, None) != affinity_of(other, None)
    # A known workflow is itself, with the models it loads this time.
    assert affinity_of(one, "portrait").startswith("workflow:portrait:")
    assert affinity_of(one, "portrait") == affinity_of(seeded, "portrait")
    assert affinity_of(one, "portrait") != affinity_of(other, "portrait")


def test_a_prompts_files_are_found_where_it_ran() -> None:
    backends = pool(A, B)
    _, b = list(backends)
    backends.assign(b, "p1", None)
    outputs = {"9": {"images": [{"filename": "x_00001_.png", "subfolder": "", "type": "output"}]}}
    backends.finished("p1", outputs)
    assert backends.file_source("x_00001_.png", "", "output") is b
    assert backends.source_of("p1") is b
    assert backends.file_source("other.png", "", "output") is None


async def test_a_name_is_looked_up_again_new_addresses_join_and_gone_ones_drain(
    emulator: RunningEmulator,
) -> None:
    """dns+ entries: each address is a backend; one that appears joins (down while it refuses),
    one that leaves the answer drains (no new prompts) and is forgotten once its prompts end."""
    port = int(emulator.url.rsplit(":", 1)[1])
    answers = [["127.0.0.1"]]

    async def lookup(host: str, wanted: int) -> list[str]:
        assert (host, wanted) == ("comfyui-pods.test", port)
        return answers[-1]

    backends = Backends(
        RelayConfig(comfyui_urls=f"dns+http://comfyui-pods.test:{port}", eta_file=""), lookup=lookup
    )
    await backends.resolve()
    await backends.check()
    assert [(b.name, b.state) for b in backends] == [(f"127.0.0.1:{port}", "up")]
    answers.append(["127.0.0.1", "127.0.0.2"])  # a second pod; nothing listens there
    await backends.resolve()
    await backends.check()
    assert [(b.name, b.state) for b in backends] == [
        (f"127.0.0.1:{port}", "up"),
        (f"127.0.0.2:{port}", "down"),
    ]
    first = backends.get(f"127.0.0.1:{port}")
    assert first is not None
    backends.assign(first, "running", None)
    answers.append(["127.0.0.2"])  # the first pod is going away
    await backends.resolve()
    await backends.check()
    assert first.state == "draining"
    with pytest.raises(Exception, match="no ComfyUI backend is up"):
        backends.pick()
    backends.finished("running")
    assert names(list(backends)) == [f"127.0.0.2:{port}"]
    await backends.aclose()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A server that accepts connections and never answers (a hung pod, a black-holed route)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_backend_that_stops_answering_gives_its_prompts_up_after_a_while(
    emulator: RunningEmulator,
) -> None:
    """Not refusing but not answering: down at the first check; its prompts are reported lost
    only once it has stayed away backend_lost_after seconds (here after the second check)."""
    async with silent_server() as hung:
        config = RelayConfig(
            comfyui_urls=f"{emulator.url},{hung}", eta_file="", ready_timeout=0.3, backend_lost_after=0.4
        )
        backends = Backends(config)
        told: list[tuple[str, str]] = []
        backends.on_lost(lambda backend, reason: told.append((backend.name, reason)))
        live, quiet = list(backends)
        backends.assign(quiet, "stuck", None)
        await backends.check()
        assert (live.state, quiet.state) == ("up", "down")
        assert "no answer" in str(quiet.problem)
        assert told == []  # not yet: it may come back
        await backends.check()  # this check alone waits longer than backend_lost_after
        assert [name for name, _ in told] == [quiet.name]
        assert "has not answered" in told[0][1]
        await backends.check()
        assert len(told) == 1  # once per outage
        await backends.aclose()


def test_merged_queue_labels_each_prompt_and_keeps_each_backends_run_order() -> None:
    item = lambda number, pid: [number, pid, {}, {"client_id": "c"}, []]  # noqa: E731
    merged = merge_queue([
        ("a:1", "up", {"queue_running": [item(4, "r1")], "queue_pending": [item(9, "p3"), item(6, "p2")]}),
        ("b:1", "down", None),
        ("c:1", "up", {"queue_running": [], "queue_pending": [item(1, "q1")]}),
    ])  # fmt: skip
    assert [i[1] for i in merged["queue_running"]] == ["r1"]
    assert [(i[1], i[3]["backend"]) for i in merged["queue_pending"]] == [
        ("p2", "a:1"),
        ("p3", "a:1"),
        ("q1", "c:1"),
    ]
    assert merged["backends"]["b:1"] == {
        "state": "down",
        "answered": False,
        "queue_running": [],
        "queue_pending": [],
    }
    assert merged["backends"]["a:1"]["queue_pending"] == ["p2", "p3"]


def test_merged_history_is_in_run_order_and_keeps_the_newest() -> None:
    def entry(started: int) -> dict[str, Any]:
        messages = [["execution_start", {"prompt_id": "x", "timestamp": started}]]
        return {"prompt": [0, "x", {}, {}, []], "outputs": {}, "status": {"messages": messages}}

    merged = merge_history([("a:1", {"old": entry(100), "new": entry(300)}), ("b:1", {"mid": entry(200)})])
    assert list(merged) == ["old", "mid", "new"]
    assert merged["mid"]["prompt"][3]["backend"] == "b:1"
    assert list(
        merge_history([("a:1", {"old": entry(1), "new": entry(3)}), ("b:1", {"mid": entry(2)})], 2)
    ) == [
        "mid",
        "new",
    ]


def test_merged_jobs_make_one_page_of_all() -> None:
    def jobs(*times: int) -> dict[str, Any]:
        listed = [{"id": f"j{t}", "create_time": t} for t in times]
        return {
            "jobs": listed,
            "pagination": {"offset": 0, "limit": None, "total": len(listed), "has_more": False},
        }

    page = merge_jobs([("a:1", jobs(5, 3, 1)), ("b:1", jobs(4, 2))], sort_by="created_at", descending=True,
                      offset=1, limit=2)  # fmt: skip
    assert [(j["id"], j["backend"]) for j in page["jobs"]] == [("j4", "b:1"), ("j3", "a:1")]
    assert page["pagination"] == {"offset": 1, "limit": 2, "total": 5, "has_more": True}


async def test_listed_backends_stay_beside_a_name() -> None:
    """A URL given as it is stays a backend whatever the name's lookups say."""
    answers = [["10.1.0.7"], []]

    async def lookup(host: str, port: int) -> list[str]:
        return answers.pop(0)

    backends = Backends(
        RelayConfig(comfyui_urls=f"{A},dns+http://pods.test:8188", eta_file=""), lookup=lookup
    )
    await backends.resolve()
    assert [(b.name, b.state) for b in backends] == [("10.0.0.1:8188", "up"), ("10.1.0.7:8188", "up")]
    await backends.resolve()  # the name lists nobody now
    assert [(b.name, b.state) for b in backends] == [("10.0.0.1:8188", "up")]
    await backends.aclose()


async def test_replicas_share_each_prompts_route_through_redis(redis_server: RedisServer) -> None:
    """A prompt routed by one relay is found by another (its files, history, cancel), through
    Redis; without a route anywhere, nothing is made up."""
    one_client, other_client = redis_server.client(), redis_server.client()
    one = pool(A, B, C, redis_url=redis_server.url)
    one.redis = one_client
    other = Backends(one.config, redis=other_client)
    try:
        _, b, _ = list(one)
        one.assign(b, "p-routed-here", None)
        await one.aclose()  # the write in flight is awaited before closing
        found = await other.locate("p-routed-here")
        assert found is not None
        assert found.name == b.name
        assert other.route_of("p-routed-here") is found  # remembered from then on
        assert await other.locate("p-nobody-routed") is None
    finally:
        await other.aclose()
        await one_client.aclose()
        await other_client.aclose()
