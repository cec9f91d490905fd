"""The upstream lease in a real Redis: one holder at a time, taken over when its holder stops
renewing, and never extended or deleted by a holder that lost it."""

from __future__ import annotations

import asyncio

from relay.lease import Lease
from tests.redis_server import RedisServer


async def test_one_holder_then_a_takeover_with_a_higher_fence(redis_server: RedisServer) -> None:
    first_client, second_client = redis_server.client(), redis_server.client()
    try:
        first = Lease(first_client, "client-a", ttl=0.3, holder="relay-1")
        second = Lease(second_client, "client-a", ttl=0.3, holder="relay-2")
        fence = await first.acquire()
        assert fence is not None
        assert await second.acquire() is None  # held
        assert await first.renew() is True
        assert await first.current() == ("relay-1", fence)
        assert await Lease(second_client, "client-b", ttl=0.3).acquire() is not None  # names are apart
        # relay-1 stops renewing (it died): the lease frees itself and relay-2 takes it.
        async with asyncio.timeout(10):
            while (taken := await second.acquire()) is None:
                await asyncio.sleep(0.05)
        assert taken > fence
        assert await second.current() == ("relay-2", taken)
        # relay-1 wakes up: it can neither extend nor delete relay-2's lease.
        assert await first.renew() is False
        assert await first.release() is False
        assert await second.current() == ("relay-2", taken)
        assert await second.release() is True
        assert await second.current() is None
    finally:
        await first_client.aclose()
        await second_client.aclose()


async def test_a_released_lease_is_free_at_once(redis_server: RedisServer) -> None:
    client = redis_server.client()
    try:
        first = Lease(client, "client-c", ttl=30)
        assert await first.acquire() is not None
        assert await first.release() is True
        assert await Lease(client, "client-c", ttl=30).acquire() is not None  # no waiting out the ttl
    finally:
        await client.aclose()
