"""Hostile uploads, headers and socket handshakes.

Uploads: multipart bodies built from parts a fuzzer can break (boundaries that do not match,
parts missing or out of order, huge part headers, file names and subfolders with escapes, a
body cut short). Whatever the relay lets through must be saved by ComfyUI inside its folders.

Headers, on a relay with a token and one allowed origin: any mix of good, bad, repeated and
oversized ``Authorization``, ``Origin``, ``Host`` and ``X-Forwarded-Host``, sent byte for byte
on a raw connection (HTTP client libraries refuse to send some of them). A request gets through
only with the token and, when it can change something, an allowed origin; the token is never
echoed back.

Sockets: subprotocols, frames over the limit, fragmented and invalid UTF-8 frames; every
close carries a documented code.
"""

from __future__ import annotations

import asyncio
import json
import string
from typing import Any

import httpx
import websockets
from hypothesis import event, given
from hypothesis import strategies as st
from websockets.protocol import State
from websockets.sync.client import connect

from relay.filenames import upstream_safe_name, upstream_safe_subfolder
from tests.fuzz.conftest import ALLOWED_ORIGIN, TOKEN, Servers
from tests.fuzz.test_inputs import DOCUMENTED_CLOSES, check_answer, inside, paths

# Multipart ---------------------------------------------------------------------------------

field_names = st.one_of(
    st.sampled_from(["image", "subfolder", "type", "overwrite", "file", ""]), st.text(max_size=10)
)


@st.composite
def parts(draw: st.DrawFn) -> tuple[str, bytes]:
    """One part: its name (or None for a part without one) and its bytes, headers and all."""
    name = draw(field_names)
    is_file = draw(st.booleans())
    filename = draw(st.one_of(st.just("a.png"), paths)) if is_file else None
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    headers = [f"Content-Disposition: {disposition}"]
    if is_file:
        headers.append("Content-Type: image/png")
    if draw(st.integers(0, 9)) == 0:  # now and then a part header far over any sane size
        headers.append("X-Pad: " + "p" * draw(st.integers(1_000, 200_000)))
    if draw(st.integers(0, 9)) == 0:
        headers.append(f'Content-Disposition: form-data; name="{draw(field_names)}"')
    value = draw(
        st.one_of(
            st.binary(max_size=64), paths.map(str.encode), st.sampled_from([b"input", b"output", b"../x"])
        )
    )
    return name, ("\r\n".join(headers).encode("utf-8", "surrogatepass") + b"\r\n\r\n" + value)


@st.composite
def forms(draw: st.DrawFn) -> tuple[str, bytes]:
    """A Content-Type header and a body: mostly well-formed around hostile parts, sometimes broken."""
    boundary = draw(
        st.one_of(
            st.just("fuzzboundary"),
            st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=72),
        )
    )
    used = boundary if draw(st.integers(0, 4)) else draw(st.sampled_from(["other", "", boundary + "x"]))
    chosen = draw(st.lists(parts(), max_size=5))
    if draw(st.booleans()):  # a proper image part somewhere, so that checks after it are reached
        chosen.insert(
            draw(st.integers(0, len(chosen))),
            ("image", b'Content-Disposition: form-data; name="image"; filename="ok.png"\r\n\r\n\x89PNG'),
        )
    body = b"".join(b"--" + used.encode() + b"\r\n" + part + b"\r\n" for _, part in chosen)
    ending = draw(st.sampled_from(["close", "close", "none", "cut"]))
    if ending == "close":
        body += b"--" + used.encode() + b"--\r\n"
    elif ending == "cut":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    kind = draw(
        st.sampled_from(["multipart/form-data", "multipart/form-data", "multipart/mixed", "text/plain"])
    )
    header = f"{kind}; boundary={boundary}" if draw(st.integers(0, 9)) else kind
    return header, body


