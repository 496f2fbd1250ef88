"""Unit tests for :class:`broker.sse.ShieldedNext`, the shielded read that channel and
records cursors use under :class:`EventStreamResponse`'s heartbeat timeout.  Pure asyncio:
no Redis is involved."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker.sse import ShieldedNext


class Gated:
    """An async iterator that yields one item each time its gate is opened."""

    def __init__(self, items: list[str]) -> None:
        self.items = list(items)
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.closed = False
        self.cancelled = 0

    def __aiter__(self) -> Gated:
        return self

    async def __anext__(self) -> str:
        self.started.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.gate.clear()
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    async def aclose(self) -> None:
        self.closed = True


async def test_a_timed_out_wait_keeps_the_read_for_the_next_call() -> None:
    source = Gated(["a", "b"])
    nxt = ShieldedNext(source)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(nxt.get(), 0.05)
    assert source.cancelled == 0  # the read itself was not cancelled
    source.gate.set()
    assert await nxt.get() == "a"
    source.gate.set()
    assert await nxt.get() == "b"


async def test_an_item_produced_as_the_wait_is_cancelled_is_not_dropped() -> None:
    source = Gated(["a", "b"])
    nxt = ShieldedNext(source)
    waiter = asyncio.ensure_future(nxt.get())
    await source.started.wait()
    # The item becomes ready in the same loop iteration as the cancellation of the wait:
    # the read completes, the wait is cancelled, and the item must survive for the next get.
    source.gate.set()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await nxt.get() == "a"


async def test_errors_and_the_end_pass_through() -> None:
    async def failing() -> AsyncIterator[str]:
        yield "x"
        raise RuntimeError("boom")

    nxt = ShieldedNext(failing())
    assert await nxt.get() == "x"
    with pytest.raises(RuntimeError, match="boom"):
        await nxt.get()

    source = Gated([])
    source.gate.set()
    with pytest.raises(StopAsyncIteration):
        await ShieldedNext(source).get()


async def test_aclose_cancels_a_read_in_flight_and_closes_the_source() -> None:
    source = Gated(["a"])
    nxt = ShieldedNext(source)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(nxt.get(), 0.05)
    await nxt.aclose()
    assert source.cancelled == 1
    assert source.closed
