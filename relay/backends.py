"""The ComfyUI servers behind the relay: their health and load, and which one runs each prompt.

With one server (``COMFYUI_URL``) this is a thin holder of its two HTTP clients and nothing
routes. With several (``RELAY_COMFYUI_URLS``, or a headless Service's name written
``dns+http://name:port`` whose addresses are looked up again and again) every prompt goes to
one backend, and everything about it follows that choice (the route, kept here per prompt):

* **Picking** (:meth:`Backends.pick`): never a backend that is down or draining. Least loaded
  first, load being the larger of what the backend's queue last said (its ``status`` frames,
  the checks here) and the prompts this relay sent it that have not ended (a burst counts at
  once, before any status frame). A backend whose last prompt was of the same workflow gets a
  one-prompt head start: its models are loaded, and ComfyUI's cache skips their loaders. A
  prompt naming input files uploaded through the relay prefers backends that have them all.
  ``RELAY_ROUTING=round-robin`` turns it into plain rotation (the benchmark's baseline).
* **Health** (:meth:`Backends.start`): each backend is asked ``GET /prompt`` every
  ``backend_check_interval`` seconds. One that does not answer is down: no new prompts. Its
  running prompts are reported lost at once if it refused the connection (nothing listens:
  ComfyUI's queue lives in its memory and is gone), else once it has stayed away
  ``backend_lost_after`` seconds. One that answers again rejoins. A backend whose address left
  the name's answer is draining: no new prompts, forgotten once its prompts have ended.
* **Files**: the backend of each output file seen in a prompt's end (so ``/view`` goes
  straight there), and of each input uploaded through the relay.

Nothing here knows sessions or sockets: the sessions tell it what they route and what ended,
and it tells them, through :meth:`Backends.on_lost`, which backend went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.comfy import ComfyClient
from relay.config import RelayConfig
from relay.errors import UpstreamUnavailable
from relay.events import file_refs
from relay.metrics import Metrics
from relay.streaming import StreamingClient
from relay.tasks import stop

__all__ = ["Backend", "BackendState", "Backends", "affinity_of", "file_key", "input_names"]

log = structlog.get_logger("relay.backends")

BackendState = Literal["up", "down", "draining"]
_STATES: tuple[BackendState, ...] = ("up", "down", "draining")

# Routes and file locations remembered (oldest forgotten first): enough for the prompts and
# files a front end still asks about; anything older is looked for on every backend.
_ROUTES_KEPT = 20_000
_FILES_KEPT = 50_000
# Strings in a graph that name model files: a graph without a known workflow is recognised by them.
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")


def affinity_of(graph: Mapping[str, Any], workflow: str | None) -> str:
    """What "the same workflow" means for routing, as far as loaded models go: the workflow's
    name (for a bare graph, its node classes) and the model files it names. The same workflow
    with another checkpoint loads another model."""
    parts: set[str] = set()
    for node in graph.values():
        if not isinstance(node, dict):
            continue
        if not workflow:
            parts.add(f"class:{node.get('class_type')}")
        inputs = node.get("inputs")
        for value in inputs.values() if isinstance(inputs, dict) else ():
            if isinstance(value, str) and value.lower().endswith(_MODEL_SUFFIXES):
                parts.add(f"model:{value}")
    digest = hashlib.blake2b("\n".join(sorted(parts)).encode(), digest_size=8).hexdigest()
    return f"workflow:{workflow}:{digest}" if workflow else f"graph:{digest}"


def file_key(filename: str, subfolder: str, file_type: str) -> tuple[str, str, str]:
    return (file_type or "output", subfolder or "", filename)


def input_names(graph: Mapping[str, Any]) -> set[str]:
    """Every string input of the graph, as a loader names an input file ("sub/name.png [input]"
    is "sub/name.png")."""
    names: set[str] = set()
    for node in graph.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        for value in inputs.values() if isinstance(inputs, dict) else ():
            if isinstance(value, str) and 0 < len(value) < 512:
                names.add(value.removesuffix(" [input]"))
    return names


def _refused(exc: BaseException | None) -> bool:
    """Whether the connection was refused (nothing listens there), anywhere in the cause chain."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ConnectionRefusedError):
            return True
        if isinstance(exc, OSError) and exc.errno in (111, 61):  # ECONNREFUSED on Linux, macOS
            return True
        if "connection refused" in str(exc).lower() or "connect call failed" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class Backend:
    """One ComfyUI server: its HTTP clients, its state and load, and the prompts sent to it."""

    def __init__(self, url: str, index: int, config: RelayConfig, *, named: bool = False) -> None:
        self.url = url
        # Found by looking a dns+ name up (it drains when the name no longer lists it).
        self.named = named
        parts = urlsplit(url)
        self.name = parts.netloc  # host:port: the same on every relay, so routes can be shared
        self.index = index
        self.comfy = ComfyClient(config, base_url=url)
        self.streams = StreamingClient(
            url,
            connect_timeout=config.http_connect_timeout,
            read_timeout=config.http_read_timeout,
            max_connections=config.http_max_connections,
        )
        self.ws_url = "ws" + url.removeprefix("http") + "/ws"
        self.state: BackendState = "up"
        # In the configured list, or in the name's last answer; False: draining.
        self.listed = True
        self.reported = 0  # its queue (running included) as it last said
        self.in_flight: set[str] = set()
        self.affinity: str | None = None  # what its last prompt was (affinity_of)
        self.problem: str | None = None
        self.down_since: float | None = None
        self.refused = False
        self.lost_told = False  # its prompts were reported lost in this outage
        self.latency: float | None = None
        self.checked = False

    @property
    def load(self) -> int:
        return max(len(self.in_flight), self.reported)

    def public(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "url": self.url,
            "state": self.state,
            "queue_remaining": self.reported,
            "in_flight": len(self.in_flight),
        }
        if self.latency is not None:
            body["latency_ms"] = round(self.latency * 1000, 1)
        if self.problem is not None:
            body["problem"] = self.problem
        return body

    async def aclose(self) -> None:
        await self.comfy.aclose()
        await self.streams.aclose()


