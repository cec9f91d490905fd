"""Clients' event logs in a real Redis: resumable from any relay, trimmed, and honest when lost."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from relay.eventlog import RedisLog, parse_notice
from relay.fanout import Entry
from tests.redis_server import RedisServer


def entries(first: int, last: int) -> list[Entry]:
    return [
        Entry(seq, f'{{"seq":{seq}}}', variants={"ko": f"k{seq}", "en": f"e{seq}"} if seq % 2 else None)
        for seq in range(first, last + 1)
    ]


async def test_one_relay_writes_another_resumes(redis_server: RedisServer) -> None:
    """What one relay appended, another (a second replica, or the first after a restart) reads
    back from any position, in order, with the same epoch; a position past the end is refused."""
    writer, reader = redis_server.client(), redis_server.client()
    try:
        log = RedisLog(writer, "alice", ring_size=100, ttl=60)
        epoch, last = await log.open()
        assert last == 0
        await log.append(entries(1, 3), epoch, token="relay-1:1")
        await log.append(entries(4, 5), epoch, token="relay-1:1")
        other = RedisLog(reader, "alice", ring_size=100, ttl=60)
        assert await other.open() == (epoch, 5)
        assert [e.seq for e in await other.since(2) or []] == [3, 4, 5]
        assert await other.since(0) == entries(1, 5)
        assert await other.since(5) == []
        assert await other.since(9) is None
        assert await RedisLog(reader, "bob", ring_size=100, ttl=60).since(0) == []  # nothing of alice's
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_a_trimmed_or_lost_log_is_not_resumed(redis_server: RedisServer) -> None:
    """Past the ring's size old events are trimmed: resuming from before them is refused, not
    answered with a hole. When Redis lost everything, the epoch changes."""
    client = redis_server.client()
    try:
        log = RedisLog(client, "carol", ring_size=10, ttl=60)
        epoch, _ = await log.open()
        for start in range(1, 2000, 100):
            await log.append(entries(start, start + 99), epoch, token="relay-1:1")
        assert await log.since(3) is None
        recent = await log.since(1990)
        assert [e.seq for e in recent or []] == list(range(1991, 2001))
        await redis_server.stop()
        await redis_server.start()  # an empty Redis: nothing was saved
        await client.aclose()
        client = redis_server.client()
        again = RedisLog(client, "carol", ring_size=10, ttl=60)
        new_epoch, last = await again.open()
        assert (new_epoch != epoch, last) == (True, 0)
        assert await again.since(1990) is None
    finally:
        await client.aclose()


async def test_only_the_lease_holder_writes_and_records_travel_with_events(redis_server: RedisServer) -> None:
    """A relay whose lease passed to another writes nothing; the holder's events, its prompt
    records and the notice to the other relays go together; Redis forgetting the lease (a
    restart) lets its holder take it back on its next write."""
    client, listener = redis_server.client(), Redis.from_url(redis_server.url)  # notices are bytes
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe("relay:notify")
        log = RedisLog(client, "dora", ring_size=100, ttl=60, lease_ttl=30)
        epoch, _ = await log.open()
        # Nobody holds the lease: the first writer takes it.
        assert await log.append(entries(1, 2), epoch, token="relay-1:1", records={"p1": '{"run":1}'}) == 1
        assert await client.get("relay:lease:{dora}") == "relay-1:1"
        assert await log.append(entries(3, 3), epoch, token="relay-2:2", records={"p1": None}) is None
        assert await log.last_seq() == 2
        assert await log.records() == {"p1": '{"run":1}'}
        async with asyncio.timeout(10):
            while (notice := await pubsub.get_message(timeout=1)) is None:  # skips the subscribe reply
                pass
        told = parse_notice(notice["data"])
        assert told is not None
        assert (told.client_id, told.epoch, told.first, told.last) == ("dora", epoch, 1, 2)
        assert told.entries == entries(1, 2)  # the events themselves: followers need not read them
        assert [e.variants for e in told.entries] == [e.variants for e in entries(1, 2)]
        assert await log.append(entries(3, 3), epoch, token="relay-1:1", records={"p1": None}) == 0
        assert await log.records() == {}
        await client.delete("relay:lease:{dora}")
        assert await log.append(entries(4, 4), epoch, token="relay-1:1") == -2  # no record: not counted
        assert [e.seq for e in await log.since(0) or []] == [1, 2, 3, 4]
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await client.aclose()
