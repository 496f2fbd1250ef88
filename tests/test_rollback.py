"""A log that Redis rolled back, on one Redis: what a replica promoted after its master
crashed holds when it had not received the newest entries (replication is asynchronous).
The producer writes the lost entries again; a log that ends below what the hub has read
ends its readers with ``log_lost``.  (The real crash, on a cluster, is in test_cluster.py.)"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from redis.exceptions import ResponseError

from broker.events import Event
from broker.log import AppendResult, GenerationLog
from broker.providers.base import GenerationRequest
from broker.providers.simulated import tokenize
from broker.service import Broker
from tests.conftest import make_settings
from tests.test_hub import check_complete, collect

# The log as a replica that missed its newest ``ARGV[1]`` entries holds it: the stream (its
# top id included, which XDEL would keep), ``last_seq`` and the text, all rolled back.
_ROLL_BACK = """
local last = tonumber(redis.call('HGET', KEYS[2], 'last_seq'))
local to = last - tonumber(ARGV[1])
local kept = redis.call('XRANGE', KEYS[1], '-', '0-' .. to)
local text = {}
redis.call('DEL', KEYS[1])
for _, entry in ipairs(kept) do
  redis.call('XADD', KEYS[1], entry[1], unpack(entry[2]))
  local fields = {}
  for i = 1, #entry[2], 2 do fields[entry[2][i]] = entry[2][i + 1] end
  if fields['type'] == 'token' then table.insert(text, cjson.decode(fields['data'])['text']) end
end
redis.call('SET', KEYS[3], table.concat(text))
redis.call('HSET', KEYS[2], 'last_seq', to)
if ARGV[2] == '1' then redis.call('DEL', KEYS[4]) end
return {last, to}
"""


async def roll_back(log: GenerationLog, gid: str, entries: int, *, lease: bool = True
                    ) -> tuple[int, int]:
    """Drop the newest ``entries`` of ``gid``'s log (and its lease unless ``lease``), in one
    atomic step; returns ``(last seq before, last seq after)``."""
    keys = log.keys(gid)
    before, after = await log.redis.eval(  # type: ignore[misc]
        _ROLL_BACK, 4, keys.log, keys.meta, keys.text, keys.lease, entries,
        "0" if lease else "1")
    return int(before), int(after)


async def test_the_producer_writes_again_what_a_rollback_lost(
    redis_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Readers got entries that the log then loses: the producer's next append finds the log
    behind and writes them again, identical, so every reader (those that got them, and a
    late one that reads the repaired log) gets every entry once, with the same content."""
    settings = make_settings(redis_url)
    text = " ".join(f"w{i}" for i in range(60))
    async with Broker.open(settings) as broker:
        info = await broker.start(GenerationRequest(
            [{"role": "user", "content": "x"}], params={"text": text, "tokens_per_second": 20}))
        readers = [asyncio.create_task(collect(broker, info.id)) for _ in range(3)]
        async with broker.subscribe(info.id) as cursor:
            async for event in cursor:
                if event.seq == 20:
                    break
        with caplog.at_level(logging.WARNING, logger="broker.producer"):
            before, after = await roll_back(broker.log, info.id, 8)
            assert before >= 20
            results = await asyncio.gather(*readers)
            late = await collect(broker, info.id)
        assert f"Redis lost entries {after + 1}..{before}" in caplog.text
        for events in [*results, late]:
            check_complete(events, len(tokenize(text)))
            assert events == late
        state = await broker.state(info.id)
        assert state.text == text
        assert state.meta.status == "done"


