"""Background tasks a component owns and must not leave running when the relay stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

__all__ = ["wind_down"]


async def wind_down(tasks: Iterable[asyncio.Task[Any]], grace: float) -> None:
    """Let ``tasks`` finish for up to ``grace`` seconds, then cancel the rest and wait for them
    (each gets to run its own clean-up on the way out)."""
    pending = set(tasks)
    if not pending:
        return
    _done, waiting = await asyncio.wait(pending, timeout=grace)
    for task in waiting:
        task.cancel()
    for task in waiting:
        with contextlib.suppress(asyncio.CancelledError):
            await task
