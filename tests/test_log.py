"""The log's scripts against a real Redis: idempotent appends, fencing, one terminal."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from broker.keys import Keyspace
from broker.log import GenerationFenced, GenerationLog, LogBehind
from broker.settings import Settings


@pytest.fixture
async def log(settings: Settings) -> GenerationLog:
    client = aioredis.from_url(settings.redis_url or "")
    yield GenerationLog(
        client, Keyspace(settings.key_prefix), retention_seconds=120, max_entries=1000,
        catalog_maxlen=1000, control_maxlen=1000,
    )
    await client.aclose()


def tok(seq: int, text: str) -> tuple[int, str, dict[str, str], float, str]:
    return (seq, "token", {"text": text}, 1.0, text)


async def test_retried_append_does_not_duplicate(log: GenerationLog) -> None:
    await log.create("gretry0001", provider="p", model="m", owner="o", lease_ms=5000,
                     ttl_seconds=60)
    await log.append("gretry0001", "o", 5000, [tok(1, "a"), tok(2, "b")])
    # The same batch again (a retry after a lost reply), then an overlapping one.
    await log.append("gretry0001", "o", 5000, [tok(1, "a"), tok(2, "b")])
    result = await log.append("gretry0001", "o", 5000, [tok(2, "b"), tok(3, "c")])
    assert result.last_seq == 3
    events = await log.read("gretry0001", 0, 100)
    assert [e.seq for e in events] == [1, 2, 3]
    assert await log.text("gretry0001") == "abc"


async def test_sequence_gap_is_refused(log: GenerationLog) -> None:
    await log.create("ggap000001", provider="p", model="m", owner="o", lease_ms=5000,
                     ttl_seconds=60)
    await log.append("ggap000001", "o", 5000, [tok(1, "a")])
    with pytest.raises(LogBehind) as behind:
        await log.append("ggap000001", "o", 5000, [tok(3, "x"), tok(4, "y")])
    assert behind.value.last_seq == 1
    assert [e.seq for e in await log.read("ggap000001", 0, 100)] == [1]
    assert await log.text("ggap000001") == "a"


async def test_a_terminal_entry_never_reuses_a_seq_the_log_lost(log: GenerationLog) -> None:
    """The producer wrote 1..3 but the log holds 1 (a failover lost 2..3, which readers may
    have got): its finish is refused, or with ``skip_lost`` numbered after what it wrote."""
    gid = "glost00001"
    await log.create(gid, provider="p", model="m", owner="o", lease_ms=5000, ttl_seconds=60)
    await log.append(gid, "o", 5000, [tok(1, "a")])
    with pytest.raises(LogBehind) as behind:
        await log.finish(gid, "done", {}, owner="o", finish_reason="stop", after=3)
    assert behind.value.last_seq == 1
    assert await log.read(gid, 0, 100) != []  # nothing written, still running
    assert (await log.meta(gid)).status == "running"  # type: ignore[union-attr]
    seq, status = await log.finish(gid, "error", {"code": "log_lost"}, owner="o",
                                   finish_reason="error", after=3, skip_lost=True)
    assert (seq, status) == (4, "error")
    assert [e.seq for e in await log.read(gid, 0, 100)] == [1, 4]


async def test_exactly_one_terminal_and_fencing(log: GenerationLog) -> None:
    gid = "gterm00001"
    await log.create(gid, provider="p", model="m", owner="o", lease_ms=5000, ttl_seconds=60)
    await log.append(gid, "o", 5000, [tok(1, "a")])
    seq, status = await log.finish(gid, "done", {"finish_reason": "stop"}, owner="o",
                                   finish_reason="stop")
    assert (seq, status) == (2, "done")
    # A racing cancel / reaper / second finish writes nothing and reports the status.
    assert await log.finish(gid, "cancelled", {}, mode="any") == (0, "done")
    assert await log.reap_if_orphaned(gid) == "alive"
    with pytest.raises(GenerationFenced):
        await log.append(gid, "o", 5000, [tok(3, "late")])
    events = await log.read(gid, 0, 100)
    assert [e.type for e in events] == ["token", "done"]
    keys = log.keys(gid)
    for key in (keys.log, keys.meta, keys.text):
        ttl = await log.redis.ttl(key)
        assert 0 < ttl <= 120, key
    assert not await log.redis.exists(keys.lease)


async def test_other_owner_is_fenced(log: GenerationLog) -> None:
    gid = "gowner0001"
    await log.create(gid, provider="p", model="m", owner="first", lease_ms=5000, ttl_seconds=60)
    with pytest.raises(GenerationFenced):
        await log.append(gid, "second", 5000, [tok(1, "x")])
    assert await log.finish(gid, "done", {}, owner="second") == (0, "running")


async def test_catalog_announces_generations(log: GenerationLog) -> None:
    await log.create("gcatalog01", provider="simulated", model="m1", owner="o", lease_ms=5000,
                     ttl_seconds=60)
    entries = await log.redis.xrange(log.keyspace.catalog)
    assert entries[-1][1][b"id"] == b"gcatalog01"
    assert entries[-1][1][b"provider"] == b"simulated"


async def test_cancel_of_orphaned_generation_is_written_by_the_canceller(
    log: GenerationLog,
) -> None:
    gid = "gorphan001"
    await log.create(gid, provider="p", model="m", owner="gone", lease_ms=5000, ttl_seconds=60)
    await log.redis.delete(log.keys(gid).lease)  # the producer's process died
    assert await log.request_cancel(gid) == "cancelled"
    events = await log.read(gid, 0, 10)
    assert [e.type for e in events] == ["cancelled"]


async def test_cancel_of_live_generation_flags_it_and_posts_control(log: GenerationLog) -> None:
    gid = "glive00001"
    await log.create(gid, provider="p", model="m", owner="o", lease_ms=5000, ttl_seconds=60)
    assert await log.request_cancel(gid) == "running"
    result = await log.append(gid, "o", 5000, [tok(1, "a")])
    assert result.cancel_reason == "requested"
    control = await log.redis.xrange(log.keyspace.control)
    assert control[-1][1][b"id"] == gid.encode()
    assert await log.request_cancel("gunknown01") == ""


async def test_running_generation_keys_have_the_backstop_ttl(log: GenerationLog) -> None:
    gid = "gbackstop01"
    await log.create(gid, provider="p", model="m", owner="o", lease_ms=5000, ttl_seconds=90)
    await log.append(gid, "o", 5000, [tok(1, "a")])
    keys = log.keys(gid)
    for key in (keys.log, keys.meta, keys.text):
        assert 0 < await log.redis.ttl(key) <= 90, key
