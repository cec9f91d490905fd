"""Running a coroutine inline up to its first wait, and finishing it later from a task.

The fan-out writes each event to every tab of a client. Most tabs keep up, and the server's
send for them completes without ever waiting; creating a task (or waking a writer task) per
tab per event would then cost a task switch each, which is most of the price of fan-out to many
tabs (``bench/eager.py`` measures it). :func:`start` runs the send right away, the way an
eager task would (``asyncio.eager_task_factory``, Python 3.12+, does this for whole tasks);
when the send does have to wait, what is left of it is returned as an :class:`Unfinished` for a
task to drive with :meth:`Unfinished.finish`, before anything else is sent, so frames stay in
order and the caller never waits.

The only knowledge of asyncio internals is here: a future a coroutine yields is marked as being
waited on (``_asyncio_future_blocking``), and whoever takes it over must clear that mark, as an
asyncio Task does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["Unfinished", "start"]


class Unfinished:
    """A coroutine stopped at its first wait, and the future (or bare yield) it waits on."""

    __slots__ = ("_coroutine", "_waiting_on")

    def __init__(self, coroutine: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self._coroutine = coroutine
        self._waiting_on = waiting_on

    async def finish(self) -> None:
        """Drive the coroutine to its end from the calling task, as a task of its own would."""
        coroutine, waiting_on = self._coroutine, self._waiting_on
        try:
            while True:
                if waiting_on is None:
                    await asyncio.sleep(0)  # a bare yield: let the loop run once
                else:
                    # A future still marked as waited on refuses a second await: take it over.
                    waiting_on._asyncio_future_blocking = False
                    await waiting_on
                try:
                    waiting_on = coroutine.send(None)
                except StopIteration:
                    return
        except BaseException:
            coroutine.close()
            raise

    def close(self) -> None:
        """Abandon the coroutine (its socket is gone)."""
        self._coroutine.close()


def start(coroutine: Coroutine[Any, Any, None]) -> Unfinished | None:
    """Run ``coroutine`` until it first waits: None when it finished, else what is left of it.

    Raises whatever the coroutine raised before its first wait.
    """
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return None
    return Unfinished(coroutine, waiting_on)
