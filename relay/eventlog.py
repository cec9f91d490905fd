"""A client's event log in Redis: the resume ring that survives a relay restart, and that every
replica reads.

Each client's events go to one Redis Stream, ``relay:{client}:events``. An entry's id is the
event's ``seq`` (``<seq>-1``), so a resume position is a stream id and ``since`` is one
``XRANGE`` from there; the stream is trimmed to about ``ring_size`` entries (``MAXLEN ~``) and
expires ``ttl`` seconds after its last event. The stream's epoch is kept beside it: a client
whose stream (and epoch) Redis no longer has starts a new epoch, so a tab that resumes from the
old one is told it cannot (``relay.hello`` ``resumed: false``) instead of getting a hole.

Beside the stream, ``relay:{client}:prompts`` holds the client's prompts in flight (what a relay
taking over needs to go on translating them), and ``relay:lease:{client}`` says which relay
writes (``relay.lease``). One server-side script writes a batch: it checks that the writer
still holds the lease (taking it if Redis lost it, as after a Redis restart), appends the
events, updates the prompts, and announces the events on :data:`NOTIFY` to the other
replicas, which deliver them from the notice without reading the stream. A writer that lost
the lease writes nothing. All of a client's keys share one hash tag, so this holds on a Redis
Cluster too.

:class:`RedisBacklog` is what a client's channel uses while this relay writes its events
(``relay.fanout.Backlog``): it writes them in batches from a background task and hands each to
the channel's tabs once Redis has it, so that no tab holds an event a relay taking over could
not find. When Redis is away it hands them over at once (the tabs here keep going), holds what
it could not write (up to ``ring_size`` events) and writes it when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from relay.fanout import Entry

__all__ = ["NOTIFY", "Notice", "RedisBacklog", "RedisLog", "parse_notice"]

log = structlog.get_logger("relay.eventlog")

# The pub/sub channel on which writers announce each batch: "<client> <epoch> <first> <last>",
# then each event (see :func:`parse_notice`).
NOTIFY = "relay:notify"

# How long a closing channel waits for its pending events to reach Redis.
_CLOSE_WAIT = 5.0
# Most events written in one round trip.
_BATCH = 256
_SEP = "\x1f"

_APPEND = """
local held = redis.call('get', KEYS[3])
if not held then
  redis.call('set', KEYS[3], ARGV[1], 'px', ARGV[2])
elseif held ~= ARGV[1] then
  return -1
