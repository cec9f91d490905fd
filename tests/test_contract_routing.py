"""Contract: who receives which message (PROTOCOL.md §2; scenarios 08, 09, 17).

The routing rules are what a relay most often gets wrong, so these tests replay the recorded
scenarios with several sockets and compare what each one received.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from relay.emulator import EmulatorConfig, run_emulator
from relay.emulator.config import ComfyVersion
from tests.driver import Session, of_type, open_session
from tests.tracekit import fold_progress, load_trace, shape, split_status, token


@pytest.fixture
def comfyui_version() -> ComfyVersion:
    """Held to the recordings of a real 0.3.64 server."""
    return "0.3.64"


CLIENT = "relayprobe-fixed-client-0001"


async def test_08_duplicate_client_id_orphans_sockets(slow_session: Session) -> None:
    """Trace 08: B replaces A; closing A orphans B; a new socket C is re-registered and replayed."""
    trace = load_trace("08")
    session = slow_session
    dup = "relayprobe-dup-0008"
    a = await session.connect("A", dup)
    b = await session.connect("B", dup)

    # 8a: everything goes to B, nothing to A.
    first = await session.submit(trace.workflow(), dup)
    await b.wait_done(first)
    assert a.tokens() == trace.tokens("A") == ["status[0]+sid"]

    # 8b: A closes, which unregisters B: B hears nothing more, not even status broadcasts.
    await a.close()
    heard = len(b.frames)
    second = await session.submit(trace.workflow("second"), dup)
    await session.wait_history(second)
    await asyncio.sleep(0.1)
    assert len(b.frames) == heard
    assert b.tokens() == trace.tokens("B")

    # 8c: C connects mid-run: "executing" replay without prompt_id, then the live run.
    third = await session.submit(trace.workflow("third"), dup)
    await session.wait_running()
    await asyncio.sleep(0.5)  # a few of the fifteen steps (100 ms each at x2)
    c = await session.connect("C", dup)
    await c.wait_done(third)
    assert c.frames[1].data == {"node": "2"}
    ours, our_status = split_status(c.tokens())
    theirs, their_status = split_status(trace.tokens("C"))
    assert fold_progress(ours) == fold_progress(theirs)
    assert our_status == their_status
    assert len(b.frames) == heard


async def test_08_duplicate_quirk_can_be_turned_off() -> None:
    """Without the quirk, closing the replaced socket leaves the replacement registered."""
    config = EmulatorConfig(port=0, speed=20, duplicate_client_quirk=False, comfyui_version="0.3.64")
    async with run_emulator(config) as emulator, open_session(emulator.url) as session:
        trace = load_trace("08")
        a = await session.connect("A", "dup")
        b = await session.connect("B", "dup")
        await a.close()
        prompt_id = await session.submit(trace.workflow(), "dup")
        await b.wait_done(prompt_id)
        assert "execution_success" in b.tokens()


async def test_09_prompts_without_a_connected_client(slow_session: Session) -> None:
    """Trace 09: no client_id leaks progress to everyone, a foreign id reaches no one, own sid works."""
    trace = load_trace("09")
    session = slow_session
    # Trace 09 ran after 08 in the same server, whose EmptyImage it found in the cache.
    await session.wait_history(await session.submit(load_trace("08").workflow()))
    s = await session.connect("S")  # no clientId: the server assigns one
    t = await session.connect("T", CLIENT)
    sid = s.frames[0].data["sid"]
    assert re.fullmatch(r"[0-9a-f]{32}", sid)

    # 9a: no client_id. 9b: a client id nobody uses. 9c: S's own sid. 9d: no client_id, interrupted.
    runs = ((trace.workflow(), None), (trace.workflow("other-client"), "x"), (trace.workflow("own-sid"), sid))
    for finished, (graph, client_id) in enumerate(runs, start=1):
        prompt_id = await session.submit(graph, client_id)
        await session.wait_history(prompt_id)
        # Every socket hears the idle status that ends each run.
        await t.wait_for(lambda f: token(f) == "status[0]", count=finished)
    last = await session.submit(trace.workflow("interrupt-no-client"))
    await s.wait_for(of_type("progress", last), count=2)
    await session.http.post("/interrupt", json={"prompt_id": last})
    await session.wait_history(last)
    await t.wait_for(of_type("execution_interrupted", last))
    await s.wait_for(of_type("execution_interrupted", last))

    for ours, label in ((s, "S"), (t, "T")):
        mine, mine_status = split_status(ours.tokens())
        recorded, recorded_status = split_status(trace.tokens(label))
        assert fold_progress(mine) == fold_progress(recorded), label
        assert mine_status == recorded_status, label
    # Nothing addressed to a client ever reached T, which never submitted anything.
    assert not [
        f for f in t.frames if f.type in ("executing", "executed", "execution_start", "execution_success")
    ]


async def test_17_error_without_client_id_reaches_nobody(session: Session) -> None:
    """Trace 17: a failing client-less prompt broadcasts its progress but its error only reaches history."""
    trace = load_trace("17")
    s = await session.connect("S")
    t = await session.connect("T", CLIENT)
    prompt_id = await session.submit(trace.workflow())
    history = await session.wait_history(prompt_id)
    await t.wait_for(lambda f: token(f) == "status[0]")
    await s.wait_for(lambda f: token(f) == "status[0]")
    assert s.tokens() == trace.tokens("S")
    assert t.tokens() == trace.tokens("T")
    status = history["status"]
    assert isinstance(status, dict)
    assert [m[0] for m in status["messages"]] == ["execution_start", "execution_cached", "execution_error"]
    recorded = next(iter(trace.http("GET")[0]["body_json"].values()))
    assert shape(history) == shape(recorded)
