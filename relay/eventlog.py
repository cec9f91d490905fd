"""A client's event log in Redis: the resume ring that survives a relay restart, and that every
replica can read.

Each client's events go to one Redis Stream, ``relay:{client}:events``. An entry's id is the
event's ``seq`` (``<seq>-1``), so a resume position is a stream id and ``since`` is one
``XRANGE`` from there; the stream is trimmed to about ``ring_size`` entries (``MAXLEN ~``) and
expires ``ttl`` seconds after its last event. The stream's epoch is kept beside it: a client
whose stream (and epoch) Redis no longer has starts a new epoch, so a tab that resumes from the
old one is told it cannot (``relay.hello`` ``resumed: false``) instead of getting a hole.

:class:`RedisBacklog` is what a client's channel uses (``relay.fanout.Backlog``): it keeps the
channel's events in order, writing them in batches from a background task (publishing never
waits for Redis), and tells where a resuming tab left off. When Redis is away it holds what it
could not write (up to ``ring_size`` events) and writes it when Redis is back. Which relay
writes a client's events is decided elsewhere: one writer per client.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

__all__ = ["LogEntry", "RedisBacklog", "RedisLog"]

log = structlog.get_logger("relay.eventlog")

# How long a closing channel waits for its pending events to reach Redis.
_CLOSE_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class LogEntry:
    seq: int
    payload: str  # the stamped event in the channel's language
    # The same event in every language, when it has texts that differ by language.
    variants: Mapping[str, str] | None = None


def _seq(entry_id: Any) -> int:
    return int(str(entry_id).split("-")[0])


class RedisLog:
    """One client's stream. ``redis`` must decode responses (``decode_responses=True``)."""

    def __init__(self, redis: Redis, client_id: str, *, ring_size: int, ttl: float) -> None:
        self._redis = redis
        self.client_id = client_id
        self.ring_size = ring_size
        self.ttl_ms = int(ttl * 1000)
        self._stream = f"relay:{{{client_id}}}:events"  # one hash slot per client (cluster-safe)
        self._epoch = f"relay:{{{client_id}}}:epoch"

    async def open(self) -> tuple[str, int]:
        """The stream's epoch (a new one if Redis has none) and the last ``seq`` written (0 if none)."""
        fresh = secrets.token_hex(4)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._epoch, fresh, nx=True, px=self.ttl_ms)
        pipe.get(self._epoch)
        pipe.xrevrange(self._stream, count=1)
        created, epoch, last = await pipe.execute()
        if created:
            # A new epoch: whatever the stream holds belongs to no epoch a tab could know.
            await self._redis.delete(self._stream)
            return fresh, 0
        return str(epoch), _seq(last[0][0]) if last else 0

    async def append(self, entries: list[LogEntry], epoch: str) -> None:
        """Write events in order, in one round trip, under ``epoch``; the stream and its epoch
        live on for ``ttl``.

        Raises:
            ResponseError: the stream holds later events than these (another epoch's).
        """
        if not entries:
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._epoch, epoch, px=self.ttl_ms)
        for entry in entries:
            fields: dict[Any, Any] = {"p": entry.payload}
            if entry.variants is not None:
                fields["v"] = orjson.dumps(dict(entry.variants)).decode()
            pipe.xadd(self._stream, fields, id=f"{entry.seq}-1", maxlen=self.ring_size, approximate=True)
        pipe.pexpire(self._stream, self.ttl_ms)
        await pipe.execute()

    async def reset(self) -> None:
        """Drop the stream: what it holds belongs to an epoch that is not this one."""
        await self._redis.delete(self._stream)

    async def since(self, seq: int) -> list[LogEntry] | None:
        """The events after ``seq``; None when the stream no longer holds all of them."""
        rows: Any = await self._redis.xrange(self._stream, min=f"{seq + 1}-0", max="+")
        entries = [
            LogEntry(_seq(entry_id), fields["p"], orjson.loads(fields["v"]) if "v" in fields else None)
            for entry_id, fields in rows
        ]
        if entries:
            return entries if entries[0].seq == seq + 1 else None  # else trimmed past ``seq``
        return [] if await self.last_seq() == seq else None  # caught up, or a position it never had

    async def last_seq(self) -> int:
        last: Any = await self._redis.xrevrange(self._stream, count=1)
        return _seq(last[0][0]) if last else 0


class RedisBacklog:
    """A channel's events on their way to Redis, and read back for tabs that resume."""

    def __init__(self, log: RedisLog, *, limit: int) -> None:
        self.log = log
        self._pending: deque[LogEntry] = deque(maxlen=limit)
        self._writer: asyncio.Task[None] | None = None
        # The channel's epoch, written with its events (set when the channel takes it up).
        self.epoch = ""
        self.lost = 0  # events dropped because Redis stayed away longer than the buffer lasted

    async def open(self) -> tuple[str, int]:
        """The stream's epoch and last seq (see :meth:`RedisLog.open`)."""
        return await self.log.open()

    def keep(self, seq: int, payload: str, variants: Mapping[str, str] | None) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.lost += 1
        self._pending.append(LogEntry(seq, payload, variants))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=f"eventlog-{self.log.client_id}")

    async def _write(self) -> None:
        delay = 0.1
        while self._pending:
            batch = list(self._pending)
            try:
                await self.log.append(batch, self.epoch)
            except ResponseError as exc:
                # The stream has later ids: it was another epoch's (Redis kept it while this
                # relay could not read it at start). This channel owns the client: start over.
                log.warning("the client's stream in Redis was another epoch's; replaced",
                            client_id=self.log.client_id, error=str(exc))  # fmt: skip
                await self.log.reset()
                continue
            except (RedisError, OSError) as exc:
                log.warning("events not written to Redis; retrying", client_id=self.log.client_id,
                            pending=len(self._pending), error=str(exc))  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            for _ in batch:  # the ones written; newer ones stay for the next round
                if self._pending and self._pending[0].seq <= batch[-1].seq:
                    self._pending.popleft()
            delay = 0.1

    async def since(self, seq: int) -> list[tuple[int, str, Mapping[str, str] | None]] | None:
        """Events after ``seq`` from Redis; None when Redis lacks some, or cannot be asked."""
        try:
            entries = await self.log.since(seq)
        except (RedisError, OSError) as exc:
            log.warning("could not read events from Redis", client_id=self.log.client_id, error=str(exc))
            return None
        return None if entries is None else [(e.seq, e.payload, e.variants) for e in entries]

    async def close(self) -> None:
        """Write what is pending (for up to a few seconds), then stop."""
        writer = self._writer
        if writer is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_WAIT):
                await asyncio.shield(writer)
        except TimeoutError:
            log.warning("events left unwritten at shutdown", client_id=self.log.client_id,
                        pending=len(self._pending))  # fmt: skip
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
