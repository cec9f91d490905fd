"""What the relay does with published events besides delivering them: metrics, the step log,
and keeping what the ETA learned.

Each observer sees every event a client session publishes, after the clients have it, and
must not block: none of them awaits, and the one that writes a file does so in a thread,
batched, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.eta import Durations
from relay.events import Detached, Done, Event, Queued, Started, Step, Upstream
from relay.metrics import Metrics, workflow_label
from relay.translator import StepTiming

__all__ = ["DURATIONS_KEY", "EtaKeeper", "MetricsObserver", "Observer", "StepLog"]

log = structlog.get_logger("relay.session")

# The step durations every relay learned (pipeline<US>node -> JSON), with Redis.
DURATIONS_KEY = "relay:durations"


class Observer(Protocol):
    def published(self, client_id: str, event: Event) -> None:
        """An event went out to ``client_id``'s subscribers. Must not block."""


class MetricsObserver:
    """Counts events, prompts and steps by workflow, and upstream failures."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # The workflow label of each prompt in flight, by (client id, prompt id).
        self._workflows: dict[tuple[str, str], str] = {}

    def published(self, client_id: str, event: Event) -> None:
        metrics = self.metrics
        metrics.event(event.type)
        if isinstance(event, Queued):
            self._workflows[client_id, event.prompt_id] = workflow_label(event.workflow)
        elif isinstance(event, Step):
            if event.state == "done" and event.duration is not None:
                workflow = self._workflows.get((client_id, event.prompt_id), workflow_label(None))
                metrics.step_seconds.labels(workflow).observe(event.duration)
        elif isinstance(event, Done):
            workflow = self._workflows.pop((client_id, event.prompt_id), workflow_label(None))
            metrics.prompts.labels(event.status, workflow).inc()
            if event.status != "cancelled":
                metrics.prompt_seconds.labels(workflow).observe(event.elapsed)
        elif isinstance(event, Upstream):
            if event.state == "down":
                metrics.upstream_failures.inc()
        elif isinstance(event, Detached):
            metrics.detached.inc()


class StepLog:
    """One log line per step started (``[3/16] face detection (elapsed 2.8 s)``) and per prompt
    queued, started and ended; a running step announced again for its activity ("loading")
    is logged at debug level."""

    def __init__(self) -> None:
        # Steps already logged as started, by (client id, prompt id); forgotten at relay.done.
        self._started: dict[tuple[str, str], set[str]] = {}

    def published(self, client_id: str, event: Event) -> None:
        if isinstance(event, Step):
            started = self._started.setdefault((client_id, event.prompt_id), set())
            if event.state == "running" and event.node in started:
                log.debug("step activity", client_id=client_id, prompt_id=event.prompt_id,
                          node=event.node, activity=event.activity)  # fmt: skip
            elif event.state == "running":
                started.add(event.node)
                width = len(str(event.total))
                position = f"[{event.index:>{width}}/{event.total}]"
                log.info(
                    f"{position} {event.name} (elapsed {event.elapsed:.1f} s)",
                    client_id=client_id,
                    prompt_id=event.prompt_id,
                    node=event.node,
                )
            elif event.state == "error":
                log.warning("step failed", client_id=client_id, prompt_id=event.prompt_id,
                            node=event.node, name=event.name)  # fmt: skip
        elif isinstance(event, Queued):
            log.info("prompt queued", client_id=client_id, prompt_id=event.prompt_id,
                     number=event.number, total=event.total)  # fmt: skip
        elif isinstance(event, Started):
            log.info("prompt started", client_id=client_id, prompt_id=event.prompt_id, total=event.total,
                     cached=len(event.cached), queued_for=event.queued_for)  # fmt: skip
        elif isinstance(event, Done):
            self._started.pop((client_id, event.prompt_id), None)
            log.info("prompt ended", client_id=client_id, prompt_id=event.prompt_id, status=event.status,
                     elapsed=event.elapsed, recovered=event.recovered)  # fmt: skip


class EtaKeeper:
    """Learns step durations as runs report them and keeps them in the ETA file.

    A save is asked for at every ``relay.done``; saves run one at a time in a worker thread,
    and every ask that comes while one runs is served by a single save after it, so a burst of
    finished prompts costs one or two writes, none of them on the event loop.
    """

    def __init__(self, durations: Durations, redis: Redis | None = None) -> None:
        self.durations = durations
        # With several relays, what each learns is shared in Redis (one hash of every step).
        self.redis = redis
        self._wanted = False
        self._saver: asyncio.Task[None] | None = None
        self.saves = 0  # files written (for tests and the curious)

    async def share(self) -> None:
        """Send what was learned here to Redis and take what the other relays learned."""
        if self.redis is None:
            return
        changed = self.durations.take_changed()
        try:
            pipe = self.redis.pipeline(transaction=False)
            if changed:
                fields: dict[Any, Any] = dict(changed)
                pipe.hset(DURATIONS_KEY, mapping=fields)
            pipe.hgetall(DURATIONS_KEY)
            shared = (await pipe.execute())[-1]
        except (RedisError, OSError) as exc:
            log.warning("step durations not shared through Redis", error=str(exc))
            for entry in changed:  # shared at the next chance
                key, _, node = entry.partition("\x1f")
                self.durations.record_changed(key, node)
            return
        self.durations.merge(shared, skip=changed)

    def learned(self, timing: StepTiming) -> None:
        self.durations.record(timing.timing_key, timing.node, timing.seconds, timing.iterations)

    def published(self, client_id: str, event: Event) -> None:
        if isinstance(event, Done) and (self.durations.path is not None or self.redis is not None):
            self._wanted = True
            if self._saver is None or self._saver.done():
                self._saver = asyncio.create_task(self._save_while_wanted(), name="relay-eta-save")

    async def _save_while_wanted(self) -> None:
        while self._wanted:
            self._wanted = False
            await self.share()
            data = self.durations.export()  # copied here, on the loop, where learning happens
            if data is not None and await asyncio.to_thread(self.durations.write, data):
                self.saves += 1

    async def close(self) -> None:
        """Finish a save under way, then write whatever is left."""
        if self._saver is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
        self._wanted = True
        await self._save_while_wanted()
