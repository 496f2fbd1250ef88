"""Leases, fencing and the lease watchdog, in-process against the real test Redis.

The cases with real ``tokentee serve`` processes (kill -9, SIGSTOP) are in test_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from broker.events import TERMINAL_TYPES, Event
from broker.hub import Hub
from broker.log import GenerationFenced, GenerationLog, decode_entries
from broker.providers.base import GenerationRequest
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import delete_prefix, make_settings

LEASE = 1.0


@pytest.fixture
async def fast(redis_url: str) -> AsyncIterator[Settings]:
    s = make_settings(redis_url, lease_seconds=LEASE)
    yield s
    await delete_prefix(redis_url, s.key_prefix)


@contextlib.asynccontextmanager
async def raw_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(settings.redis_url or "", socket_timeout=10)
    try:
        yield client
    finally:
        await client.aclose()


async def until_terminal(client: aioredis.Redis, log: GenerationLog, gid: str) -> list[Event]:
    """The generation's entries up to its terminal one, by blocking XREADs on the log key
    itself: a reader that no hub knows of, so only a watchdog can end the generation."""
    key = log.keys(gid).log
    last = "0-0"
    events: list[Event] = []
    while not events or events[-1].type not in TERMINAL_TYPES:
        reply = await client.xread({key: last}, block=1_000, count=100)
        for _key, entries in reply or []:
            last = entries[-1][0].decode()
            events += decode_entries(entries)
    return events


async def orphan(log: GenerationLog, gid: str, lease_ms: int) -> None:
    """A generation whose producer died right after creating it: only its lease is left."""
    await log.create(gid, provider="simulated", model="m", owner="p-dead", lease_ms=lease_ms,
                     ttl_seconds=60)


def request(**params: object) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": "hi"}], params=dict(params))


async def test_an_unread_orphan_is_ended_within_the_lease(fast: Settings) -> None:
    async with Broker.open(fast) as broker, raw_client(fast) as client:
        assert broker.watchdog is not None
        loop = asyncio.get_running_loop()
        began = loop.time()
        await orphan(broker.log, "gunread0001", lease_ms=int(LEASE * 1000))
        async with asyncio.timeout(10):
            events = await until_terminal(client, broker.log, "gunread0001")
        elapsed = loop.time() - began
        assert broker.hub.stream_count == 0  # nobody read it through a hub
    assert [e.type for e in events] == ["error"]
    assert events[0].data["code"] == "producer_lost"
    # Ended once the lease ran out (the timer heap), not a lease or more later; the slack
    # is for a loaded machine.
    assert LEASE <= elapsed < LEASE + 0.9


async def test_generations_orphaned_before_the_watchdog_started_are_found(
    fast: Settings,
) -> None:
    async with raw_client(fast) as client:
        log = GenerationLog.for_settings(client, fast)
        # Announced on the catalog before any watchdog runs.
        await orphan(log, "gbefore0001", lease_ms=200)
        async with Broker.open(fast) as broker:
            async with asyncio.timeout(10):
                events = await until_terminal(client, log, "gbefore0001")
            assert broker.hub.stream_count == 0  # only the watchdog can have ended it
    assert events[-1].data["code"] == "producer_lost"


async def test_two_watchdogs_write_one_terminal_entry(
    fast: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    gids = [f"gtwice{i:05d}" for i in range(20)]
    async with (Broker.open(fast) as a, Broker.open(fast) as b, raw_client(fast) as client):
        outcomes: dict[str, list[str]] = {"a": [], "b": []}
        for name, broker in (("a", a), ("b", b)):
            real = broker.log.reap_if_orphaned

            async def reap(gid: str, real: Callable[[str], Awaitable[str]] = real,
                           name: str = name) -> str:
                outcome = await real(gid)
                outcomes[name].append(outcome)
                return outcome

            monkeypatch.setattr(broker.log, "reap_if_orphaned", reap)
        # Both follow the catalog: each will look at every one of these, at about the
        # same moment, when their leases run out.
        for gid in gids:
            await orphan(a.log, gid, lease_ms=300)
        async with asyncio.timeout(10):
            results = await asyncio.gather(*(until_terminal(client, a.log, g) for g in gids))
        for gid, events in zip(gids, results, strict=True):
            assert [e.type for e in events] == ["error"]
            assert len(await client.xrange(a.log.keys(gid).log)) == 1
            assert (await a.state(gid)).meta.status == "error"
        assert a.hub.stream_count == b.hub.stream_count == 0  # no hub reaper took part
        # Every attempt after the first for a generation wrote nothing.
        reaped = outcomes["a"].count("reaped") + outcomes["b"].count("reaped")
        assert reaped <= len(gids)
        assert set(outcomes["a"] + outcomes["b"]) <= {"reaped", "alive"}


async def test_a_watched_generation_with_a_live_producer_is_left_alone(
    fast: Settings,
) -> None:
    async with Broker.open(fast) as broker:
        # Quiet for several leases (a slow upstream): only the renewals keep it alive.
        info = await broker.start(request(max_tokens=3, tokens_per_second=0.7))
        events = [e async for e in broker.events(info.id)]
        assert broker.watchdog is not None
    assert [e.type for e in events] == ["token", "token", "token", "done"]
    assert broker.watchdog.reaped == 0


async def test_renewal_is_fenced(fast: Settings) -> None:
    async with raw_client(fast) as client:
        log = GenerationLog.for_settings(client, fast)
        await log.create("grenew0001", provider="p", model="m", owner="p-a", lease_ms=60_000,
                         ttl_seconds=60)
        lease = log.keys("grenew0001").lease
        assert await log.renew_leases(["grenew0001"], "p-b", 5_000) == [False]
        assert await client.get(lease) == b"p-a"
        assert await client.pttl(lease) > 50_000  # untouched by the stranger
        assert await log.renew_leases(["grenew0001"], "p-a", 5_000) == [True]
        assert 0 < await client.pttl(lease) <= 5_000
        await client.delete(lease)  # expired
        assert await log.renew_leases(["grenew0001"], "p-a", 5_000) == [False]
        assert not await client.exists(lease)  # never recreated
        # A flushed script cache is reloaded.
        await client.script_flush()
        assert await log.renew_leases(["grenew0001", "gnone00001"], "p-a", 5_000) == [
            False, False,
        ]


async def test_a_producer_whose_lease_expired_cannot_append(fast: Settings) -> None:
    async with raw_client(fast) as client:
        log = GenerationLog.for_settings(client, fast)
        await log.create("gstale0001", provider="p", model="m", owner="p-a", lease_ms=60_000,
                         ttl_seconds=60)
        await log.append("gstale0001", "p-a", 60_000, [(1, "token", {"text": "a"}, 1.0, "a")])
        await client.delete(log.keys("gstale0001").lease)  # it expired while p-a was paused
        with pytest.raises(GenerationFenced, match="lost its lease"):
            await log.append("gstale0001", "p-a", 60_000,
                             [(2, "token", {"text": "b"}, 1.0, "b")])
        # Nor can it end the generation as if it were still the owner.
        assert await log.finish("gstale0001", "done", {}, owner="p-a") == (0, "running")
        assert not await client.exists(log.keys("gstale0001").lease)  # not taken back
        assert await log.text("gstale0001") == "a"
        # Reaped (by anyone): its later appends are refused as well.
        assert await log.reap_if_orphaned("gstale0001") == "reaped"
        with pytest.raises(GenerationFenced, match="has ended"):
            await log.append("gstale0001", "p-a", 60_000,
                             [(2, "token", {"text": "b"}, 1.0, "b")])
        assert len(await client.xrange(log.keys("gstale0001").log)) == 2


@pytest.mark.parametrize("streaming", [True, False], ids=["next-append", "next-renewal"])
async def test_a_running_producer_that_loses_its_lease_stops_cleanly(
    redis_url: str, streaming: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    # No watchdog and no reader: the producer itself notices, at its next append while it
    # streams, or at its manager's next renewal while its upstream is quiet.
    settings = make_settings(redis_url, lease_seconds=LEASE, watchdog=False)
    async with Broker.open(settings) as broker, raw_client(settings) as client:
        assert broker.watchdog is None
        rate = 50 if streaming else 0.05  # quiet: 20 s to its first token
        info = await broker.start(request(max_tokens=100_000, tokens_per_second=rate))
        key = broker.log.keys(info.id).log
        if streaming:
            assert await client.xread({key: "0-2"}, block=5_000, count=1)
        await client.delete(broker.log.keys(info.id).lease)  # as if it had expired
        async with asyncio.timeout(10):
            events = await until_terminal(client, broker.log, info.id)
            await broker.manager.wait(info.id)
        if not streaming:
            assert "lease lost; producer stops" in caplog.text  # the renewal noticed
        assert broker.manager.active == []
        assert events[-1].type == "error"
        assert events[-1].data["code"] == "producer_lost"
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        # Nothing after the terminal entry, and the lease was not taken back.
        meta = await broker.log.meta(info.id)
        assert meta is not None
        assert meta.last_seq == events[-1].seq
        assert not await client.exists(broker.log.keys(info.id).lease)


async def test_a_hub_built_not_to_reap_never_reaps(
    fast: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in a consumer worker process: it reads, and leaves ending generations to others.
    async with raw_client(fast) as client, raw_client(fast) as blocking:
        log = GenerationLog.for_settings(client, fast)
        await orphan(log, "gnoreap001", lease_ms=100)
        reaps: list[str] = []
        rounds = asyncio.Semaphore(0)
        real_alive = log.lease_alive

        async def reap(gid: str) -> str:
            reaps.append(gid)
            return "reaped"

        async def alive(gids: list[str]) -> list[bool]:
            result = await real_alive(gids)
            rounds.release()
            return result

        monkeypatch.setattr(log, "reap_if_orphaned", reap)
        monkeypatch.setattr(log, "lease_alive", alive)
        async with Hub(log, blocking, fast, reap=False) as hub, hub.subscribe("gnoreap001"):
            async with asyncio.timeout(10):
                # Two reaper rounds have found the generation without a lease.
                await rounds.acquire()
                await rounds.acquire()
        assert reaps == []
        assert (await log.meta("gnoreap001")).status == "running"  # type: ignore[union-attr]


async def test_the_watchdog_can_be_turned_off(redis_url: str) -> None:
    settings = make_settings(redis_url, watchdog=False)
    async with Broker.open(settings) as broker:
        assert broker.watchdog is None
    assert Settings.model_fields["watchdog"].default is True


@pytest.mark.skipif(bool(os.environ.get("TOKENTEE_TEST_REDIS_URL")),
                    reason="changes server configuration: private test server only")
async def test_the_watchdog_survives_a_redis_error_that_is_not_a_disconnect(
    redis_url: str,
) -> None:
    settings = make_settings(redis_url, lease_seconds=0.3)
    failed = asyncio.Event()

    class Flag(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "watchdog lease check failed" in record.getMessage():
                failed.set()

    handler = Flag()
    logging.getLogger("broker.watchdog").addHandler(handler)
    try:
        async with Broker.open(settings) as broker, raw_client(settings) as client:
            await orphan(broker.log, "goomwatch01", lease_ms=100)
            await broker.redis.config_set("maxmemory", "1")  # every write now fails: OOM
            try:
                async with asyncio.timeout(10):
                    await failed.wait()  # its reap was refused, and it goes on
            finally:
                await broker.redis.config_set("maxmemory", "0")
            async with asyncio.timeout(10):
                events = await until_terminal(client, broker.log, "goomwatch01")
            assert broker.hub.stream_count == 0
    finally:
        logging.getLogger("broker.watchdog").removeHandler(handler)
    assert [e.type for e in events] == ["error"]
    assert events[0].data["code"] == "producer_lost"
