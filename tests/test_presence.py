"""``cancel_unread_after``: a generation nobody reads is cancelled with reason ``unread``;
SSE clients on any replica and Python cursors keep it alive, durable consumers do not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse

from broker.events import Event
from broker.keys import Keyspace, new_generation_id
from broker.presence import ReaderPresence
from broker.providers.base import GenerationRequest
from broker.service import Broker
from broker.settings import Settings
from consumers.runtime import ConsumerType, Generation
from tests.conftest import delete_prefix, make_settings, running_server

# Short leases make the checks frequent: the manager looks every LEASE / 3, hubs report
# their readers as often, and a hub's presence lapses LEASE after its last report.
LEASE = 0.9
GRACE = 0.6


@pytest.fixture
async def quick(redis_url: str) -> AsyncIterator[Settings]:
    s = make_settings(redis_url, lease_seconds=LEASE)
    yield s
    await delete_prefix(redis_url, s.key_prefix)


def slow(tokens: int = 1_000, rate: float = 10) -> GenerationRequest:
    """A generation far longer than the test (100 s by default) unless cancelled."""
    return GenerationRequest(messages=[{"role": "user", "content": "x"}],
                             params={"max_tokens": tokens, "tokens_per_second": rate})


async def ended(broker: Broker, gid: str, limit: float = 10.0) -> Event:
    """Wait for the local producer of ``gid`` to end; its terminal event."""
    async with asyncio.timeout(limit):
        await broker.manager.wait(gid)
    events = [event async for event in broker.events(gid)]
    return events[-1]


async def test_an_earlier_stop_is_not_turned_into_an_unread_cancel(quick: Settings) -> None:
    """A lease lost and an unread check in the same round: the first reason stands."""
    async with Broker.open(quick) as broker:
        info = await broker.start(slow())
        assert broker.manager.cancel_local(info.id, stop_code="producer_lost")
        assert not broker.manager.cancel_local(info.id, "unread")
        terminal = await ended(broker, info.id)
        assert (terminal.type, terminal.data["code"]) == ("error", "producer_lost")


async def test_nobody_reads_it_cancelled_as_unread(quick: Settings) -> None:
    async with Broker.open(quick) as broker, running_server(quick, broker) as url, \
            httpx.AsyncClient(base_url=url) as http:
        began = time.monotonic()
        response = await http.post("/v1/streams", json={
            "prompt": "p", "cancel_unread_after": GRACE,
            "params": {"max_tokens": 1_000, "tokens_per_second": 10},
        })
        assert response.status_code == 201, response.text
        gid = response.json()["id"]
        async with asyncio.timeout(10):
            await broker.manager.wait(gid)
        took = time.monotonic() - began
        # The clock starts at creation: never cancelled before the period.
        assert took >= GRACE, took
        status = (await http.get(f"/v1/streams/{gid}")).json()
        assert (status["status"], status["finish_reason"], status["cancel_reason"]) == (
            "cancelled", "cancelled", "unread")
        # A reader that comes later still gets the whole log and the cancelled end.
        events = [event async for event in broker.events(gid)]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert (events[-1].type, events[-1].data) == ("cancelled", {"reason": "unread"})
        assert broker.metrics.unread_cancels == 1
        metrics = (await http.get("/metrics")).text
        assert "tokentee_unread_cancels_total 1.0" in metrics


async def test_without_the_option_an_unread_generation_runs_to_done(quick: Settings) -> None:
    async with Broker.open(quick) as broker:
        # Both run 2 s, three times the other's grace period, and nobody reads either.
        plain = await broker.start(slow(tokens=20, rate=10))
        watched = await broker.start(slow(tokens=20, rate=10), cancel_unread_after=GRACE)
        assert (await ended(broker, watched.id)).type == "cancelled"
        assert (await ended(broker, plain.id)).type == "done"
        assert (await broker.state(plain.id)).meta.cancel_reason is None
        # Only generations with the policy cost anything: reading the plain one (above,
        # while it ran or after) wrote no presence.
        assert not await broker.redis.exists(broker.log.keyspace.readers(plain.id))
        assert broker.metrics.unread_cancels == 1


async def test_a_python_cursor_keeps_it_alive(quick: Settings) -> None:
    async with Broker.open(quick) as broker:
        info = await broker.start(slow(), cancel_unread_after=GRACE)
        async with broker.subscribe(info.id) as cursor:
            # Recorded before the cursor was returned, not at the hub's next report: a reader
            # that comes just before the period runs out is counted in time.
            assert await broker.hub.presence.unread_ms([info.id]) == [0]
            async for event in cursor:
                # 10 tokens a second: 3 s is five grace periods.
                if event.seq >= 30:
                    break
            assert (await broker.state(info.id)).meta.status == "running"
        terminal = await ended(broker, info.id)
        assert (terminal.type, terminal.data) == ("cancelled", {"reason": "unread"})
        assert terminal.seq > 30


@pytest.fixture
async def long_lease(redis_url: str) -> AsyncIterator[Settings]:
    # A longer lease, so that a presence lapsing (a lease after the hub's last report) is far
    # slower than the departure a hub reports when its last reader leaves.
    s = make_settings(redis_url, lease_seconds=6.0)
    yield s
    await delete_prefix(redis_url, s.key_prefix)


async def test_readers_arriving_together_are_reported(quick: Settings) -> None:
    async with Broker.open(quick) as broker, contextlib.AsyncExitStack() as stack:
        info = await broker.start(slow(), cancel_unread_after=GRACE)
        await asyncio.gather(*(stack.enter_async_context(broker.subscribe(info.id))
                               for _ in range(2)))
        assert await broker.hub.presence.unread_ms([info.id]) == [0]


async def test_readers_leave_with_their_broker(long_lease: Settings) -> None:
    """A broker that stops with readers open (a SIGTERM: its SSE clients are told to go
    elsewhere) reports them gone at once, not a lease later when its presence would lapse."""
    async with Broker.open(long_lease) as producing, contextlib.AsyncExitStack() as readers:
        info = await producing.start(slow(), cancel_unread_after=60)
        async with Broker.open(long_lease) as serving:
            cursor = await readers.enter_async_context(serving.subscribe(info.id))
            async for event in cursor:
                if event.seq >= 3:
                    break
            assert await producing.hub.presence.unread_ms([info.id]) == [0]
        # Stopped with the cursor still open: unread from then on, where its presence would
        # have lasted up to a lease (6 s) longer.
        [(_member, until_ms)] = await producing.redis.zrange(
            producing.log.keyspace.readers(info.id), 0, -1, withscores=True)
        seconds, micros = await producing.redis.time()
        assert until_ms <= seconds * 1000 + micros // 1000
        await producing.cancel(info.id)


async def test_an_sse_reader_on_another_replica_keeps_it_alive(long_lease: Settings) -> None:
    settings, lease = long_lease, long_lease.lease_seconds
    async with Broker.open(settings) as producing, Broker.open(settings) as serving, \
            running_server(settings, serving) as url, \
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as http:
        info = await producing.start(slow(), cancel_unread_after=GRACE)
        seen = 0
        async with aconnect_sse(http, "GET", f"/v1/streams/{info.id}/events") as source:
            async for sse in source.aiter_sse():
                if sse.data:
                    seen = int(sse.id)
                if seen >= 30:  # 3 s at 10 tokens a second: five grace periods
                    break
            assert (await producing.state(info.id)).meta.status == "running"
        left = time.monotonic()
        terminal = await ended(producing, info.id)
        assert (terminal.type, terminal.data) == ("cancelled", {"reason": "unread"})
        # The serving replica reported the departure at once: the period ran from there,
        # and the check runs every lease / 3.  Without the report the presence would lapse
        # 2/3 of a lease to a lease after the reader left: no sooner than GRACE + 4 s.
        assert time.monotonic() - left < GRACE + lease / 3 + 1.5, time.monotonic() - left
        assert producing.metrics.unread_cancels == 1


class Collect(ConsumerType):
    name = "collect"

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.ends: list[dict[str, Any]] = []

    def token(self, gen: Generation, event: Event) -> None:
        self.seqs.append(event.seq)

    def end(self, gen: Generation, event: Event) -> None:
        self.ends.append({"type": event.type, **event.data})


async def test_durable_consumers_do_not_keep_it_alive(quick: Settings) -> None:
    collect = Collect()
    async with Broker.open(quick, consumers=[collect]) as broker:
        info = await broker.start(slow(), cancel_unread_after=GRACE)
        terminal = await ended(broker, info.id)
        assert (terminal.type, terminal.data) == ("cancelled", {"reason": "unread"})

        async def consumed() -> None:
            while (cp := await broker.consumer_store.checkpoint(info.id, "collect")) is None \
                    or not cp.done:  # noqa: ASYNC110 - the checkpoint is in Redis
                await asyncio.sleep(0.02)

        async with asyncio.timeout(10):
            await consumed()
        # It read everything, up to the cancelled entry.
        assert collect.seqs == list(range(1, terminal.seq))
        assert collect.ends == [{"type": "cancelled", "reason": "unread"}]


async def test_a_hubs_presence_lapses_unless_refreshed(settings: Settings,
                                                       redis_url: str) -> None:
    """A hub that stops reporting (its process died) counts as unread one TTL after its last
    report; a hub whose last reader leaves counts as unread at once."""
    client = aioredis.from_url(redis_url)
    try:
        presence = ReaderPresence(client, Keyspace(settings.key_prefix), ttl_ms=300)
        gid = new_generation_id()
        assert await presence.unread_ms([gid]) == [-1]  # never read
        await presence.here("hub-a", [(gid, GRACE)])
        assert await presence.unread_ms([gid]) == [0]

        async def lapsed() -> None:
            while (await presence.unread_ms([gid]))[0] == 0:  # noqa: ASYNC110 - Redis clock
                await asyncio.sleep(0.02)

        async with asyncio.timeout(5):
            await lapsed()
        await presence.here("hub-b", [(gid, GRACE)])
        assert await presence.unread_ms([gid]) == [0]  # b reads, a has lapsed
        await presence.left("hub-b", gid, GRACE)
        [unread] = await presence.unread_ms([gid])
        assert 0 <= unread < 300  # counted from b's departure, not a's lapse
        # The set is kept for the grace period and two TTLs after its last write (rounded up
        # to a second), no longer.
        assert 0 < await client.pttl(presence.keyspace.readers(gid)) <= 2_000
    finally:
        await client.aclose()


@pytest.mark.parametrize("value", [0, -1, "5", True, 86_401, float("inf"), "NaN"])
async def test_bad_values_are_refused(http: httpx.AsyncClient, broker: Broker,
                                      value: object) -> None:
    body = '{"prompt": "p", "cancel_unread_after": ' + json.dumps(value) + "}"
    response = await http.post("/v1/streams", content=body,
                               headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == "cancel_unread_after"
    assert not broker.manager.active
    if isinstance(value, int | float) and not isinstance(value, bool):
        with pytest.raises(ValueError, match="cancel_unread_after"):
            await broker.start(slow(), cancel_unread_after=value)
