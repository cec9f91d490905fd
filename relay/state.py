"""What the relay's lifespan opens and closes, typed, as its endpoints read it.

:func:`open_relay` creates every long-lived resource (the HTTP clients to ComfyUI, the client
sessions with their reaper, the ETA keeper) and closes them in order when the app stops. The
lifespan yields them as :class:`Lifespan`; Starlette hands each request and socket a copy,
read as ``request.state["relay"]`` by the endpoints (typed: they take ``Request[Lifespan]``)
and as ``request.state["proxy"]`` by the proxy, which sees only what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import signal
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypedDict

import structlog
from redis.asyncio import Redis

from relay.backends import Backends
from relay.comfy import ComfyClient
from relay.config import RelayConfig
from relay.delivery import Deliveries
from relay.errors import ShuttingDown
from relay.eta import Durations, durations_file
from relay.health import Readiness
from relay.metrics import Metrics
from relay.observers import EtaKeeper, MetricsObserver, StepLog
from relay.proxy import ProxyContext
from relay.sessions import Sessions
from relay.webhooks import Webhooks
from relay.workflows import Library

if TYPE_CHECKING:
    from relay.storage import Storage

log = structlog.get_logger("relay.state")

__all__ = ["Lifespan", "RelayState", "open_relay"]


class RelayState:
    """The running relay's resources, and the count of browser sockets it holds."""

    def __init__(
        self,
        *,
        config: RelayConfig,
        metrics: Metrics,
        workflows: Library,
        backends: Backends,
        durations: Durations,
        redis: Redis | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.workflows = workflows
        self.backends = backends
        self.durations = durations
        self.eta = EtaKeeper(durations, redis)
        self.redis = redis
        self.storage: Storage | None = None
        if config.s3_bucket:
            # The S3 client loads only where storage is configured.
            from relay.storage import Storage  # noqa: PLC0415

            self.storage = Storage(config, backends, metrics)
        self.webhooks = Webhooks(config, metrics) if config.webhook_secret else None
        storing = frozenset(workflow.name for workflow in workflows if workflow.store)
        self.deliveries = Deliveries(config, self.storage, self.webhooks, storing_workflows=storing)
        self.sessions = Sessions(
            config,
            backends,
            durations,
            metrics,
            observers=(MetricsObserver(metrics), StepLog(), self.eta),
            learn=self.eta.learned,
            redis=redis,
            deliveries=self.deliveries,
        )
        # Without several backends, /readyz asks the one; with them, their watch says.
        self.readiness = (
            None
            if backends.pooled
            else Readiness(backends.first().comfy, metrics, timeout=config.ready_timeout)
        )
        # Browser sockets open now (RELAY_MAX_CONNECTIONS).
        self.connections = 0
        self.closing = False

    @property
    def comfy(self) -> ComfyClient:
        """The client of the first backend that is up (the only one, without several)."""
        return self.backends.first().comfy

    async def close_clients(self) -> None:
        """Close every browser socket (shutdown); called before the server drops connections."""
        self.closing = True
        going = ShuttingDown("relay shutting down")
        for session in self.sessions:
            for subscriber in list(session.channel.subscribers):
                await subscriber.close(going.close_code, going.message)


class Lifespan(TypedDict):
    relay: RelayState
    proxy: ProxyContext


@contextlib.asynccontextmanager
async def open_relay(config: RelayConfig, metrics: Metrics, workflows: Library) -> AsyncIterator[Lifespan]:
    """Open the relay's resources for the duration of the block; close them in order after it."""
    redis = _redis(config.redis_url) if config.redis_url else None
    backends = Backends(config, metrics, redis=redis)
    state = RelayState(
        config=config,
        metrics=metrics,
        workflows=workflows,
        backends=backends,
        durations=Durations(durations_file(config.eta_file)),
        redis=redis,
    )
    metrics.watch(state.sessions.live_state)
    await state.eta.share()  # what the other relays learned, before the first estimate
    await backends.start()  # with several: look names up, check each once, keep watching
    proxy = ProxyContext(
        backends=backends,
        max_upload_bytes=config.max_upload_bytes,
        queue_changed=state.sessions.settle_removed,
    )
    state.sessions.start()
    dumping = _dump_tasks_on_signal()
    collector = (
        asyncio.create_task(_collect_garbage(config.gc_interval), name="relay-gc")
        if config.gc_interval
        else None
    )
    try:
        yield {"relay": state, "proxy": proxy}
    finally:
        if collector is not None:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
        await state.close_clients()
        if state.storage is not None:
            await state.storage.close()  # files cut off are reported failed before sessions close
        await state.sessions.close()
        if state.webhooks is not None:
            await state.webhooks.close()
        await state.eta.close()  # shares what it learned through Redis: before Redis closes
        await backends.aclose()  # routes still on their way to Redis too
        if state.redis is not None:
            await state.redis.aclose()
        if dumping:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)


def _dump_tasks_on_signal() -> bool:
    """``kill -USR1 <pid>`` logs where every task of the relay is waiting (a pod that does not
    stop, or does not answer); only where the relay owns the process's main thread."""
    loop = asyncio.get_running_loop()

    def dump() -> None:
        for task in asyncio.all_tasks(loop):
            stack = io.StringIO()
            task.print_stack(limit=12, file=stack)
            log.warning("task", name=task.get_name(), stack=stack.getvalue())

    try:
        loop.add_signal_handler(signal.SIGUSR1, dump)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


async def _collect_garbage(interval: float) -> None:
    """A full pass of the cycle collector every ``interval`` seconds. The relay process makes
    the collector's own full passes rare (``relay.server.tune_gc``) for fan-out latency, and
    every closed connection leaves a few cycles behind (the HTTP and WebSocket libraries'
    objects refer to each other): without this pass they would pile up until that rare full
    pass (bench/soak.py: about 12 MB per 30 s of load). Each pass is logged at debug level
    with what it found and how long it took."""
    while True:
        await asyncio.sleep(interval)
        started = time.perf_counter()
        found = gc.collect()
        log.debug("collected garbage", objects=found, ms=round((time.perf_counter() - started) * 1000, 1))


def _redis(url: str) -> Redis:
    """The Redis client: replies as text, and never a wait without end on a Redis that hangs."""
    return Redis.from_url(
        url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=3.0, health_check_interval=30
    )
