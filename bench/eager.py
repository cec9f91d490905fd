"""Eager sends: the cost per delivered frame of relay.eager against the standard forms.

One event is delivered to N subscribers whose sockets can take data (the common case: tabs
that keep up), N sends per event, in three ways:

* **eager**: ``relay.eager.start`` runs each send inline; none has to wait, so no task runs;
* **task per send**: ``asyncio.create_task`` for each send, then the loop runs them;
* **writer tasks**: each subscriber has a queue and a task that awaits it and sends (the
  textbook form: one task switch per subscriber per event).

The send is a coroutine that completes without waiting, as the server's send does while the
socket's buffer has room. Reported: microseconds per delivered frame (median of rounds) and
the ratio to eager. On Python 3.12+ an ``eager_task_factory`` row is added.

    .venv/bin/python bench/eager.py
    .venv/bin/python bench/eager.py --subscribers 1000 --events 200 --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay import eager

Message = dict[str, Any]


class Sink:
    """A socket with room: a send completes at once."""

    def __init__(self) -> None:
        self.count = 0

    async def send(self, message: Message) -> None:
        self.count += 1


async def run_eager(sinks: list[Sink], events: int) -> None:
    for number in range(events):
        message = {"type": "websocket.send", "text": str(number)}
        for sink in sinks:
            left = eager.start(sink.send(message))
            assert left is None


async def run_task_per_send(sinks: list[Sink], events: int) -> None:
    for number in range(events):
        message = {"type": "websocket.send", "text": str(number)}
        tasks = [asyncio.create_task(sink.send(message)) for sink in sinks]
        await asyncio.gather(*tasks)


async def run_writer_tasks(sinks: list[Sink], events: int) -> None:
    queues: list[asyncio.Queue[Message | None]] = [asyncio.Queue() for _ in sinks]

    async def writer(sink: Sink, queue: asyncio.Queue[Message | None]) -> None:
        while (message := await queue.get()) is not None:
            await sink.send(message)

    writers = [asyncio.create_task(writer(s, q)) for s, q in zip(sinks, queues, strict=True)]
    for number in range(events):
        message = {"type": "websocket.send", "text": str(number)}
        for queue in queues:
            queue.put_nowait(message)
        await asyncio.sleep(0)  # the writers run, as they would between two upstream frames
    for queue in queues:
        queue.put_nowait(None)
    await asyncio.gather(*writers)


async def run_eager_factory(sinks: list[Sink], events: int) -> None:
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    try:
        await run_task_per_send(sinks, events)
    finally:
        loop.set_task_factory(None)


def measure(way: Callable[[list[Sink], int], Awaitable[None]], subscribers: int, events: int) -> float:
    sinks = [Sink() for _ in range(subscribers)]
    started = time.perf_counter()
    asyncio.run(way(sinks, events))  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    assert all(sink.count == events for sink in sinks)
    return elapsed / (subscribers * events) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ways: dict[str, Callable[[list[Sink], int], Awaitable[None]]] = {
        "eager (relay.eager)": run_eager,
        "task per send": run_task_per_send,
        "writer tasks": run_writer_tasks,
    }
    if hasattr(asyncio, "eager_task_factory"):
        ways["eager_task_factory"] = run_eager_factory
    rounds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeat):  # interleaved, so drift on a noisy machine hits every way alike
        for name, way in ways.items():
            rounds[name].append(measure(way, args.subscribers, args.events))
    base = statistics.median(rounds["eager (relay.eager)"])
    print(f"N={args.subscribers} subscribers, {args.events} events, median of {args.repeat} rounds")
    for name, values in rounds.items():
        value = statistics.median(values)
        print(f"  {name:<22} {value:7.3f} us/frame   ratio {value / base:5.2f}")


if __name__ == "__main__":
    main()