async def test_a_log_ended_below_what_the_hub_read_ends_its_readers(redis_url: str) -> None:
    """The rollback also lost the lease, and the generation was reaped after what was left
    (``producer_lost`` at a seq the readers already got as a token): no read after the hub's
    head can see that end, so the hub's reaper ends the readers with ``log_lost`` after the
    entries they got, instead of letting them wait forever."""
    settings = make_settings(redis_url, lease_seconds=0.3, watchdog=False)
    async with Broker.open(settings) as broker:
        log, gid = broker.log, "grolledback01"
        await log.create(gid, provider="p", model="m", owner="x", lease_ms=60_000,
                         ttl_seconds=60)
        await log.append(gid, "x", 60_000,
                         [(i, "token", {"text": f"t{i}"}, 1.0, f"t{i}") for i in range(1, 7)])
        async with broker.subscribe(gid) as cursor:
            got = [await anext(cursor) for _ in range(6)]
            assert await roll_back(log, gid, 3, lease=False) == (6, 3)
            assert await log.reap_if_orphaned(gid) == "reaped"  # at seq 4
            # The hub's reaper looks every lease period at streams quiet for one.
            async with asyncio.timeout(3 * settings.lease_seconds + 5):
                rest = [event async for event in cursor]
        assert [e.seq for e in got + rest] == list(range(1, 8))
        assert (rest[0].type, rest[0].data["code"]) == ("error", "log_lost")
        assert "lost entries this reader had read" in rest[0].data["message"]
        # A reader that starts now gets the log as Redis holds it.
        assert [(e.seq, e.type) for e in await collect(broker, gid)] == [
            (1, "token"), (2, "token"), (3, "token"), (4, "error")]


@pytest.mark.parametrize("repair", ["succeeds", "fails"])
async def test_entries_readers_got_whose_append_was_never_acknowledged_are_kept(
    redis_url: str, repair: str,
) -> None:
    """An append reaches the log and its readers, but its reply is lost (the master crashed),
    the log then loses it in the failover, and the producer cannot flush either and ends
    with ``storage_error``: its repair writes the unacknowledged entry again too, and the
    terminal entry follows it, so no seq holds two different entries.  If writing it again
    fails too (whatever broke the flush breaks it again), the producer still writes its
    terminal entry, after every seq it sent: later readers get a ``gap`` there instead."""
    settings = make_settings(redis_url, append_batch=1, watchdog=False)
    text = " ".join(f"w{i}" for i in range(40))
    async with Broker.open(settings) as broker:
        log = broker.log
        real_append = log.append
        read_15 = asyncio.Event()
        failures = 0

        async def append(gid: str, owner: str, lease_ms: int,
                         entries: list[tuple[int, str, dict[str, Any], float, str]]
                         ) -> AppendResult:
            nonlocal failures
            if entries[-1][0] == 15 and (failures < 2 or repair == "fails"):
                failures += 1
                if failures == 1:
                    await real_append(gid, owner, lease_ms, entries)
                    await read_15.wait()  # a reader got seq 15 from the "old master"
                    assert await roll_back(log, gid, 4) == (15, 11)
                # Not a connection error: the producer gives up at once (here, rather than
                # after append_retry_seconds of a failover that does not end).
                raise ResponseError("the reply was lost")
            return await real_append(gid, owner, lease_ms, entries)

        log.append = append  # type: ignore[method-assign]
        info = await broker.start(GenerationRequest(
            [{"role": "user", "content": "x"}], params={"text": text, "tokens_per_second": 100}))

        async def early_reader() -> list[Event]:
            events = []
            async with broker.subscribe(info.id) as cursor:
                async for event in cursor:
                    events.append(event)
                    if event.seq == 15:
                        read_15.set()
            return events

        early = await asyncio.wait_for(early_reader(), 30)
        late = await collect(broker, info.id)
    assert failures == (2 if repair == "succeeds" else 3)
    assert [(e.seq, e.type) for e in early][-2:] == [(15, "token"), (16, "error")]
    assert early[-1].data["code"] == "storage_error"
    if repair == "succeeds":
        assert early == late
    else:
        assert [(e.seq, e.type) for e in late][-2:] == [(15, "gap"), (16, "error")]
        assert late[-2].data == {"first_missing": 12, "last_missing": 15}
        assert early[:11] == late[:11]
        assert late[-1] == early[-1]
