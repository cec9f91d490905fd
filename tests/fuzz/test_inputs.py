"""Hostile and random input on every surface a browser or a script can reach.

Invariants for every example: no 5xx from the relay itself, no traceback in any answer, a JSON
error (with a type) for every refusal, nothing that escapes ComfyUI's folders reaches it, every
socket refusal closes with a documented code, and the relay still answers afterwards.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any
from urllib.parse import parse_qs, quote

import httpx
import pytest
import websockets
from hypothesis import given
from hypothesis import strategies as st
from websockets.sync.client import connect

from tests.fuzz.conftest import Servers

# Close codes docs/events.md lists for refused or ended sockets.
DOCUMENTED_CLOSES = {1000, 1001, 1007, 1008, 1009, 1012, 1013, 4400, 4401, 4403, 4429}

# Pieces of path escapes, in the encodings that have fooled servers before.
ESCAPES = ["..", "../", "..\\", "%2e%2e", "%2e%2e%2f", "..%2f", "%2e.", ".%2e", "%252e%252e", "%c0%ae%c0%ae",
           "%c0%af", "%00", "\x00", "/", "//", "\\", "etc/passwd", "C:\\", "~", "%ff", "\u202e", "\ufeff",
           "a", "x.png", "output", "..;", "%u002e"]  # fmt: skip
pieces = st.one_of(st.sampled_from(ESCAPES), st.text(max_size=8))
paths = st.lists(pieces, max_size=6).map("".join)


def check_answer(response: httpx.Response) -> None:
    """Never a traceback; a refusal in JSON names its error type."""
    assert "Traceback" not in response.text
    if 400 <= response.status_code < 500 and "json" in response.headers.get("content-type", ""):
        body = response.json()
        if isinstance(body, dict) and "error" in body:
            assert isinstance(body["error"].get("type"), str)


def inside(name: str) -> bool:
    """Whether a file name or subfolder, as ComfyUI receives it, resolves inside its folder
    (checked here on its own terms, not with the relay's rule)."""
    resolved = posixpath.normpath(posixpath.join("/folder", name.replace("\\", "/")))
    return "\x00" not in name and (resolved == "/folder" or resolved.startswith("/folder/"))


kinds = st.sampled_from(["output", "input", "temp", "", "bogus", "../x"])


# Half the time a part is harmless, so that an escape in one part is not hidden by another's refusal.
@given(
    filename=st.one_of(st.just("x.png"), paths),
    subfolder=st.one_of(st.just(""), paths),
    kind=st.one_of(st.just("output"), kinds),
    raw=st.booleans(),
)
def test_view_never_lets_an_escape_through(
    servers: Servers, filename: str, subfolder: str, kind: str, raw: bool
) -> None:
    """/view with escapes in every encoding, sent encoded or raw: the relay answers (400 for an
    escape), and whatever reaches ComfyUI stays inside its folders."""
    if raw:  # the query as a client wrote it, percent signs and all
        query = f"filename={filename}&subfolder={subfolder}&type={kind}".replace("#", "%23").replace(
            " ", "%20"
        )
        query = "".join(c if 32 < ord(c) < 127 else quote(c) for c in query)
    else:
        query = (
            f"filename={quote(filename, safe='')}&subfolder={quote(subfolder, safe='')}&type={quote(kind)}"
        )
    response = httpx.get(f"{servers.relay.url}/view?{query}", timeout=30)
    assert response.status_code < 500 or response.status_code in (502, 504), response.text
    check_answer(response)
    for seen in servers.reached("/view"):
        params = {key: values[0] for key, values in parse_qs(seen, keep_blank_values=True).items()}
        assert inside(params.get("filename", "")), seen
        assert inside(params.get("subfolder", "")), seen


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
node = st.fixed_dictionaries(
    {
        "class_type": st.one_of(
            st.sampled_from(["KSampler", "SaveImage", "LoadImage", "Nope"]), st.text(max_size=12)
        ),
        "inputs": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    }
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"prompt": st.one_of(st.dictionaries(st.text(max_size=4), node, max_size=4), json_values)},
        optional={
            "client_id": json_values,
            "prompt_id": json_values,
            "extra_data": json_values,
            "partial_execution_targets": json_values,
            "number": json_values,
            "front": json_values,
        },
    ),
)


@given(
    body=bodies,
    path=st.sampled_from(
        ["/prompt", "/api/prompt", "/workflows/text2img/prompt", "/workflows/%2e%2e/prompt"]
    ),
)
def test_prompt_bodies_get_a_clear_answer(servers: Servers, body: Any, path: str) -> None:
    """Any JSON (and some that is not) to the submit routes: accepted, or refused with a 4xx
    JSON error; never a relay 5xx or a traceback."""
    response = httpx.post(f"{servers.relay.url}{path}", content=json.dumps(body), timeout=30,
                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert response.status_code < 500 or response.status_code in (502, 504), response.text
    check_answer(response)


@given(raw=st.binary(max_size=200))
def test_bodies_that_are_not_json(servers: Servers, raw: bytes) -> None:
    response = httpx.post(f"{servers.relay.url}/prompt", content=raw, timeout=30)
    assert response.status_code in (200, 400, 413), response.text
    check_answer(response)


odd_values = ["", "-1", "0", "9" * 30, "relay", "comfy", "all", "ko", "en", "x" * 65, "a b", "%00"]
query_values = st.one_of(st.text(max_size=70), st.sampled_from(odd_values))


socket_keys = st.sampled_from(["clientId", "events", "since", "epoch", "lang", "token", "other"])
client_frames = st.lists(st.one_of(st.text(max_size=100), st.binary(max_size=100)), max_size=3)


@given(params=st.dictionaries(socket_keys, query_values, max_size=6), frames=client_frames)
def test_sockets_greet_or_refuse_with_a_documented_code(
    servers: Servers, params: dict[str, str], frames: list[str | bytes]
) -> None:
    """/ws with any query and any first frames: greeted with relay.hello (or a ComfyUI-style
    status), or refused with a relay.error and a documented close code; never a 1011."""
    query = "&".join(f"{quote(key)}={quote(value, safe='')}" for key, value in params.items())
    url = servers.relay.ws_url + (f"?{query}" if query else "")
    with connect(url, open_timeout=20, close_timeout=5) as socket:
        first = json.loads(socket.recv(timeout=20))
        assert first["type"] in ("relay.hello", "relay.error", "status"), first
        if first["type"] == "relay.error":
            with pytest.raises(websockets.ConnectionClosed) as closed:
                socket.recv(timeout=20)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code in DOCUMENTED_CLOSES, closed.value
            return
        for frame in frames:
            try:
                socket.send(frame)
            except websockets.ConnectionClosed:
                break
    assert servers.healthy()
