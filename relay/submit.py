"""``comfy-relay submit``: submit a workflow (or a graph file) through a relay and watch it run.

The watcher opens the client's ``/ws`` before submitting, so no event of the run can be
missed, and follows the prompt until its ``relay.done``. When the socket to the relay drops
it reconnects with ``since``/``epoch``; when the relay cannot replay what was missed (it
restarted) it reads the prompt's state from the snapshot the relay sends, and else from
ComfyUI's history through the relay, so the command always ends with the run's true result.

Exit codes: 0 the run succeeded (or, without ``--watch``, was accepted); 1 it failed or was
interrupted; 2 the request was refused (unknown workflow, bad parameter, bad graph file);
3 the relay could not be reached, or the watch lost the relay for longer than allowed;
130 Ctrl-C stopped the watch (the prompt keeps running).
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection, connect

from relay.events import history_outcome
from relay.terminal import LiveRenderer, PlainRenderer, Renderer, RunView

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_STOPPED",
    "EXIT_UNREACHABLE",
    "SubmitOptions",
    "cancel_prompt",
    "list_workflows",
    "run_submit",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_UNREACHABLE = 3
EXIT_STOPPED = 130

Event = dict[str, Any]

# How often the prompt's fate is read from /history while the relay cannot tell it.
_HISTORY_POLL = 2.0
# The end of a prompt ComfyUI no longer has in its queue or history.
_LOST = {
    "node": None,
    "class_type": None,
    "exception_type": "PromptLost",
    "message": "ComfyUI no longer knows this prompt (it was restarted?)",
}


class SubmitError(Exception):
    """Ends the command with ``code`` after printing ``message``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    """What ``comfy-relay submit`` was asked to do."""

    target: str
    relay_url: str = "http://127.0.0.1:8190"
    params: Sequence[str] = ()
    client_id: str | None = None
    lang: str | None = None
    # For a relay with RELAY_TOKEN: sent as a bearer header on every request and socket.
    token: str | None = None
    watch: bool = False
    progress: str = "auto"  # auto, live, plain
    # extra_data: keep the output files in the relay's storage; a URL told when the run ends.
    store: bool = False
    webhook_url: str | None = None
    # Timeouts
    connect_timeout: float = 5.0
    reconnect_for: float = 60.0


# Building the request ---------------------------------------------------------------------


