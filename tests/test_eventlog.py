"""Clients' event logs in a real Redis: resumable from any relay, trimmed, and honest when lost."""

from __future__ import annotations

from relay.eventlog import LogEntry, RedisLog
from tests.redis_server import RedisServer


def entries(first: int, last: int) -> list[LogEntry]:
    return [
        LogEntry(seq, f'{{"seq":{seq}}}', {"ko": f"k{seq}", "en": f"e{seq}"} if seq % 2 else None)
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
        await log.append(entries(1, 3), epoch)
        await log.append(entries(4, 5), epoch)
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
            await log.append(entries(start, start + 99), epoch)
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
