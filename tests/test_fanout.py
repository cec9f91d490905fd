"""Fan-out policy with a fake socket: coalescing, never dropping step events, closing hopeless readers."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import orjson
from starlette.websockets import WebSocket, WebSocketState

from relay.errors import CLOSE_TOO_SLOW
from relay.events import Done, Progress, Step
from relay.fanout import Channel, Subscriber


class FakeSocket:
    """Stands in for a Starlette WebSocket whose client may stop reading (send blocks)."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []
        self.closed_with: tuple[int, str] | None = None
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.application_state = WebSocketState.CONNECTED

    async def send(self, message: dict[str, Any]) -> None:
        await self.flowing.wait()
        self.sent.append(message.get("text") or message["bytes"])

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)
        self.application_state = WebSocketState.DISCONNECTED


def subscribe(channel: Channel, limit: int) -> tuple[Subscriber, FakeSocket]:
    socket = FakeSocket()
    subscriber = Subscriber(cast(WebSocket, socket), mode="relay", limit=limit)
    channel.add(subscriber)
    subscriber.start()
    return subscriber, socket


def progress(value: int, node: str = "3") -> Progress:
    return Progress("p", node, 3, 5, value, 100, value / 5, 1.0)


def step(node: str) -> Step:
    return Step("p", node, "KSampler", "sample", int(node) + 1, 12, "running", 1.0, 0.0)


def done() -> Done:
    return Done("p", "success", 2.0, 5, 5, 100.0, {}, recovered=False)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_progress_coalesces_only_for_a_reader_that_is_behind() -> None:
    """While the socket flows nothing is dropped; stalled, only the latest progress per node is kept."""
    channel = Channel("c", ring_size=100)
    subscriber, socket = subscribe(channel, limit=32)
    for value in range(5):
        channel.publish(progress(value))
        await settle()
    assert len(socket.sent) == 5
    socket.flowing.clear()
    await settle()
    for value in range(5, 60):
        channel.publish(progress(value))
    channel.publish(done())
    socket.flowing.set()
    await settle()
    kinds = [json_type(p) for p in socket.sent]
    assert kinds.count("relay.done") == 1
    assert kinds.count("relay.progress") < 60
    seqs = [json_seq(p) for p in socket.sent]
    assert seqs == sorted(seqs)  # coalescing never reorders
    assert json_value(socket.sent[-2]) == 59  # the last progress before done is the latest one
    assert subscriber.coalesced > 0
    subscriber.stop()


async def test_step_events_are_never_dropped_and_a_hopeless_reader_is_closed() -> None:
    """When events that must not be dropped overflow a stalled queue, the socket is closed with 1013."""
    channel = Channel("c", ring_size=100)
    stalled, stalled_socket = subscribe(channel, limit=8)
    healthy, healthy_socket = subscribe(channel, limit=8)
    stalled_socket.flowing.clear()
    channel.publish(step("0"))
    await settle()  # the stalled writer is now stuck inside send
    for node in range(1, 12):
        channel.publish(step(str(node)))
        await settle()
    async with asyncio.timeout(5):
        while stalled_socket.closed_with is None:
            await asyncio.sleep(0.01)
    assert stalled_socket.closed_with[0] == CLOSE_TOO_SLOW
    assert stalled.closed
    # The healthy reader got every step, in order; the ring still holds them for a resume.
    assert [json_seq(p) for p in healthy_socket.sent] == list(range(1, 13))
    assert len(channel.since(0) or []) == 12
    healthy.stop()


def json_type(payload: str | bytes) -> str:
    return str(orjson.loads(payload)["type"])


def json_seq(payload: str | bytes) -> int:
    return int(orjson.loads(payload)["seq"])


def json_value(payload: str | bytes) -> int:
    return int(orjson.loads(payload)["value"])


async def test_backpressure_then_recovery_delivers_everything_in_order() -> None:
    """A socket that stalls mid-send and then drains gets every frame, in order, and stays open."""
    channel = Channel("c", ring_size=100)
    subscriber, socket = subscribe(channel, limit=32)
    channel.publish(step("0"))
    await settle()
    socket.flowing.clear()
    for node in range(1, 10):  # the first of these stops inside the send, the rest queue
        channel.publish(step(str(node)))
        await settle()
    assert len(socket.sent) == 1
    socket.flowing.set()
    async with asyncio.timeout(5):
        while len(socket.sent) < 10:
            await asyncio.sleep(0.01)
    assert [json_seq(p) for p in socket.sent] == list(range(1, 11))
    assert not subscriber.closed
    assert subscriber.task is None  # the writer ends once its queue is empty
    channel.publish(done())
    assert json_type(socket.sent[-1]) == "relay.done"  # written inline again, no task needed
    subscriber.stop()
