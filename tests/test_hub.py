"""Fan-out through the hub (the Python API), against a real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from broker.errors import GenerationNotFound, InvalidResumePoint
from broker.events import Event
from broker.providers.base import GenerationRequest
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import make_settings


def request(**params: object) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": "hi"}], params=dict(params))


async def collect(broker: Broker, gid: str, after: int = 0) -> list[Event]:
    return [e async for e in broker.events(gid, after)]


def check_complete(events: list[Event], tokens: int) -> None:
    assert [e.seq for e in events] == list(range(1, tokens + 2))
    assert [e.type for e in events[:-1]] == ["token"] * tokens
    assert events[-1].type == "done"


async def test_identical_delivery_to_many_readers_including_late_joiner(broker: Broker) -> None:
    info = await broker.start(request(max_tokens=60, tokens_per_second=300))
    readers = [asyncio.create_task(collect(broker, info.id)) for _ in range(5)]
    # A late joiner: subscribes once a third of the tokens are in the log.
    async with broker.subscribe(info.id) as first:
        async for event in first:
            if event.seq == 20:
                break
    late = asyncio.create_task(collect(broker, info.id))
    results = await asyncio.gather(*readers, late)
    for events in results:
        check_complete(events, 60)
        assert events == results[0]
    state = await broker.state(info.id)
    assert state.text == "".join(e.text for e in results[0])
    assert state.meta.status == "done"


async def test_resume_after_id_has_no_gap_and_no_duplicate(broker: Broker) -> None:
    info = await broker.start(request(max_tokens=50, tokens_per_second=500))
    first: list[Event] = []
    async with broker.subscribe(info.id) as cursor:
        async for event in cursor:
            first.append(event)
            if event.seq == 17:
                break
    rest = await collect(broker, info.id, after=first[-1].seq)
    check_complete(first + rest, 50)


async def test_resume_points_are_validated(broker: Broker) -> None:
    info = await broker.start(request(max_tokens=3, tokens_per_second=0))
    events = await collect(broker, info.id)
    assert events[-1].type == "done"
    with pytest.raises(InvalidResumePoint):
        await collect(broker, info.id, after=events[-1].seq + 1)
    with pytest.raises(InvalidResumePoint):
        await collect(broker, info.id, after=-1)
    assert await collect(broker, info.id, after=events[-1].seq) == []
    with pytest.raises(GenerationNotFound):
        await collect(broker, "gdoesnotexist")


async def test_slow_reader_falls_back_to_the_log_and_others_are_not_held(
    redis_url: str,
) -> None:
    settings = make_settings(redis_url, client_queue_size=4, catchup_batch=7)
    async with Broker.open(settings) as broker:
        info = await broker.start(request(max_tokens=200, tokens_per_second=0))
        async with broker.subscribe(info.id) as slow:
            # The slow reader takes one event, then stops reading while the others finish.
            assert (await anext(slow)).seq == 1
            fast = await asyncio.gather(*(collect(broker, info.id) for _ in range(3)))
            for events in fast:
                check_complete(events, 200)
            # Its buffer never grew past the bound; it now reads the rest from the log.
            assert len(slow._buffer) <= 4 + 7
            rest = [e async for e in slow]
        check_complete([fast[0][0], *rest], 200)
        assert rest == fast[0][1:]


async def test_trimmed_entries_are_reported_as_a_gap(broker: Broker) -> None:
    info = await broker.start(request(max_tokens=30, tokens_per_second=0))
    events = await collect(broker, info.id)
    await broker.redis.xtrim(broker.log.keys(info.id).log, minid="0-11", approximate=False)
    replay = await collect(broker, info.id)
    assert replay[0].type == "gap"
    assert replay[0].data == {"first_missing": 1, "last_missing": 10}
    assert replay[0].seq == 10
    assert replay[1:] == events[10:]


async def test_upstream_error_mid_stream_ends_with_error(broker: Broker) -> None:
    info = await broker.start(request(max_tokens=30, tokens_per_second=0, fail_after=7))
    events = await collect(broker, info.id)
    assert [e.type for e in events] == ["token"] * 7 + ["error"]
    assert events[-1].data["code"] == "upstream_error"
    assert (await broker.state(info.id)).meta.status == "error"


async def test_max_entries_caps_a_runaway_generation(redis_url: str) -> None:
    settings = make_settings(redis_url, max_entries=10)
    async with Broker.open(settings) as broker:
        info = await broker.start(request(max_tokens=100, tokens_per_second=0))
        events = await collect(broker, info.id)
    assert [e.type for e in events] == ["token"] * 9 + ["error"]
    assert events[-1].data["code"] == "max_entries"


async def test_cancel_from_another_process_reaches_the_producer(
    broker: Broker, settings: Settings
) -> None:
    # A second broker on the same Redis stands in for another process: it has no local
    # producer, so the cancel can only arrive through Redis.
    async with Broker.open(settings) as other:
        info = await broker.start(request(max_tokens=10_000, tokens_per_second=200))
        events: list[Event] = []
        async for event in other.events(info.id):
            events.append(event)
            if event.seq == 3:
                assert await other.cancel(info.id) == "running"
        assert events[-1].type == "cancelled"
        assert events[-1].data == {"reason": "requested"}
        assert [e.type for e in events[:-1]] == ["token"] * (len(events) - 1)
        await broker.manager.wait(info.id)
        assert broker.manager.active == []
        assert (await other.state(info.id)).meta.status == "cancelled"


async def test_orphaned_generation_is_reaped(redis_url: str) -> None:
    settings = make_settings(redis_url, lease_seconds=0.5)
    async with Broker.open(settings) as broker:
        # A generation whose producer died right after creating it: the lease runs out.
        await broker.log.create("gorphaned01", provider="simulated", model="m", owner="dead",
                                lease_ms=300, ttl_seconds=60)
        events = await collect(broker, "gorphaned01")
    assert [e.type for e in events] == ["error"]
    assert events[0].data["code"] == "producer_lost"


async def test_readers_of_a_generation_that_vanished_from_redis_end(redis_url: str) -> None:
    # As after a Redis restart without persistence: every key of the generation is gone.
    settings = make_settings(redis_url, lease_seconds=0.5)
    async with Broker.open(settings) as broker:
        await broker.log.create("gvanish0001", provider="simulated", model="m", owner="x",
                                lease_ms=60_000, ttl_seconds=60)
        await broker.log.append("gvanish0001", "x", 60_000,
                                [(1, "token", {"text": "a"}, 1.0, "a")])
        events: list[Event] = []
        async for event in broker.events("gvanish0001"):
            events.append(event)
            if event.seq == 1:
                await broker.redis.delete(*broker.log.keys("gvanish0001").all())
    assert [e.type for e in events] == ["token", "error"]
    assert events[-1].data["code"] == "log_lost"
    assert events[-1].seq == 2


async def test_shutdown_ends_running_producers_with_an_error(redis_url: str) -> None:
    settings = make_settings(redis_url, shutdown_grace_seconds=0.0)
    async with Broker.open(settings) as broker:
        info = await broker.start(request(max_tokens=10_000, tokens_per_second=50))
        log = broker.log
    client = aioredis.from_url(redis_url)
    try:
        entries = await client.xrange(log.keys(info.id).log)
    finally:
        await client.aclose()
    assert entries[-1][1][b"type"] == b"error"
    assert b'"code":"shutdown"' in entries[-1][1][b"data"]


def lasting_tasks() -> set[asyncio.Task[object]]:
    """Every task but redis-py's command sends in flight: on Python 3.11 its ``wait_for``
    runs each send as a short-lived task of its own (a background loop's read may be
    starting at any moment)."""
    return {t for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__name__", "") != "_send_packed_command"}


async def test_no_leaks_after_readers_leave(broker: Broker) -> None:
    baseline = lasting_tasks()
    info = await broker.start(request(max_tokens=10_000, tokens_per_second=100))
    readers = []
    started = asyncio.Event()
    count = 0

    async def reader() -> None:
        nonlocal count
        async for _event in broker.events(info.id):
            count += 1
            if count >= 20:
                started.set()

    readers = [asyncio.create_task(reader()) for _ in range(20)]
    await started.wait()
    assert broker.hub.cursor_count == 20
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    assert broker.hub.cursor_count == 0
    assert broker.hub.stream_count == 0
    await broker.cancel(info.id)
    await broker.manager.wait(info.id)
    assert lasting_tasks() == baseline


async def test_readers_joining_and_resuming_at_random_points_see_no_gap(
    redis_url: str,
) -> None:
    """The seam between catch-up (XRANGE) and live delivery, hit many times while the
    producer is writing fast.  A spurious ``gap`` or a duplicate fails the test."""
    import random

    rng = random.Random(20261124)
    settings = make_settings(redis_url, client_queue_size=16, catchup_batch=50)
    tokens = 1500
    async with Broker.open(settings) as broker:
        info = await broker.start(request(max_tokens=tokens, tokens_per_second=3000))
        progress = asyncio.Condition()
        seen = 0

        async def pacer() -> None:
            nonlocal seen
            async for event in broker.events(info.id):
                async with progress:
                    seen = event.seq
                    progress.notify_all()

        async def wait_for(seq: int) -> None:
            async with progress:
                await progress.wait_for(lambda: seen >= seq)

        async def reader(join_at: int, drop_at: int | None) -> list[Event]:
            await wait_for(join_at)
            out: list[Event] = []
            async with broker.subscribe(info.id) as cursor:
                async for event in cursor:
                    out.append(event)
                    if drop_at is not None and event.seq >= drop_at:
                        break
            if drop_at is not None:
                await wait_for(min(drop_at + rng.randint(1, 200), tokens))
                out += [e async for e in broker.events(info.id, out[-1].seq)]
            return out

        pacing = asyncio.create_task(pacer())
        plans = []
        for _ in range(40):
            join = rng.randint(0, tokens - 1)
            drop = rng.choice([None, rng.randint(1, tokens)])
            plans.append(reader(join, drop))
        results = await asyncio.gather(*plans)
        await pacing
    for events in results:
        assert [e.type for e in events if e.type == "gap"] == []
        check_complete(events, tokens)


async def test_resume_after_a_terminal_entry_the_hub_has_not_read_yet_ends(
    broker: Broker, settings: Settings
) -> None:
    from broker.connections import blocking_client
    from broker.hub import Hub

    gid = "gterminalrace1"
    log = broker.log
    await log.create(gid, provider="p", model="m", owner="x", lease_ms=60_000, ttl_seconds=60)
    await log.append(gid, "x", 60_000, [(i, "token", {"text": "t"}, 1.0, "t") for i in (1, 2)])
    client = blocking_client(settings.redis_url or "", settings)
    hub = Hub(log, client, settings)  # not entered: the test drives the hub's reads itself
    try:
        async with hub.subscribe(gid) as first:
            assert [e.seq for e in first.ready()] == []
            await log.finish(gid, "done", {"finish_reason": "stop"}, owner="x")  # seq 3
            # A client that already saw seq 3 resumes before the hub has read it.
            async with hub.subscribe(gid, after=3) as resumed:
                waiting = asyncio.create_task(anext(resumed, None))
                await hub._read_once()
                assert await asyncio.wait_for(waiting, 5) is None
                assert resumed.finished
            assert [e.seq async for e in first] == [1, 2, 3]
    finally:
        await client.aclose()


@pytest.mark.parametrize("where", ["same process", "another process"])
async def test_racing_cancels_always_leave_exactly_one_terminal(
    broker: Broker, settings: Settings, where: str
) -> None:
    """Cancel arrives directly and again through the control stream (and the append
    script's flag) while fast producers are writing: each ends ``cancelled``, once."""
    async with Broker.open(settings) as other:
        canceller = broker if where == "same process" else other
        infos = [await broker.start(request(max_tokens=1_000_000, tokens_per_second=2000))
                 for _ in range(12)]
        for info in infos:  # all are streaming
            async with broker.subscribe(info.id) as cursor:
                await anext(cursor)
        await asyncio.gather(*(canceller.cancel(i.id) for i in infos))
        for info in infos:
            await broker.manager.wait(info.id)
        for info in infos:
            state = await broker.state(info.id)
            assert state.meta.status == "cancelled", info.id
            events = await broker.log.read(info.id, state.meta.last_seq - 1, 10)
            assert [e.type for e in events] == ["cancelled"]
            terminal_entries = [
                e for e in await broker.log.read(info.id, 0, state.meta.last_seq) if e.terminal
            ]
            assert len(terminal_entries) == 1


async def test_producer_survives_killed_redis_connections_without_duplicates(
    redis_url: str,
) -> None:
    """Connections dropped under the producer (failover, proxy restart): idempotent appends
    are retried, and the log still holds every token exactly once."""
    settings = make_settings(redis_url)
    async with Broker.open(settings) as broker:
        info = await broker.start(request(max_tokens=3000, tokens_per_second=3000))
        killed = 0
        async with broker.subscribe(info.id) as cursor:
            events: list[Event] = []
            async for event in cursor:
                events.append(event)
                if event.seq % 500 == 0:
                    # Kill this broker's pooled command connections (ours only, by name).
                    for client in await broker.redis.client_list():
                        if client["name"] == f"{settings.key_prefix}:commands":
                            await broker.redis.client_kill_filter(_id=client["id"])
                            killed += 1
        assert killed > 0
        check_complete(events, 3000)
        state = await broker.state(info.id)
        assert state.text == "".join(e.text for e in events)


async def test_many_live_streams_in_one_hub_read(broker: Broker) -> None:
    # More streams than the hub's batching threshold: reads carry many streams at once.
    infos = [await broker.start(request(max_tokens=40, tokens_per_second=200))
             for _ in range(40)]
    results = await asyncio.gather(*(collect(broker, i.id) for i in infos for _ in range(2)))
    for events in results:
        check_complete(events, 40)
    assert broker.hub.reads < 40 * 40  # far fewer XREADs than entries
