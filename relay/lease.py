"""A lease in Redis: one holder at a time for a name, across relays, with a fencing number.

ComfyUI orphans both sockets when two register one client id (PROTOCOL.md section 2), so across
replicas exactly one relay may hold a client's upstream socket. The holder takes the lease
with ``SET NX PX`` and renews it well before it runs out; a relay that dies stops renewing,
and the lease frees itself after ``ttl`` for another to take. Renewing and releasing check the
holder's token in one server-side step (a Lua script), so a holder whose lease already passed
to another can neither extend nor delete the new holder's. Every acquisition gets a number
from a counter that only grows: whoever acts on the holder's behalf can refuse a lower one
(fencing), should a paused holder wake up believing it still holds the lease.
"""

from __future__ import annotations

import secrets
from typing import Any

from redis.asyncio import Redis

__all__ = ["Lease"]

# Extend the lease if it is still ours; take it back if nobody has it (Redis lost it).
_RENEW = """
local held = redis.call('get', KEYS[1])
if held == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
elseif not held then
  redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
  return 1
end
return 0
"""

# Delete the lease only if it is still ours.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Lease:
    """The lease on ``name`` as seen by one would-be holder (``redis`` decodes responses)."""

    def __init__(self, redis: Redis, name: str, *, ttl: float, holder: str = "") -> None:
        self._redis = redis
        self.name = name
        self.ttl_ms = int(ttl * 1000)
        self._key = f"relay:lease:{{{name}}}"
        self._fence_key = f"relay:lease:{{{name}}}:fence"
        # Unique per acquisition attempt: who holds it, and which time.
        self.holder = holder or secrets.token_hex(6)
        self.token: str | None = None
        self.fence: int | None = None
        self._renew: Any = redis.register_script(_RENEW)
        self._release: Any = redis.register_script(_RELEASE)

    async def acquire(self) -> int | None:
        """Take the lease if nobody holds it: its fencing number, or None."""
        fence = int(await self._redis.incr(self._fence_key))
        token = f"{self.holder}:{fence}"
        if not await self._redis.set(self._key, token, nx=True, px=self.ttl_ms):
            return None
        self.token, self.fence = token, fence
        return fence

    def assume(self) -> str:
        """Act as the holder without Redis' word (Redis cannot be reached): the next renewal takes
        the lease if nobody has it, or shows that another relay does. Returns the token."""
        self.token, self.fence = f"{self.holder}:0", 0
        return self.token

    async def renew(self) -> bool:
        """Extend the lease for another ``ttl``; False when another holds it now.

        A lease nobody holds (it ran out, or a restarted Redis lost it) is taken back: its
        holder was still acting on it, and nobody else has.
        """
        if self.token is None:
            return False
        held = bool(await self._renew(keys=[self._key], args=[self.token, self.ttl_ms]))
        if not held:
            self.token = self.fence = None
        return held

    async def release(self) -> bool:
        """Give the lease up now (a clean shutdown); False when it was no longer ours."""
        if self.token is None:
            return False
        token, self.token, self.fence = self.token, None, None
        return bool(await self._release(keys=[self._key], args=[token]))

    async def current(self) -> tuple[str, int] | None:
        """Who holds the lease and with which fencing number, or None when it is free."""
        value = await self._redis.get(self._key)
        if not isinstance(value, str):
            return None
        holder, _, fence = value.rpartition(":")
        return holder, int(fence)