@given(
    form=forms(), path=st.sampled_from(["/upload/image", "/api/upload/image", "/upload/mask", "/api/assets"])
)
def test_uploads_never_save_outside_comfyuis_folders(
    servers: Servers, form: tuple[str, bytes], path: str
) -> None:
    """Every broken or hostile form gets a clear answer; what ComfyUI accepted it saved inside
    its folders, under a name the relay's own rule calls safe."""
    content_type, body = form
    response = httpx.post(
        f"{servers.relay.url}{path}", content=body, headers={"Content-Type": content_type}, timeout=30
    )
    assert response.status_code < 500 or response.status_code in (502, 504), response.text
    check_answer(response)
    event(f"status {response.status_code}")
    if response.status_code == 200 and path != "/api/assets":
        saved = response.json()
        assert inside(saved["name"]), saved
        assert "/" not in saved["name"], saved
        assert inside(saved.get("subfolder", "")), saved
        assert upstream_safe_name(saved["name"]), saved
        assert upstream_safe_subfolder(saved.get("subfolder", "")), saved


# Headers -----------------------------------------------------------------------------------

authorizations = st.sampled_from(
    [f"Bearer {TOKEN}", f"bearer {TOKEN}", "Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer ", "",
     f"Bearer {TOKEN[:-1]}", "Bearer " + "t" * 9000]
)  # fmt: skip
origins = st.one_of(
    st.sampled_from([ALLOWED_ORIGIN, ALLOWED_ORIGIN + "/", "https://APP.example", "https://evil.example",
                     "null", "", "http://app.example", "https://app.example.evil.example", "https://relay"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)  # fmt: skip
hosts = st.sampled_from(["relay", "evil.example", "app.example", "", "relay:80"])
header_sets = st.lists(
    st.one_of(
        st.tuples(st.just("Authorization"), authorizations),
        st.tuples(st.just("Origin"), origins),
        st.tuples(st.just("Host"), hosts),
        st.tuples(st.just("X-Forwarded-Host"), hosts),
        st.tuples(
            st.sampled_from(["X-Client-Id", "Cookie", "X-Pad"]),
            st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=100),
        ),
        st.tuples(st.just("X-Big"), st.integers(1, 80_000).map(lambda n: "b" * n)),
    ),
    max_size=6,
)


async def _raw_request(
    port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes
) -> tuple[int, bytes]:
    """Send exactly these header lines; the status and body (0 when the server hung up)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [
            f"{method} {path} HTTP/1.1",
            *(f"{k}: {v}" for k, v in headers),
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        writer.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await reader.read()
    except ConnectionError:
        return 0, b""
    finally:
        writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, rest


def _verdict(headers: list[tuple[str, str]], method: str) -> str:
    """What the relay must do with these headers, by its documented rules."""
    headers = [(k, v.strip()) for k, v in headers]  # as the HTTP layer reads them
    names = [k.lower() for k, _ in headers]
    if any(names.count(n) > 1 for n in ("host", "origin", "x-forwarded-host")) or "host" not in names:
        return "bad"
    given = {k.lower(): v for k, v in headers}
    origin = given.get("origin")
    if origin is not None and method == "POST":
        origin = origin.rstrip("/").lower()
        authority = origin.partition("://")[2]
        forwarded = given.get("x-forwarded-host", "").split(",")[0].strip().lower()
        if origin != ALLOWED_ORIGIN and authority not in {given["host"].lower(), forwarded} - {""}:
            return "origin"
    bearers = [v for k, v in headers if k == "Authorization" and v[:7].lower() == "bearer "]
    if not any(v[7:].strip() == TOKEN for v in bearers):
        return "token"
    return "ok"


# Most requests start as a client would send them, so that the fuzzed headers decide.
starts = st.sampled_from(
    [[], [("Host", "relay")], *[[("Host", "relay"), ("Authorization", f"Bearer {TOKEN}")]] * 3]
)


@given(start=starts, headers=header_sets, method=st.sampled_from(["GET", "POST"]))
def test_headers_let_in_only_what_the_rules_allow(
    guarded: Servers, start: list[tuple[str, str]], headers: list[tuple[str, str]], method: str
) -> None:
    headers = [*start, *headers]
    path = "/prompt" if method == "POST" else "/history"
    status, body = guarded.run(_raw_request(guarded.relay.port, method, path, headers, b'{"prompt": {}}'))
    assert TOKEN.encode() not in body
    assert b"Traceback" not in body
    assert status == 0 or status < 500 or status in (502, 504), body
    if sum(len(k) + len(v) for k, v in headers) > 60_000 and status in (0, 400, 431):
        return  # the HTTP layer may refuse a head that large before the relay sees it
    expected = _verdict(headers, method)
    event(f"{expected}: {status}")
    if expected == "bad":
        assert status == 400, (status, body)
    elif expected == "origin":
        assert status == 403, (status, body)
    elif expected == "token":
        assert status == 401, (status, body)
    else:
        assert status not in (400, 401, 403) or (status == 400 and method == "POST"), (status, body)
        if status == 400:  # the empty graph, refused by the relay, not by its access rules
            assert json.loads(body)["error"]["type"] not in (
                "duplicate_header",
                "origin_not_allowed",
                "unauthorized",
            )


# Socket handshakes and frames --------------------------------------------------------------

subprotocols = st.lists(
    st.one_of(
        st.sampled_from(
            ["comfy-relay", f"comfy-relay.token.{TOKEN}", "comfy-relay.token.nope", "graphql-ws", "x"]
        ),
        st.text(
            st.sampled_from(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"), min_size=1, max_size=30
        ),
    ),
    max_size=4,
    unique=True,
)
frames = st.lists(
    st.one_of(
        st.text(max_size=200).map(lambda text: ("text", text)),
        st.binary(max_size=200).map(lambda data: ("binary", data)),
        st.integers(64 * 1024 + 1, 300_000).map(lambda size: ("oversized", "x" * size)),
        st.lists(st.text(max_size=50), min_size=1, max_size=5).map(lambda pieces: ("fragments", pieces)),
        st.binary(min_size=1, max_size=20).map(lambda data: ("bad_utf8", b"\xff" + data)),
    ),
    max_size=3,
)


@given(offered=subprotocols, sent=frames, token_in_query=st.booleans())
def test_socket_handshakes_and_frames(
    guarded: Servers, offered: list[str], sent: list[tuple[str, Any]], token_in_query: bool
) -> None:
    """Any subprotocols and any frames: greeted only with the token, every close documented,
    and a socket closed for a bad frame never takes the relay down."""
    url = guarded.relay.ws_url + (f"?token={TOKEN}" if token_in_query else "")
    has_token = token_in_query or f"comfy-relay.token.{TOKEN}" in offered
    with connect(
        url, subprotocols=offered or None, open_timeout=20, close_timeout=5, max_size=None
    ) as socket:  # type: ignore[arg-type]
        # comfy-relay when offered, else a token one offered (a browser needs one of its own back)
        chosen = socket.subprotocol
        assert chosen is None or chosen in offered, chosen
        assert (
            chosen == "comfy-relay"
            if "comfy-relay" in offered
            else chosen is None or chosen.startswith("comfy-relay.token.")
        )
        first = json.loads(socket.recv(timeout=20))
        assert first["type"] == ("relay.hello" if has_token else "relay.error"), first
        kind = ""
        try:
            for kind, payload in sent:
                if kind == "fragments":
                    socket.send(iter(payload) if payload else "")
                elif kind == "bad_utf8":
                    socket.send(payload, text=True)
                else:
                    socket.send(payload)
                if kind in ("bad_utf8", "oversized"):
                    # The relay closes now and drops the connection; a client reads the close
                    # rather than send on (whatever it sent next would reset the connection).
                    while True:  # frames already on their way, then the close
                        socket.recv(timeout=20)
            # The pong proves that everything sent before it has been read; a close raises.
            pong = socket.ping()
            for _ in range(400):
                if pong.wait(0.05):
                    break
                if socket.state is State.CLOSED:
                    socket.recv(timeout=5)
            else:
                raise TimeoutError
        except websockets.ConnectionClosed as closed:
            ended: websockets.ConnectionClosed | None = closed
        except TimeoutError:
            raise AssertionError("the relay stopped answering pings") from None
        else:
            ended = None
    if ended is not None:
        code = ended.rcvd.code if ended.rcvd is not None else None
        event(f"closed {code}")
        # Refused by its header while the client still sends its body, an oversized frame's
        # close and drop can reach a client that is mid-write as a reset, as an HTTP 413 can.
        # The relay is fine, which the health check below shows.
        if not (code is None and kind == "oversized" and has_token):
            assert code in DOCUMENTED_CLOSES, ended
            assert has_token or code == 4401, ended
    assert guarded.healthy()