async def _lookup(host: str, port: int) -> list[str]:
    """The addresses of ``host`` (a headless Service answers with one per ready pod)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class Backends:
    """Every backend, the route of each prompt, where files are, and the health watch."""

    def __init__(
        self,
        config: RelayConfig,
        metrics: Metrics | None = None,
        *,
        lookup: Callable[[str, int], Any] = _lookup,
        redis: Redis | None = None,
    ) -> None:
        self.config = config
        # With replicas: each prompt's route is shared, so any relay finds its files and history.
        self.redis = redis
        self._sharing: set[asyncio.Task[None]] = set()
        self.metrics = metrics or Metrics()
        self.pooled = config.pooled
        self._lookup = lookup
        self._backends: dict[str, Backend] = {}
        self._retired: list[Backend] = []
        self._names: list[tuple[str, str, int]] = []  # dns+ entries: scheme, host, port
        self._indexes = itertools.count()
        for entry in config.backend_entries:
            if entry.startswith("dns+"):
                parts = urlsplit(entry.removeprefix("dns+"))
                default_port = 443 if parts.scheme == "https" else 80
                self._names.append((parts.scheme, parts.hostname or "", parts.port or default_port))
            else:
                self._add(entry)
        self.routes: OrderedDict[str, str] = OrderedDict()
        self.files: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self.inputs: OrderedDict[str, set[str]] = OrderedDict()
        self._turn = itertools.count()
        self._listeners: list[Callable[[Backend, str], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._resolved_at = float("-inf")

    # Who is there -------------------------------------------------------------------------

    def _add(self, url: str, *, named: bool = False) -> Backend:
        backend = Backend(url, next(self._indexes), self.config, named=named)
        self._backends[backend.name] = backend
        self._gauge(backend)
        return backend

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def get(self, name: str | None) -> Backend | None:
        return self._backends.get(name) if name is not None else None

    def first(self) -> Backend:
        """The backend for what any of them can answer (node definitions, system stats): the
        first one up, else the first one.

        Raises:
            UpstreamUnavailable: there is none (a name that resolved to no address).
        """
        backends = list(self._backends.values())
        for backend in backends:
            if backend.state == "up":
                return backend
        if not backends:
            raise UpstreamUnavailable("no ComfyUI backend is known yet (the name resolved to no address)")
        return backends[0]

    def up(self) -> list[Backend]:
        return [backend for backend in self._backends.values() if backend.state == "up"]

    def total_remaining(self) -> int:
        return sum(backend.reported for backend in self._backends.values() if backend.state != "down")

    # Routing ------------------------------------------------------------------------------

    def pick(
        self, affinity: str | None = None, inputs: Iterable[str] = (), avoid: Iterable[str] = ()
    ) -> Backend:
        """The backend for a new prompt (see the module's notes).

        Raises:
            UpstreamUnavailable: no backend is up.
        """
        if not self.pooled:
            return self.first()
        avoided = set(avoid)
        candidates = [b for b in self.up() if b.name not in avoided]
        if not candidates:
            problems = "; ".join(f"{b.name}: {b.problem or b.state}" for b in self._backends.values())
            raise UpstreamUnavailable(f"no ComfyUI backend is up ({problems or 'none known'})")
        holders: set[str] | None = None
        for name in inputs:
            having = self.inputs.get(name)
            if having is not None:
                holders = set(having) if holders is None else holders & having
        if holders is not None:
            having_all = [b for b in candidates if b.name in holders]
            candidates = having_all or candidates
        if self.config.routing == "round-robin":
            return candidates[next(self._turn) % len(candidates)]

        def cost(backend: Backend) -> tuple[int, int, int]:
            switch = 0 if affinity is not None and backend.affinity == affinity else 1
            return (backend.load + switch, backend.load, backend.index)

        return min(candidates, key=cost)

    def assign(self, backend: Backend, prompt_id: str, affinity: str | None = None) -> None:
        """``prompt_id`` goes to ``backend`` (before it is sent: its load counts at once)."""
        if not self.pooled:
            return  # one backend: nothing to weigh or find again
        backend.in_flight.add(prompt_id)
        if affinity is not None:
            backend.affinity = affinity
        self._remember(self.routes, prompt_id, backend.name, _ROUTES_KEPT)
        self._count(backend)
        self._share(prompt_id, backend.name)

    def sent(self, backend: Backend) -> None:
        """ComfyUI took a prompt routed to ``backend``."""
        if self.pooled:
            self.metrics.backend_prompts.labels(backend.name).inc()

    def place(self, prompt_id: str, name: str) -> None:
        """A prompt found running on ``name`` (taken over from another relay, or forgotten)."""
        if not self.pooled:
            return
        self._remember(self.routes, prompt_id, name, _ROUTES_KEPT)
        self._share(prompt_id, name)
        backend = self._backends.get(name)
        if backend is not None:
            backend.in_flight.add(prompt_id)
            self._count(backend)

    def unassign(self, prompt_id: str) -> None:
        """ComfyUI did not take the prompt: it was never there."""
        name = self.routes.pop(prompt_id, None)
        self._release(name, prompt_id)

    def finished(self, prompt_id: str, outputs: Mapping[str, Any] | None = None) -> None:
        """The prompt ended; its route stays known (for /history and /view), its files too."""
        if not self.pooled:
            return
        name = self.routes.get(prompt_id)
        self._release(name, prompt_id)
        if name is not None and outputs:
            for output in outputs.values():
                for _, ref in file_refs(output):
                    self._remember(self.files, file_key(ref["filename"], ref["subfolder"], ref["type"]), name,
                                   _FILES_KEPT)  # fmt: skip

    def _release(self, name: str | None, prompt_id: str) -> None:
        backend = self._backends.get(name) if name is not None else None
        if backend is not None:
            backend.in_flight.discard(prompt_id)
            self._count(backend)
            if not backend.listed and not backend.in_flight:
                self._retire(backend)

    def route_of(self, prompt_id: str) -> Backend | None:
        return self.get(self.routes.get(prompt_id))

    def _share(self, prompt_id: str, name: str) -> None:
        """With replicas and several backends: write the route to Redis, in the background."""
        if self.redis is None or not self.pooled:
            return
        task = asyncio.create_task(self._write_route(prompt_id, name), name="relay-route")
        self._sharing.add(task)
        task.add_done_callback(self._sharing.discard)

    async def _write_route(self, prompt_id: str, name: str) -> None:
        assert self.redis is not None
        try:
            await self.redis.set(_route_key(prompt_id), name, ex=max(1, int(self.config.redis_event_ttl)))
        except (RedisError, OSError) as exc:
            log.warning("could not share a prompt's route", prompt_id=prompt_id, error=str(exc))

    async def locate(self, prompt_id: str) -> Backend | None:
        """Where a prompt went: known here, else (with replicas) as another relay routed it."""
        known = self.route_of(prompt_id)
        if known is not None or self.redis is None or not self.pooled:
            return known
        try:
            name = await self.redis.get(_route_key(prompt_id))
        except (RedisError, OSError):
            return None
        if not isinstance(name, str):
            return None
        self._remember(self.routes, prompt_id, name, _ROUTES_KEPT)
        return self.get(name)

    def source_of(self, prompt_id: str) -> Backend:
        """Where a prompt ran (the first backend when its route is not known here)."""
        return self.route_of(prompt_id) or self.first()

    def file_source(self, filename: str, subfolder: str, file_type: str) -> Backend | None:
        return self.get(self.files.get(file_key(filename, subfolder, file_type)))

    def found_file(self, filename: str, subfolder: str, file_type: str, backend: str) -> None:
        """A file this relay did not see made was found on ``backend``."""
        if not self.pooled:
            return
        self._remember(self.files, file_key(filename, subfolder, file_type), backend, _FILES_KEPT)

    def uploaded(self, answer: Any, backend: str) -> None:
        """An upload's answer from ``backend`` (``{"name", "subfolder", "type"}``): a later prompt
        naming it prefers the backends that have it."""
        if not self.pooled or not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            return
        subfolder = answer.get("subfolder") or ""
        name = f"{subfolder}/{answer['name']}" if subfolder else str(answer["name"])
        holders = self.inputs.get(name)
        if holders is None:
            holders = set()
            self._remember(self.inputs, name, holders, _FILES_KEPT)
        holders.add(backend)
        self._remember(self.files, file_key(answer["name"], subfolder, str(answer.get("type") or "input")),
                       backend, _FILES_KEPT)  # fmt: skip

    @staticmethod
    def _remember(table: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > limit:
            table.popitem(last=False)

    def note_queue(self, name: str, remaining: int) -> None:
        """What a backend's ``status`` frame said of its queue."""
        backend = self._backends.get(name)
        if backend is not None:
            backend.reported = remaining
            if self.pooled:
                self.metrics.backend_queue.labels(name).set(remaining)

    # Health ---------------------------------------------------------------------------------

    def on_lost(self, listener: Callable[[Backend, str], None]) -> None:
        """Call ``listener(backend, reason)`` when a backend's running prompts are to be given up."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """With several backends: look the names up, check every backend once, then keep watching."""
        if not self.pooled:
            return
        await self.resolve()
        await self.check()
        self._task = asyncio.create_task(self._watch(), name="relay-backends")

    async def _watch(self) -> None:
        interval = self.config.backend_check_interval
        while True:
            await asyncio.sleep(interval)
            try:
                if (
                    self._names
                    and time.monotonic() - self._resolved_at >= self.config.backend_resolve_interval
                ):
                    await self.resolve()
                await self.check()
            except Exception:  # the watch must go on whatever one pass met
                log.exception("backend check failed")

    async def check(self) -> None:
        """Ask every backend how it is, once."""
        await asyncio.gather(*(self._check(backend) for backend in self))
        self.metrics.comfyui_up.set(1 if self.up() else 0)  # with several: whether any is up

    async def _check(self, backend: Backend) -> None:
        started = time.monotonic()
        limit = max(0.5, min(self.config.ready_timeout, self.config.backend_check_interval * 2))
        problem: str | None = None
        refused = False
        remaining: int | None = None
        try:
            async with asyncio.timeout(limit):
                response = await backend.comfy.http.get("/prompt")
            body = orjson.loads(response.content) if response.status_code == 200 else None
            info = body.get("exec_info") if isinstance(body, dict) else None
            value = info.get("queue_remaining") if isinstance(info, dict) else None
            if isinstance(value, int):
                remaining = value
            else:
                problem = f"GET /prompt answered HTTP {response.status_code} without exec_info"
        except TimeoutError:
            problem = f"no answer in {limit:g} s"
        except (httpx.HTTPError, OSError, orjson.JSONDecodeError) as exc:
            refused = _refused(exc)
            problem = "connection refused" if refused else f"{exc.__class__.__name__}: {exc}".strip()
        now = time.monotonic()
        backend.checked = True
        if remaining is not None:
            backend.latency = now - started
            self._came_back(backend, remaining)
        else:
            self._went_away(backend, problem or "unknown", refused=refused, now=now)

    def _came_back(self, backend: Backend, remaining: int) -> None:
        was = backend.state
        backend.state = "up" if backend.listed else "draining"
        backend.reported = remaining
        backend.problem, backend.down_since, backend.refused, backend.lost_told = None, None, False, False
        if was == "down":
            log.info("backend answers again", backend=backend.name, queue_remaining=remaining)
        self._gauge(backend)

    def _went_away(self, backend: Backend, problem: str, *, refused: bool, now: float) -> None:
        if backend.state != "down":
            log.warning("backend down: no new prompts go there", backend=backend.name, problem=problem)
            backend.down_since = now
        backend.state, backend.problem, backend.refused = "down", problem, refused
        backend.reported = 0
        self._gauge(backend)
        away = now - (backend.down_since or now)
        if backend.lost_told or not (refused or away >= self.config.backend_lost_after):
            return
        backend.lost_told = True
        if refused:
            reason = (f"the ComfyUI backend {backend.name} went away while this prompt was on it "
                      "(it refuses connections: its queue is gone); its result is lost")  # fmt: skip
        else:
            reason = (f"the ComfyUI backend {backend.name} has not answered for {away:.0f} s; "
                      "this prompt's result is given up as lost")  # fmt: skip
        if backend.in_flight:
            self.metrics.backend_lost.labels(backend.name).inc()
            log.warning("prompts on a backend that went away are reported lost", backend=backend.name,
                        prompts=len(backend.in_flight), problem=problem)  # fmt: skip
        for listener in self._listeners:
            listener(backend, reason)

    def failed(self, backend: Backend, problem: str) -> None:
        """A request or socket to ``backend`` could not connect: take it out of routing now
        (the next check brings it back if it answers)."""
        if backend.state == "up" and self.pooled:
            self._went_away(backend, problem, refused=False, now=time.monotonic())

    def _count(self, backend: Backend) -> None:
        if self.pooled:
            self.metrics.backend_in_flight.labels(backend.name).set(len(backend.in_flight))

    def _gauge(self, backend: Backend) -> None:
        """Each backend's state in the metrics (with several: one alone is /readyz's comfyui)."""
        if not self.pooled:
            return
        for state in _STATES:
            self.metrics.backend_state.labels(backend.name, state).set(1 if backend.state == state else 0)
        self.metrics.backend_queue.labels(backend.name).set(backend.reported)
        self._count(backend)

    # Names ------------------------------------------------------------------------------------

    async def resolve(self) -> None:
        """Look each dns+ name up: new addresses join, vanished ones drain."""
        if not self._names:
            return
        self._resolved_at = time.monotonic()
        found: set[str] = set()
        for scheme, host, port in self._names:
            try:
                addresses = await self._lookup(host, port)
            except OSError as exc:
                # Keep what is known: a DNS hiccup must not drain every backend.
                log.warning("could not look up the backends' name", name=host, error=str(exc))
                return
            for address in addresses:
                shown = f"[{address}]" if ":" in address else address
                found.add(f"{scheme}://{shown}:{port}")
        known = {backend.url: backend for backend in self._backends.values() if backend.named}
        listed_too = {backend.url for backend in self._backends.values() if not backend.named}
        for url in sorted(found - known.keys() - listed_too):
            log.info("backend found", backend=self._add(url, named=True).name)
        for url, backend in known.items():
            listed = url in found
            if listed == backend.listed:
                continue
            backend.listed = listed
            if listed:
                log.info("backend listed again", backend=backend.name)
                if backend.state == "draining":
                    backend.state = "up"
            else:
                log.info("backend no longer listed: draining", backend=backend.name,
                         in_flight=len(backend.in_flight))  # fmt: skip
                if backend.state == "up":
                    backend.state = "draining"
                if not backend.in_flight:
                    self._retire(backend)
                    continue
            self._gauge(backend)

    def _retire(self, backend: Backend) -> None:
        if self._backends.pop(backend.name, None) is None:
            return
        log.info("backend forgotten: drained", backend=backend.name)
        self._retired.append(backend)  # closed at shutdown: a download may still be reading
        for state in _STATES:
            with contextlib.suppress(KeyError):
                self.metrics.backend_state.remove(backend.name, state)
        for gauge in (self.metrics.backend_queue, self.metrics.backend_in_flight):
            with contextlib.suppress(KeyError):
                gauge.remove(backend.name)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await stop(task)
        if self._sharing:  # routes still on their way to Redis: a moment, not forever
            await asyncio.wait(list(self._sharing), timeout=2.0)
        for backend in [*self._backends.values(), *self._retired]:
            await backend.aclose()


def _route_key(prompt_id: str) -> str:
    return f"relay:route:{prompt_id}"