def _parse_assignments(params: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in params:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SubmitError(f"--param {item!r}: expected NAME=VALUE", EXIT_REFUSED)
        pairs.append((name.strip(), value))
    return pairs


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _typed(kind: str | None, raw: str) -> Any:
    """The JSON value for a ``--param`` string, by the parameter's declared type.

    A value that does not read as its type is sent as given, so the relay's own check answers
    with its message naming the parameter.
    """
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        return raw
    if kind == "bool" and raw.lower() in _TRUE | _FALSE:
        return raw.lower() in _TRUE
    return raw


def _graph_file(path: Path) -> dict[str, Any]:
    """A body for POST /prompt from a file holding a graph, or a whole /prompt body."""
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise SubmitError(f"cannot read {path}: {exc.strerror}", EXIT_REFUSED) from None
    except orjson.JSONDecodeError as exc:
        raise SubmitError(f"{path} is not JSON: {exc}", EXIT_REFUSED) from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        return {k: v for k, v in data.items() if k in ("prompt", "extra_data", "partial_execution_targets")}
    if (
        isinstance(data, dict)
        and data
        and all(isinstance(n, dict) and "class_type" in n for n in data.values())
    ):
        return {"prompt": data}
    raise SubmitError(f"{path} holds neither an API-format graph nor a /prompt body", EXIT_REFUSED)


def _local_graph(target: str) -> dict[str, Any] | None:
    """The /prompt body when ``target`` is a graph file rather than a workflow name."""
    path = Path(target)
    if path.suffix != ".json" and not path.is_file():
        return None
    return _graph_file(path)


def _error_text(response: httpx.Response) -> str:
    """The message of a relay or ComfyUI JSON error answer, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        text = str(error.get("message") or error.get("type") or "error")
        details = error.get("details")
        lines = [text + (f": {details}" if details else "")]
        for node, problem in (body.get("node_errors") or {}).items():
            if not isinstance(problem, dict):
                continue
            kind = problem.get("class_type")
            lines.extend(
                f"  node {node} ({kind}): {item.get('details') or item.get('message')}"
                for item in problem.get("errors", [])
            )
        return "\n".join(lines)
    return str(error or body)[:300]


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _ws_url(relay_url: str) -> str:
    parts = urlsplit(relay_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", "", ""))


# The command ------------------------------------------------------------------------------


class _Submission:
    def __init__(self, options: SubmitOptions, http: httpx.AsyncClient, out: TextIO) -> None:
        self.options = options
        self.http = http
        self.out = out
        self.client_id = options.client_id or f"cli-{uuid.uuid4().hex[:10]}"
        self.prompt_id = str(uuid.uuid4())
        self.view = RunView(self.prompt_id)
        self.renderer: Renderer | None = None
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.socket: ClientConnection | None = None  # the one being read

    async def run(self) -> int:
        graph = await asyncio.to_thread(_local_graph, self.options.target)
        if graph is not None:
            if self.options.params:
                raise SubmitError("--param applies to workflows; edit the graph file instead", EXIT_REFUSED)
            route, body, title = "/prompt", graph, Path(self.options.target).name
        else:
            route, body, title = await self._workflow_request(self.options.target)
        body = {**body, "client_id": self.client_id, "prompt_id": self.prompt_id}
        extra = dict(body.get("extra_data") or {})
        if self.options.store:
            extra["store"] = True
        if self.options.webhook_url:
            extra["webhook_url"] = self.options.webhook_url
        if extra:
            body["extra_data"] = extra
        if not self.options.watch:
            answer = await self._post(route, body)
            self.out.write(f"{answer['prompt_id']}\n")
            return EXIT_OK
        socket, _ = await self._open_socket(resume=False)
        try:
            answer = await self._post(route, body)
            self._start_rendering(title, answer)
            return await self._follow(socket)
        finally:
            await socket.close()

    async def _workflow_request(self, name: str) -> tuple[str, dict[str, Any], str]:
        response = await self._get(f"/workflows/{name}")
        if response.status_code == 404:
            listing = (await self._get("/workflows")).json().get("workflows", [])
            known = ", ".join(w["name"] for w in listing) or "none"
            raise SubmitError(f"the relay knows no workflow named {name!r} (it knows: {known})", EXIT_REFUSED)
        if response.status_code != 200:
            code = EXIT_REFUSED if 400 <= response.status_code < 500 else EXIT_UNREACHABLE
            raise SubmitError(f"GET /workflows/{name}: {_error_text(response)}", code)
        spec = response.json()
        declared = spec.get("parameters", {})
        values: dict[str, Any] = {}
        for key, raw in _parse_assignments(self.options.params):
            kind = declared.get(key, {}).get("type")
            if kind == "image" and raw.startswith("@"):
                values[key] = await self._upload(Path(raw[1:]))
            else:
                values[key] = _typed(kind, raw)
        return f"/workflows/{name}/prompt", {"params": values}, name

    async def _upload(self, path: Path) -> str:
        """Upload a local image through the relay; the name to give the workflow."""
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise SubmitError(f"cannot read {path}: {exc.strerror}", EXIT_REFUSED) from None
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        response = await self._request(
            "POST", "/upload/image", files={"image": (path.name, data, mime)}, data={"type": "input"}
        )
        if response.status_code != 200:
            raise SubmitError(f"uploading {path}: {_error_text(response)}", EXIT_REFUSED)
        stored = response.json()
        name = str(stored["name"])
        return f"{stored['subfolder']}/{name}" if stored.get("subfolder") else name

    async def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._request("POST", route, json=body)
        if response.status_code == 200:
            answer: dict[str, Any] = response.json()
            return answer
        code = EXIT_REFUSED if 400 <= response.status_code < 500 else EXIT_UNREACHABLE
        raise SubmitError(
            f"the relay refused the prompt ({response.status_code}): {_error_text(response)}", code
        )

    async def _get(self, route: str) -> httpx.Response:
        return await self._request("GET", route)

    async def _request(self, method: str, route: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.http.request(method, route, **kwargs)
        except httpx.TimeoutException:
            raise SubmitError(
                f"{method} {route}: the relay did not answer in time", EXIT_UNREACHABLE
            ) from None
        except httpx.TransportError as exc:
            raise SubmitError(
                f"cannot reach the relay at {self.options.relay_url}: {exc}", EXIT_UNREACHABLE
            ) from None

    # Watching -------------------------------------------------------------------------------

    def _start_rendering(self, title: str, answer: dict[str, Any]) -> None:
        style = self.options.progress
        if style == "auto":
            style = "live" if self.out.isatty() else "plain"
        base = self.options.relay_url.rstrip("/") + "/"
        self.out.write(f"{title}: prompt {self.prompt_id} (client {self.client_id})\n")
        if style == "live":
            columns = shutil.get_terminal_size().columns
            self.renderer = LiveRenderer(self.view, self.out, base_url=base, columns=columns)
        else:
            self.renderer = PlainRenderer(self.view, self.out, base_url=base)
        if answer.get("node_errors"):
            self.renderer.note(
                f"some outputs failed validation and will not run: {list(answer['node_errors'])}"
            )

    async def _open_socket(self, *, resume: bool) -> tuple[ClientConnection, Event]:
        """The client's relay socket and its ``relay.hello``; resuming from the last event seen."""
        query: dict[str, Any] = {"clientId": self.client_id}
        if self.options.lang:
            query["lang"] = self.options.lang
        if resume and self.last_seq is not None and self.epoch is not None:
            query.update(since=self.last_seq, epoch=self.epoch)
        url = f"{_ws_url(self.options.relay_url)}?{urlencode(query)}"
        failures = (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed)
        try:
            socket = await connect(
                url,
                open_timeout=self.options.connect_timeout,
                max_size=2**24,
                additional_headers=_auth(self.options.token),
            )
        except failures as exc:
            raise SubmitError(f"cannot open the relay's WebSocket {url}: {exc}", EXIT_UNREACHABLE) from None
        try:
            hello = self._decode(await asyncio.wait_for(socket.recv(), self.options.connect_timeout))
        except failures as exc:
            await socket.close()
            raise SubmitError(
                f"no greeting on the relay's WebSocket {url}: {exc}", EXIT_UNREACHABLE
            ) from None
        if hello.get("type") == "relay.error":
            await socket.close()
            raise SubmitError(
                f"the relay refused the socket ({hello.get('code')}): {hello.get('message')}", EXIT_REFUSED
            )
        if hello.get("type") != "relay.hello":
            await socket.close()
            raise SubmitError(
                f"the relay's WebSocket did not greet with relay.hello: {hello}", EXIT_UNREACHABLE
            )
        self.epoch = hello.get("epoch")
        self._track(hello)
        return socket, hello

    def _decode(self, frame: str | bytes) -> Event:
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return {}
        return event if isinstance(event, dict) else {}

    def _track(self, event: Event) -> None:
        seq = event.get("seq")
        if isinstance(seq, int) and (self.last_seq is None or seq > self.last_seq):
            self.last_seq = seq

    async def _follow(self, socket: ClientConnection) -> int:
        """Show the run until its end, across lost relay sockets; the exit code for its result."""
        assert self.renderer is not None
        renderer = self.renderer
        poller: asyncio.Task[None] | None = None
        try:
            while True:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await self._read(socket, renderer)
                if self.view.finished:
                    break
                renderer.note("… lost the connection to the relay; reconnecting")
                socket, hello = await self._reconnect()
                if hello.get("resumed"):
                    renderer.note(f"… reconnected, {hello.get('missed') or 0} missed events replayed")
                    continue
                if self.view.phase == "done":
                    # Only storage was left, and the relay lost what it had to say about it.
                    renderer.note(
                        f"… the relay restarted before telling where {self.view.storing_left} file(s) "
                        "were stored; look for them under the keys relay.done named"
                    )
                    break
                renderer.note(
                    "… reconnected; the relay could not replay what was missed, asking ComfyUI's history"
                )
                if poller is None:
                    poller = asyncio.create_task(self._poll_history(renderer))
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            renderer.close()
            await socket.close()
        return EXIT_OK if self.view.status == "success" else EXIT_FAILED

    async def _read(self, socket: ClientConnection, renderer: Renderer) -> None:
        self.socket = socket
        async for frame in socket:
            event = self._decode(frame)
            self._track(event)
            if event.get("type") == "relay.upstream" and event.get("state") == "down":
                reason = event.get("reason") or "no reason given"
                renderer.note(f"… the relay lost its ComfyUI connection ({reason}); it is reconnecting")
            renderer.event(event)
            if self.view.finished:
                return

    async def _reconnect(self) -> tuple[ClientConnection, Event]:
        deadline = time.monotonic() + self.options.reconnect_for
        delay = 0.2
        while True:
            try:
                return await self._open_socket(resume=True)
            except SubmitError as exc:
                if time.monotonic() + delay > deadline:
                    raise SubmitError(
                        f"lost the relay for over {self.options.reconnect_for:g} s ({exc.message}); "
                        f"prompt {self.prompt_id} may still be running",
                        EXIT_UNREACHABLE,
                    ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _poll_history(self, renderer: Renderer) -> None:
        """Until the run is known to be over: its end from /history, or that ComfyUI lost it.

        Used once the relay could not replay missed events (it restarted, or the gap was too
        long): the relay may then never send this prompt's ``relay.done``.
        """
        while self.view.phase != "done":
            # A relay that is still starting, or an answer that is not JSON: try again later.
            with contextlib.suppress(SubmitError, httpx.HTTPStatusError, ValueError):
                event = await self._history_event()
                if event is not None and self.view.phase != "done":
                    renderer.event(event)
                    if self.socket is not None:
                        await self.socket.close()  # ends the read loop, which sees the run finished
                    return
            await asyncio.sleep(_HISTORY_POLL)

    async def _history_event(self) -> Event | None:
        """A ``relay.done`` made from ComfyUI's records, or None while the prompt is still on."""
        entry = await self._history_entry()
        if entry is None:
            queue = await self._get("/queue")
            queue.raise_for_status()
            listed = queue.json()
            items = [*listed.get("queue_running", []), *listed.get("queue_pending", [])]
            if any(isinstance(item, list) and len(item) > 1 and item[1] == self.prompt_id for item in items):
                return None
            entry = await self._history_entry()  # it may have finished between the two reads
            if entry is None:
                return self._done_event("error", _LOST, {}, None)
        status, error = history_outcome(entry)
        outputs = entry.get("outputs")
        return self._done_event(status, error, outputs, _run_time(entry))

    async def _history_entry(self) -> dict[str, Any] | None:
        response = await self._get(f"/history/{self.prompt_id}")
        response.raise_for_status()
        entry = response.json().get(self.prompt_id)
        if not isinstance(entry, dict) or not (entry.get("status") or {}).get("messages"):
            return None
        return entry

    def _done_event(
        self, status: str, error: dict[str, Any] | None, outputs: Any, elapsed: float | None
    ) -> Event:
        event: Event = {
            "type": "relay.done",
            "prompt_id": self.prompt_id,
            "status": status,
            "outputs": outputs if isinstance(outputs, dict) else {},
            "recovered": True,
            "elapsed": elapsed if elapsed is not None else self.view.elapsed,
        }
        if status == "success":
            event["percent"] = 100.0
        if error is not None:
            event["error"] = error
        return event


def _run_time(entry: dict[str, Any]) -> float | None:
    """Seconds from execution_start to the terminal message, from the history's timestamps (ms)."""
    stamps = {}
    for message in (entry.get("status") or {}).get("messages") or []:
        if isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict):
            stamp = message[1].get("timestamp")
            if isinstance(stamp, (int, float)):
                stamps[message[0]] = stamp
    start = stamps.get("execution_start")
    end = next(
        (stamps[k] for k in ("execution_success", "execution_error", "execution_interrupted") if k in stamps),
        None,
    )
    if start is None or end is None:
        return None
    return max(0.0, (end - start) / 1000)


async def run_submit(options: SubmitOptions, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``comfy-relay submit``; the process exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    timeout = httpx.Timeout(60.0, connect=options.connect_timeout)
    async with httpx.AsyncClient(
        base_url=options.relay_url, timeout=timeout, headers=_auth(options.token)
    ) as http:
        submission = _Submission(options, http, out)
        try:
            return await submission.run()
        except SubmitError as exc:
            out.flush()
            err.write(f"comfy-relay submit: {exc.message}\n")
            return exc.code
        except asyncio.CancelledError:
            if submission.view.phase != "submitted" and not submission.view.finished:
                err.write(f"\nstopped watching; prompt {submission.prompt_id} keeps running\n")
            raise


async def list_workflows(
    relay_url: str, lang: str, out: TextIO | None = None, *, token: str | None = None
) -> int:
    """Print the workflows a relay knows (``comfy-relay workflows``); the exit code."""
    out = out if out is not None else sys.stdout
    try:
        async with httpx.AsyncClient(base_url=relay_url, timeout=10.0, headers=_auth(token)) as http:
            response = await http.get("/workflows")
            response.raise_for_status()
    except httpx.HTTPError as exc:
        sys.stderr.write(f"comfy-relay workflows: cannot list the workflows at {relay_url}: {exc}\n")
        return EXIT_UNREACHABLE
    for workflow in response.json().get("workflows", []):
        title = workflow.get("title", {}).get(lang) or ""
        out.write(f"{workflow['name']}  ({len(workflow.get('steps', []))} steps)  {title}\n")
        for name, spec in workflow.get("parameters", {}).items():
            default = f" = {spec['default']!r}" if "default" in spec else " (required)"
            choices = f" one of {', '.join(spec['choices'])}" if spec.get("choices") else ""
            out.write(f"    {name}: {spec.get('type')}{choices}{default}\n")
    return EXIT_OK


async def cancel_prompt(
    relay_url: str, prompt_id: str, out: TextIO | None = None, *, token: str | None = None
) -> int:
    """``comfy-relay cancel``: take a prompt out of the queue, or interrupt it if it runs.

    Exit codes: 0 cancelled, 1 it had already ended (nothing to cancel), 2 the id was refused,
    3 the relay (or ComfyUI behind it) could not be reached.
    """
    out = out if out is not None else sys.stdout
    try:
        async with httpx.AsyncClient(base_url=relay_url, timeout=30.0, headers=_auth(token)) as http:
            response = await http.post(f"/prompt/{quote(prompt_id, safe='')}/cancel")
    except httpx.HTTPError as exc:
        sys.stderr.write(f"comfy-relay cancel: cannot reach the relay at {relay_url}: {exc}\n")
        return EXIT_UNREACHABLE
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        sys.stderr.write(f"comfy-relay cancel: {message}\n")
        return EXIT_REFUSED if response.status_code < 500 else EXIT_UNREACHABLE
    if response.json().get("cancelled"):
        out.write(f"{prompt_id}: cancelled\n")
        return EXIT_OK
    out.write(f"{prompt_id}: nothing to cancel (it had already ended, or ComfyUI does not know it)\n")
    return EXIT_FAILED
