"""Background tasks a component owns and must not leave running when the relay stops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["stop", "wind_down"]


async def stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait for it to end. The wait swallows only ``task``'s own
    cancellation: if the caller is cancelled meanwhile (a shutdown stopping the caller), that
    goes on up, so the caller does not carry on as if nothing had been asked of it."""
    if task is None or task is asyncio.current_task():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


async def wind_down(tasks: Iterable[asyncio.Task[Any]], grace: float) -> None:
    """Let ``tasks`` finish for up to ``grace`` seconds, then cancel the rest and wait for them
    (each gets to run its own clean-up on the way out)."""
    pending = set(tasks)
    if not pending:
        return
    _done, waiting = await asyncio.wait(pending, timeout=grace)
    for task in waiting:
        await stop(task)