end
local i = 11
local first, last = '', ''
local told = {}
for _ = 1, tonumber(ARGV[8]) do
  local p, v, k = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local fields = {'p', p}
  if v ~= '' then fields[#fields + 1] = 'v'; fields[#fields + 1] = v end
  if k ~= '' then fields[#fields + 1] = 'k'; fields[#fields + 1] = k end
  redis.call('xadd', KEYS[1], 'maxlen', '~', ARGV[5], ARGV[i], unpack(fields))
  last = string.sub(ARGV[i], 1, -3)
  if first == '' then first = last end
  told[#told + 1] = string.len(p) .. ' ' .. string.len(v) .. ' ' .. string.len(k) .. '\\n' .. p .. v .. k
  i = i + 4
end
local records = tonumber(ARGV[9])
for _ = 1, records do
  if ARGV[i + 1] == '' then
    redis.call('hdel', KEYS[4], ARGV[i])
  else
    redis.call('hset', KEYS[4], ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
if ARGV[10] == '1' then
  redis.call('set', KEYS[2], ARGV[3], 'px', ARGV[4])
  redis.call('pexpire', KEYS[1], ARGV[4])
end
if last ~= '' then
  local head = ARGV[7] .. ' ' .. ARGV[3] .. ' ' .. first .. ' ' .. last .. '\\n'
  redis.call('publish', ARGV[6], head .. table.concat(told))
end
if records > 0 then
  redis.call('pexpire', KEYS[4], ARGV[4])
  return redis.call('hlen', KEYS[4])
end
return -2
"""


def _seq(entry_id: Any) -> int:
    return int(str(entry_id).split("-")[0])


@dataclass(frozen=True, slots=True)
class Notice:
    """A writer's announcement on :data:`NOTIFY`: the client's stream grew from ``first`` to
    ``last`` under ``epoch``, with these events (what the stream holds, without a read)."""

    client_id: str
    epoch: str
    first: int
    last: int
    entries: list[Entry]


def parse_notice(data: bytes) -> Notice | None:
    """A :data:`NOTIFY` message; None when malformed."""
    head, sep, body = data.partition(b"\n")
    fields = head.decode(errors="replace").split(" ")
    if not sep or len(fields) != 4 or not fields[2].isdigit() or not fields[3].isdigit():
        return None
    client_id, epoch, first, last = fields[0], fields[1], int(fields[2]), int(fields[3])
    entries: list[Entry] = []
    at, seq = 0, first
    try:
        while at < len(body):
            end = body.index(b"\n", at)
            lengths = [int(size) for size in body[at:end].split(b" ")]
            at = end + 1
            parts: list[bytes] = []
            for length in lengths:
                parts.append(body[at : at + length])
                at += length
            payload, variants, key = parts  # a size too many or too few: ValueError
            entries.append(
                Entry(
                    seq,
                    payload.decode(),
                    tuple(key.decode().split(_SEP)) if key else None,
                    variants=orjson.loads(variants) if variants else None,
                )
            )
            seq += 1
    except (ValueError, IndexError, orjson.JSONDecodeError):
        return None
    if seq != last + 1:
        return None
    return Notice(client_id, epoch, first, last, entries)


def _key_text(key: tuple[Any, ...] | None) -> str:
    return "" if key is None else _SEP.join("" if part is None else str(part) for part in key)


def _entry(entry_id: Any, fields: Mapping[str, str]) -> Entry:
    variants = orjson.loads(fields["v"]) if "v" in fields else None
    key = tuple(fields["k"].split(_SEP)) if fields.get("k") else None
    return Entry(_seq(entry_id), fields["p"], key, variants=variants)


class RedisLog:
    """One client's keys. ``redis`` must decode responses (``decode_responses=True``)."""

    def __init__(
        self, redis: Redis, client_id: str, *, ring_size: int, ttl: float, lease_ttl: float = 5.0
    ) -> None:
        self._redis = redis
        self.client_id = client_id
        self.ring_size = ring_size
        self.ttl_ms = int(ttl * 1000)
        self.lease_ms = int(lease_ttl * 1000)
        self._stream = f"relay:{{{client_id}}}:events"  # one hash slot per client (cluster-safe)
        self._epoch = f"relay:{{{client_id}}}:epoch"
        self._prompts = f"relay:{{{client_id}}}:prompts"
        self._lease = f"relay:lease:{{{client_id}}}"  # relay.lease.Lease's key for this client
        self._handoff = f"relay:{{{client_id}}}:handoff"
        self._append: Any = redis.register_script(_APPEND)
        # When the epoch and the stream's expiry were last written (not with every batch).
        self._refreshed = -1e9
        self._refreshed_epoch = ""

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

    async def position(self) -> tuple[str | None, int]:
        """The stream's epoch (None when Redis has none) and last ``seq``, changing nothing."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._epoch)
        pipe.xrevrange(self._stream, count=1)
        epoch, last = await pipe.execute()
        return epoch, _seq(last[0][0]) if last else 0

    async def append(
        self,
        entries: list[Entry],
        epoch: str,
        *,
        token: str,
        records: Mapping[str, str | None] | None = None,
    ) -> int | None:
        """Write events in order, and prompt records (None deletes one), in one step, as the
        lease holder ``token``, and announce them on :data:`NOTIFY`. Returns how many prompts
        are in flight (-2: no record was written, so not counted), or None when the lease is
        another's (nothing was written).

        Raises:
            ResponseError: the stream holds later events than these (another epoch's).
        """
        records = records or {}
        now = time.monotonic()
        refresh = now - self._refreshed > min(60.0, self.ttl_ms / 10_000) or epoch != self._refreshed_epoch
        args: list[Any] = [token, self.lease_ms, epoch, self.ttl_ms, self.ring_size, NOTIFY,
                           self.client_id, len(entries), len(records), int(refresh)]  # fmt: skip
        for entry in entries:
            variants = entry.all_languages()
            args += [
                f"{entry.seq}-1",
                entry.payload,
                orjson.dumps(variants).decode() if variants is not None else "",
                _key_text(entry.key),
            ]
        for prompt_id, record in records.items():
            args += [prompt_id, record or ""]
        keys = [self._stream, self._epoch, self._lease, self._prompts]
        in_flight = int(await self._append(keys=keys, args=args))
        if in_flight == -1:
            return None
        if refresh:
            self._refreshed, self._refreshed_epoch = now, epoch
        return in_flight

    async def reset(self) -> None:
        """Drop the stream: what it holds belongs to an epoch that is not this one."""
        await self._redis.delete(self._stream)

    async def since(self, seq: int, *, count: int | None = None) -> list[Entry] | None:
        """The events after ``seq`` (the first ``count``); None when the stream no longer holds
        all of them."""
        rows: Any = await self._redis.xrange(self._stream, min=f"{seq + 1}-0", max="+", count=count)
        entries = [_entry(entry_id, fields) for entry_id, fields in rows]
        if entries:
            return entries if entries[0].seq == seq + 1 else None  # else trimmed past ``seq``
        return [] if await self.last_seq() == seq else None  # caught up, or a position it never had

    async def last_seq(self) -> int:
        last: Any = await self._redis.xrevrange(self._stream, count=1)
        return _seq(last[0][0]) if last else 0

    async def records(self) -> dict[str, str]:
        """The client's prompts in flight, as their writer left them."""
        records: Any = await self._redis.hgetall(self._prompts)
        return dict(records)

    async def give_handoff(self, sid: str) -> None:
        """A holder leaving cleanly names the ComfyUI client id its socket used, free again."""
        await self._redis.set(self._handoff, sid, px=self.lease_ms * 4)

    async def take_handoff(self) -> str | None:
        """The id the last holder left (once), for the next socket to register under."""
        sid = await self._redis.getdel(self._handoff)
        return str(sid) if sid else None


class RedisBacklog:
    """A channel's events on their way to Redis, handed to the channel's tabs once written."""

    def __init__(
        self,
        log: RedisLog,
        *,
        limit: int,
        deliver: Callable[[Entry], None],
        token: Callable[[], str],
        lost_lease: Callable[[], None],
        in_flight: Callable[[str, bool], Awaitable[None]] | None = None,
    ) -> None:
        self.log = log
        self._deliver = deliver
        self._token = token
        self._lost_lease = lost_lease
        self._mark_in_flight = in_flight
        self._pending: deque[Entry] = deque(maxlen=limit)
        # Prompt records to write with the next batch (None: delete).
        self._records: dict[str, str | None] = {}
        self._writer: asyncio.Task[None] | None = None
        # The channel's epoch, written with its events (set when the channel takes it up).
        self.epoch = ""
        self.lost = 0  # events dropped because Redis stayed away longer than the buffer lasted
        self.in_flight = 0  # prompts in flight, as of the last write
        self.degraded = False  # Redis could not be written: events went to the tabs unwritten
        self._delivered_upto = 0  # events handed over without being written (Redis away)
        self.stopped = False
        self.written_upto = 0  # the last seq Redis has
        # Set (and replaced) after every attempt to write: what :meth:`flushed` waits on.
        self._progress = asyncio.Event()

    async def open(self) -> tuple[str, int]:
        """The stream's epoch and last seq (see :meth:`RedisLog.open`)."""
        return await self.log.open()

    def keep(self, entry: Entry) -> None:
        if self.stopped:
            return
        if len(self._pending) == self._pending.maxlen:
            self.lost += 1
        self._pending.append(entry)
        self._wake()

    def record(self, prompt_id: str, record: str | None) -> None:
        """A prompt's record changed (None: it ended); written with the next batch."""
        if self.stopped:
            return
        self._records[prompt_id] = record
        self._wake()

    async def flushed(self, seq: int) -> bool:
        """Until Redis has the events up to ``seq``, and the prompt records written with them;
        False when it cannot have them now (Redis away, or another relay holds the client)."""
        while self.written_upto < seq and not self.stopped and not self.degraded:
            if not self._pending and not self._records:
                break  # nothing on its way: written, or never kept here
            await self._progress.wait()
        return self.written_upto >= seq

    def _attempted(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _wake(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=f"eventlog-{self.log.client_id}")

    async def _write(self) -> None:
        try:
            await self._write_pending()
        finally:
            self._attempted()

    async def _write_pending(self) -> None:
        delay = 0.1
        while (self._pending or self._records) and not self.stopped:
            batch = list(self._pending)[:_BATCH]
            # Records go with the batch that holds the events they follow from.
            records: dict[str, str | None] = {}
            if len(batch) == len(self._pending):
                records, self._records = self._records, {}
            try:
                if self.in_flight == 0 and any(records.values()):
                    # Listed before the record exists, so a relay that dies right after leaves
                    # it findable (the list is checked only for clients nobody holds).
                    await self._mark(True)
                in_flight = await self.log.append(batch, self.epoch, token=self._token(), records=records)
            except ResponseError as exc:
                self._records = records | self._records
                # The stream has later ids: it was another epoch's (Redis kept it while this
                # relay could not read it at start). This channel owns the client: start over.
                log.warning("the client's stream in Redis was another epoch's; replaced",
                            client_id=self.log.client_id, error=str(exc))  # fmt: skip
                await self.log.reset()
                continue
            except (RedisError, OSError) as exc:
                self._records = records | self._records
                if not self.degraded:
                    log.warning("events not written to Redis; retrying", client_id=self.log.client_id,
                                pending=len(self._pending), error=str(exc))  # fmt: skip
                self.degraded = True
                self._attempted()
                # The tabs here go on: what they get now is written once Redis is back.
                for entry in self._pending:
                    if entry.seq > self._delivered_upto:
                        self._deliver(entry)
                        self._delivered_upto = entry.seq
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            if in_flight is None:
                # Another relay holds the client now: it writes, and these are not ours to say.
                log.warning("the client's lease is another relay's; events not written",
                            client_id=self.log.client_id, dropped=len(self._pending))  # fmt: skip
                self._pending.clear()
                self._records.clear()
                self.stopped = True
                self._lost_lease()
                return
            if self.degraded:
                log.info("events written to Redis again", client_id=self.log.client_id)
                self.degraded = False
            was = self.in_flight
            if in_flight != -2:
                self.in_flight = in_flight
            last = batch[-1].seq if batch else 0
            self.written_upto = max(self.written_upto, last)
            while self._pending and self._pending[0].seq <= last:
                self._deliver(self._pending.popleft())
            self._attempted()
            if was > 0 and self.in_flight == 0:
                with contextlib.suppress(RedisError, OSError):
                    await self._mark(False)
            delay = 0.1

    async def _mark(self, in_flight: bool) -> None:
        if self._mark_in_flight is not None:
            await self._mark_in_flight(self.log.client_id, in_flight)

    async def since(self, seq: int) -> list[Entry] | None:
        """Events after ``seq`` from Redis; None when Redis lacks some, or cannot be asked."""
        try:
            return await self.log.since(seq)
        except (RedisError, OSError) as exc:
            log.warning("could not read events from Redis", client_id=self.log.client_id, error=str(exc))
            return None

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
