"""tokentee on real three-master Redis Clusters (started by ``tests/redis_cluster.py``):
SSE fan-out, resume and cancel for generations on every master, the hub's per-slot reads
and their connections, the durable consumers, the wire format's ``XREAD`` loop, a slot
migrating and a master failing over mid-stream, lease renewal, TLS, the bench, and a subset
of the core tests.  (The ACL users are in ``test_cluster_acl.py``.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trustme
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from broker.connections import blocking_client, command_client, is_cluster_url
from broker.errors import RedisUnavailable
from broker.providers.base import GenerationRequest
from broker.providers.simulated import tokenize
from broker.service import Broker
from broker.settings import Settings
from consumers.analytics import Analytics
from consumers.sentences import Sentences
from tests import (
    test_api,
    test_bench,
    test_channels,
    test_connections,
    test_hub,
    test_idempotency,
    test_snapshot,
)
from tests.conftest import RUN_PREFIX, make_settings, running_server
from tests.redis_cluster import LocalCluster, cluster_binaries, redis_cluster, start_cluster
from tests.test_api import read_sse
from tests.test_consumers import consumed, expected_sentences, until

__all__ = ["redis_cluster"]  # the fixture, imported for pytest


@pytest.fixture
def cluster_settings(redis_cluster: LocalCluster) -> Settings:
    # Each test has its own key prefix; the cluster lives only for this session.  The tests
    # open dozens of event streams from one address (the per-client limit is tested in
    # test_cluster_acl.py, with the default limit, on this cluster).
    return make_settings(redis_cluster.url, max_sse_per_client=0)


def master_of(cluster: LocalCluster, settings: Settings, gid: str, via: int | None = None
              ) -> int:
    """The port of the master that owns ``gid``'s keys (as the node on ``via`` sees it)."""
    return cluster.master_of_slot(
        key_slot(f"{settings.key_prefix}:{{{gid}}}:log".encode()), via)


async def spread(http: httpx.AsyncClient, cluster: LocalCluster, settings: Settings,
                 per_master: int, **params: Any) -> dict[int, list[str]]:
    """Start generations over HTTP until each master owns at least ``per_master`` of them
    (ids are random, so this takes about 3 x per_master); returns them by master port.
    The bound only catches a broken slot map: with 20 x per_master tries one master missed
    every id in about one run in a thousand (CI saw it), with 100 x it is (2/3)**100."""
    by_master: dict[int, list[str]] = {port: [] for port in cluster.ports}
    for _ in range(per_master * 100):
        if min(len(g) for g in by_master.values()) >= per_master:
            return by_master
        response = await http.post("/v1/streams", json={"prompt": "x", "params": params})
        assert response.status_code == 201, response.text
        gid = response.json()["id"]
        by_master[master_of(cluster, settings, gid)].append(gid)
    raise AssertionError(f"generation ids did not reach every master: {by_master}")


@pytest.fixture
async def cluster_broker(cluster_settings: Settings) -> AsyncIterator[Broker]:
    async with Broker.open(cluster_settings) as broker:
        yield broker


@pytest.fixture
async def cluster_http(cluster_settings: Settings, cluster_broker: Broker
                       ) -> AsyncIterator[httpx.AsyncClient]:
    async with running_server(cluster_settings, cluster_broker) as url, \
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as http:
        yield http


def test_cluster_url_forms() -> None:
    settings = Settings(redis_url="redis://h:1")
    assert is_cluster_url("redis+cluster://h:1")
    assert is_cluster_url("rediss+cluster://h:1")
    assert not is_cluster_url("redis://h:1", settings)
    flagged = Settings(redis_url="redis://h:1", redis_cluster=True)
    assert is_cluster_url("redis://h:1", flagged)
    assert not is_cluster_url("unix:///tmp/redis.sock", flagged)  # the embedded Redis


async def test_many_generations_on_every_master_reach_every_sse_client_whole(
    redis_cluster: LocalCluster, cluster_settings: Settings, cluster_broker: Broker,
    cluster_http: httpx.AsyncClient,
) -> None:
    text = " ".join(f"word{i}" for i in range(60))
    by_master = await spread(cluster_http, redis_cluster, cluster_settings, 3,
                             text=text, tokens_per_second=8)
    gids = [gid for gids in by_master.values() for gid in gids]
    # Several SSE clients per generation, all connected while the generations run.
    readers = {gid: [asyncio.create_task(read_sse(cluster_http, gid)) for _ in range(3)]
               for gid in gids}
    # While they run, the hub reads each slot with live streams separately.
    slots = {key_slot(f"{cluster_settings.key_prefix}:{{{gid}}}:log".encode()) for gid in gids}
    async def subscribed() -> bool:  # the readers' subscriptions land asynchronously
        return cluster_broker.hub.stream_count == len(gids)
    await until(subscribed, 10)
    assert cluster_broker.hub.read_groups == len(slots) >= 3

    async def all_blocked() -> bool:
        return all(g.blocked for g in cluster_broker.hub._groups.values())
    await until(all_blocked, 10)  # every slot's read in flight at once, each on a connection
    for gid, tasks in readers.items():
        results = await asyncio.gather(*tasks)
        status = (await cluster_http.get(f"/v1/streams/{gid}")).json()
        assert status["status"] == "done"
        assert status["text"] == text
        for events in results:
            assert [e.event for e in events] == ["token"] * len(tokenize(text)) + ["done"]
            assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
            assert "".join(json.loads(e.data)["text"] for e in events[:-1]) == text
            assert [(e.id, e.data) for e in events] == [(e.id, e.data) for e in results[0]]
    # One hub connection per slot read (the documented cost), opened while the reads ran at
    # once and kept in the client's pool; at most one more, the one the client used to load
    # its command table.  (Counted now: a connection still in its handshake has no name.)
    hub_connections = 0
    for port in redis_cluster.ports:
        with redis.Redis(port=port) as node:
            hub_connections += sum(1 for c in node.client_list()
                                   if c["name"] == f"{cluster_settings.key_prefix}:hub")
    assert len(slots) <= hub_connections <= len(slots) + 1
    # A slot's reader ends with its last live stream.
    async def no_reads() -> bool:
        return cluster_broker.hub.read_groups == 0
    await until(no_reads, cluster_settings.block_ms / 1000 + 5)


async def test_resume_by_last_event_id_on_every_master(
    redis_cluster: LocalCluster, cluster_settings: Settings, cluster_http: httpx.AsyncClient,
) -> None:
    by_master = await spread(cluster_http, redis_cluster, cluster_settings, 1,
                             max_tokens=40, tokens_per_second=100)
    for gids in by_master.values():
        gid = gids[0]
        first = await read_sse(cluster_http, gid, stop_after=15)
        rest = await read_sse(cluster_http, gid, headers={"Last-Event-ID": first[-1].id})
        events = first + rest
        assert [int(e.id) for e in events] == list(range(1, 42))
        assert events[-1].event == "done"


async def test_cancel_on_every_master(
    redis_cluster: LocalCluster, cluster_settings: Settings, cluster_http: httpx.AsyncClient,
) -> None:
    by_master = await spread(cluster_http, redis_cluster, cluster_settings, 1,
                             max_tokens=100_000, tokens_per_second=50)
    gids = [gids[0] for gids in by_master.values()]
    readers = [asyncio.create_task(read_sse(cluster_http, gid)) for gid in gids]
    for gid in gids:
        response = await cluster_http.post(f"/v1/streams/{gid}/cancel")
        assert response.status_code == 202, response.text
    for events in await asyncio.gather(*readers):
        assert events[-1].event == "cancelled"
        assert all(e.event == "token" for e in events[:-1])


async def test_cancel_through_another_process_reaches_the_producer(
    redis_cluster: LocalCluster, cluster_settings: Settings, cluster_broker: Broker,
) -> None:
    """The control stream (a global key, in a slot of its own) carries the cancel."""
    async with Broker.open(cluster_settings) as other:
        infos = [await cluster_broker.start(GenerationRequest(
            [{"role": "user", "content": "x"}],
            params={"max_tokens": 100_000, "tokens_per_second": 50})) for _ in range(6)]
        for info in infos:
            assert await other.log.request_cancel(info.id) == "running"
        for info in infos:
            events = [e async for e in other.events(info.id)]
            assert events[-1].type == "cancelled"


async def test_unread_generations_on_every_master_are_cancelled_and_read_ones_are_not(
    redis_cluster: LocalCluster,
) -> None:
    """cancel_unread_after on a cluster: one hub's presence reports span every master (the
    cluster pipeline, one EVAL per slot), and each producer's check reads its own slot."""
    settings = make_settings(redis_cluster.url, max_sse_per_client=0, lease_seconds=0.9)
    slow = GenerationRequest([{"role": "user", "content": "x"}],
                             params={"max_tokens": 1_000, "tokens_per_second": 10})
    read: dict[int, str] = {}
    unread: list[str] = []
    async with Broker.open(settings) as producing, Broker.open(settings) as reading, \
            contextlib.AsyncExitStack() as readers:
        cursors = []
        while len(read) < len(redis_cluster.ports) or len(unread) < len(redis_cluster.ports):
            gid = (await producing.start(slow, cancel_unread_after=0.6)).id
            master = master_of(redis_cluster, settings, gid)
            if master not in read:
                read[master] = gid
                cursors.append(await readers.enter_async_context(reading.subscribe(gid)))
            else:
                unread.append(gid)
        async for event in cursors[-1]:  # 2 s at 10 tokens a second: three grace periods
            if event.seq >= 20:
                break
        for gid in unread:
            async with asyncio.timeout(10):
                await producing.manager.wait(gid)
            assert (await producing.state(gid)).meta.cancel_reason == "unread"
        for gid in read.values():
            assert (await producing.state(gid)).meta.status == "running"
        await readers.aclose()
        for gid in read.values():
            async with asyncio.timeout(10):
                await producing.manager.wait(gid)
            assert (await producing.state(gid)).meta.cancel_reason == "unread"


async def test_durable_consumers_process_generations_on_every_master(
    redis_cluster: LocalCluster, cluster_settings: Settings,
) -> None:
    text = "One sentence here. Another one there! And a third?"
    async with Broker.open(cluster_settings, consumers=[Sentences(None), Analytics()]) as broker, \
            running_server(cluster_settings, broker) as url, \
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as http:
        by_master = await spread(http, redis_cluster, cluster_settings, 2,
                                 text=text, tokens_per_second=200)
        gids = [gid for gids in by_master.values() for gid in gids]
        for gid in gids:
            await consumed(broker.consumer_store, gid, "sentences", "analytics")
            body = (await http.get(f"/v1/streams/{gid}/sentences")).json()
            assert [s["text"] for s in body["sentences"]] == expected_sentences(text)
            records = [r async for r in broker.records(gid, "sentences")]  # blocking XREAD
            assert [r["text"] for r in records] == expected_sentences(text)
            stats = (await http.get(f"/v1/streams/{gid}/stats")).json()
            assert stats["tokens"] == len(tokenize(text))
            assert stats["complete"] is True

        async def added() -> bool:
            totals = await broker.consumer_store.totals("analytics")
            return totals.get("generations|done|stop|simulated|simulated-1") == len(gids)
        await until(added)  # totals are added after the checkpoint
        # The catalog (a global key) announced every one of them.
        announced = []
        async for announcement in broker.generations(after="0"):
            announced.append(announcement.id)
            if len(announced) == len(gids):
                break
        assert sorted(announced) == sorted(gids)


async def test_the_wire_format_xread_loop_per_slot(
    redis_cluster: LocalCluster, cluster_settings: Settings, cluster_broker: Broker,
    cluster_http: httpx.AsyncClient,
) -> None:
    """The README's loop works with a cluster client on every master; one XREAD over
    generations of different slots is refused, so a follower reads per slot."""
    by_master = await spread(cluster_http, redis_cluster, cluster_settings, 1,
                             text="Hello, wire format.", tokens_per_second=20)
    prefix = cluster_settings.key_prefix
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0], protocol=2,
                          decode_responses=True, socket_timeout=10)
    try:
        logs = []
        for gids in by_master.values():
            gid = gids[0]
            log, meta = f"{prefix}:{{{gid}}}:log", f"{prefix}:{{{gid}}}:meta"
            logs.append(log)
            last, text = 0, ""
            while True:
                reply = await client.xread({log: f"0-{last}"}, count=100, block=5000)
                if not reply:
                    assert await client.exists(meta)
                    continue
                _key, entries = reply[0]
                for entry_id, fields in entries:
                    seq = int(entry_id.split("-")[1])
                    assert seq == last + 1
                    last = seq
                    if fields["type"] == "token":
                        text += json.loads(fields["data"])["text"]
                if fields["type"] != "token":
                    break
            assert fields["type"] == "done"
            assert text == "Hello, wire format."
        with pytest.raises(RedisClusterException):
            await client.xread({log: "0-0" for log in logs}, count=1)
    finally:
        await client.aclose()


# --- a subset of the core tests, on the cluster ----------------------------------------

BROKER_TESTS: list[Callable[[Broker], Awaitable[None]]] = [
    test_hub.test_identical_delivery_to_many_readers_including_late_joiner,
    test_hub.test_resume_after_id_has_no_gap_and_no_duplicate,
    test_hub.test_resume_points_are_validated,
    test_hub.test_trimmed_entries_are_reported_as_a_gap,
    test_hub.test_upstream_error_mid_stream_ends_with_error,
    test_channels.test_parallel_generations_of_a_channel_in_one_iterator,
    test_channels.test_resume_from_a_position_loses_and_repeats_nothing,
    test_idempotency.test_a_key_whose_generation_is_gone_starts_a_new_one,
    test_snapshot.test_python_snapshot,
]
HTTP_TESTS: list[Callable[[httpx.AsyncClient], Awaitable[None]]] = [
    test_api.test_create_status_and_events,
    test_api.test_identical_delivery_to_many_clients_and_a_late_joiner,
    test_api.test_last_event_id_header_wins_over_after,
    test_api.test_resume_after_terminal_event_is_204,
    test_api.test_resume_beyond_the_end_is_400,
    test_api.test_cancel_ends_the_stream_with_cancelled,
    test_api.test_token_text_cannot_forge_sse_fields,
    test_idempotency.test_same_key_different_request_is_refused,
]


@pytest.mark.parametrize("core_test", BROKER_TESTS, ids=lambda t: t.__name__)
async def test_core_broker_behaviour_on_the_cluster(
    core_test: Callable[[Broker], Awaitable[None]], cluster_broker: Broker,
) -> None:
    await core_test(cluster_broker)


@pytest.mark.parametrize("core_test", HTTP_TESTS, ids=lambda t: t.__name__)
async def test_core_http_behaviour_on_the_cluster(
    core_test: Callable[[httpx.AsyncClient], Awaitable[None]], cluster_http: httpx.AsyncClient,
) -> None:
    await core_test(cluster_http)


def ids_in_one_slot(prefix: str, count: int) -> list[str]:
    """``count`` generation ids whose keys share one hash slot (found by trying ids)."""
    seen: dict[int, list[str]] = {}
    i = 0
    while True:
        gid = f"gsameslot{i:06d}"
        bucket = seen.setdefault(key_slot(f"{prefix}:{{{gid}}}:log".encode()), [])
        bucket.append(gid)
        if len(bucket) == count:
            return bucket
        i += 1


async def test_a_second_generation_in_a_slot_wakes_that_slots_read(
    cluster_broker: Broker, cluster_settings: Settings,
) -> None:
    """The slot's read is blocked on the first generation; the second one, in the same slot,
    joins through the slot's wake stream, not after the block time."""
    log = cluster_broker.log
    first, second = ids_in_one_slot(cluster_settings.key_prefix, 2)
    for gid in (first, second):
        await log.create(gid, provider="p", model="m", owner="x", lease_ms=60_000,
                         ttl_seconds=60)
    hub = cluster_broker.hub
    async with hub.subscribe(first) as a:
        async def blocked() -> bool:
            groups = list(hub._groups.values())
            return len(groups) == 1 and groups[0].blocked
        await until(blocked, 10)
        async with hub.subscribe(second) as b:
            assert hub.read_groups == 1
            waiting = asyncio.ensure_future(anext(b))

            async def live() -> bool:  # caught up with the (empty) log: only the hub feeds it
                return not b._behind
            await until(live, 10)
            await log.append(second, "x", 60_000, [(1, "token", {"text": "t"}, 1.0, "t")])
            # Far below block_ms (2 s here), while the read blocked on ``first`` alone.
            async with asyncio.timeout(cluster_settings.block_ms / 1000 / 2):
                event = await waiting
            assert (event.seq, event.type) == (1, "token")
            await log.append(first, "x", 60_000, [(1, "token", {"text": "u"}, 1.0, "u")])
            assert (await anext(a)).data == {"text": "u"}


async def test_a_slot_moving_to_another_master_mid_stream_loses_nothing(
    redis_cluster: LocalCluster, cluster_settings: Settings, cluster_broker: Broker,
) -> None:
    """The slot of a live generation migrates while its producer writes and the hub's read
    of that slot blocks: redis-py follows ASK/MOVED (producer) and the hub re-routes its
    read to the new owner; every reader still gets every entry once, in order."""
    text = " ".join(f"w{i}" for i in range(80))
    info = await cluster_broker.start(GenerationRequest(
        [{"role": "user", "content": "x"}], params={"text": text, "tokens_per_second": 40}))
    slot = key_slot(f"{cluster_settings.key_prefix}:{{{info.id}}}:log".encode())
    source = redis_cluster.master_of_slot(slot)
    target = next(p for p in redis_cluster.ports if p != source)
    readers = [asyncio.create_task(test_hub.collect(cluster_broker, info.id)) for _ in range(3)]
    async with cluster_broker.subscribe(info.id) as cursor:
        async for event in cursor:
            if event.seq == 20:
                break
    await asyncio.to_thread(redis_cluster.move_slot, slot, target)
    assert redis_cluster.master_of_slot(slot) == target
    for events in await asyncio.gather(*readers):
        test_hub.check_complete(events, len(tokenize(text)))
        assert "".join(e.data["text"] for e in events[:-1]) == text
    assert (await cluster_broker.state(info.id)).text == text


async def test_a_connection_torn_down_under_a_write_is_retried(
    cluster_settings: Settings, cluster_broker: Broker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When redis-py's cluster client reloads its slot map (a failover) it disconnects a
    node's connections, also one that a command is being sent on; redis-py then fails with a
    bare ``AttributeError`` from its own connection code (seen in CI after a master kill).
    The broker takes that for the lost connection it is: the producer writes again, and the
    generation ends ``done`` with every token, once."""
    text = " ".join(f"w{i}" for i in range(30))
    info = await cluster_broker.start(GenerationRequest(
        [{"role": "user", "content": "x"}], params={"text": text, "tokens_per_second": 30}))
    log_key = cluster_broker.log.keys(info.id).log.encode()
    send = AbstractConnection._send_packed_command
    torn: list[bytes] = []

    async def torn_down(self: AbstractConnection, command: Any) -> None:
        chunks = list(command)
        packed = b"".join(chunks)
        if not torn and b"EVALSHA" in packed.upper() and log_key in packed:
            torn.append(packed)
            assert self._writer is not None
            self._writer.close()  # what a concurrent disconnect does, and leaves
            self._writer = None
        await send(self, chunks)

    readers = [asyncio.create_task(test_hub.collect(cluster_broker, info.id)) for _ in range(2)]
    async with cluster_broker.subscribe(info.id) as cursor:
        async for event in cursor:
            if event.seq == 5:
                break
    monkeypatch.setattr(AbstractConnection, "_send_packed_command", torn_down)
    for events in await asyncio.gather(*readers):
        test_hub.check_complete(events, len(tokenize(text)))
        assert "".join(e.data["text"] for e in events[:-1]) == text
    assert len(torn) == 1  # a log write of this generation went out on a torn connection
    assert (await cluster_broker.state(info.id)).meta.status == "done"

    # A TypeError that is not the connection's own stays what it is (not a Redis failure).
    async def mistaken(self: AbstractConnection, command: Any) -> None:
        chunks = list(command)
        if b"mistaken-key" in b"".join(chunks):
            raise TypeError("not the connection's")
        await send(self, chunks)

    monkeypatch.setattr(AbstractConnection, "_send_packed_command", mistaken)
    with pytest.raises(TypeError, match="not the connection's"):
        await cluster_broker.redis.get(f"{cluster_settings.key_prefix}:mistaken-key")


def test_bench_on_the_cluster(redis_cluster: LocalCluster) -> None:
    """``tokentee bench`` against a cluster: Redis figures added up over the masters."""
    prefix = f"{RUN_PREFIX}-{secrets.token_hex(4)}"
    done, report = test_bench.run_bench(redis_cluster.url, prefix, "api")
    assert done.returncode == 0, done.stderr
    assert report["ok"] is True
    assert report["deliveries"]["received"] == report["deliveries"]["expected"]
    stats = report["redis"]
    assert stats["clients_outside_broker"] >= len(redis_cluster.ports)  # a probe per master
    assert stats["broker_connections_peak"] >= stats["broker_connections_idle"] > 0
    assert stats["command_calls"]["evalsha"] > 0
    with redis_cluster.client() as client:
        assert list(client.scan_iter(match=f"{prefix}*")) == []


@pytest.fixture(scope="module")
def replicated_cluster() -> Iterator[LocalCluster]:
    binaries = cluster_binaries()
    if binaries is None:
        pytest.skip("no redis-server 7+ with redis-cli found to start a local Redis Cluster")
    cluster = start_cluster(*binaries, masters=3, replicas=1)
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_failover_mid_stream_loses_nothing(replicated_cluster: LocalCluster) -> None:
    """The master of a live generation's slot hands over to its replica (``CLUSTER
    FAILOVER``) while the producer writes and the hub's read of that slot blocks on the old
    master: the read fails or is redirected, the hub reads from the new master, and every
    reader gets every entry once, in order."""
    settings = make_settings(replicated_cluster.url)
    text = " ".join(f"w{i}" for i in range(80))
    async with Broker.open(settings) as broker:
        info = await broker.start(GenerationRequest(
            [{"role": "user", "content": "x"}], params={"text": text, "tokens_per_second": 40}))
        slot = key_slot(f"{settings.key_prefix}:{{{info.id}}}:log".encode())
        old_master = replicated_cluster.master_of_slot(slot)
        replica = replicated_cluster.replica_of(old_master)
        readers = [asyncio.create_task(test_hub.collect(broker, info.id)) for _ in range(3)]
        async with broker.subscribe(info.id) as cursor:
            async for event in cursor:
                if event.seq == 20:
                    break
        with redis.Redis(port=replica) as node:
            node.execute_command("CLUSTER FAILOVER")

        async def promoted() -> bool:
            try:
                owner = await asyncio.to_thread(replicated_cluster.master_of_slot, slot)
            except LookupError:  # the asked node's view misses the slot mid-failover
                return False
            return owner == replica
        await until(promoted, 15)
        for events in await asyncio.gather(*readers):
            test_hub.check_complete(events, len(tokenize(text)))
            assert "".join(e.data["text"] for e in events[:-1]) == text
        assert (await broker.state(info.id)).text == text


@pytest.fixture
def killable_cluster() -> Iterator[LocalCluster]:
    """A cluster of its own for a test that kills a master (the dead node stays in the
    others' view), with a 1 s node timeout so that its replica takes over in about 2 s."""
    binaries = cluster_binaries()
    if binaries is None:
        pytest.skip("no redis-server 7+ with redis-cli found to start a local Redis Cluster")
    cluster = start_cluster(*binaries, masters=3, replicas=1, node_timeout_ms=1000)
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_master_killed_mid_stream_after_unreplicated_writes(
    killable_cluster: LocalCluster, caplog: pytest.LogCaptureFixture,
) -> None:
    """``kill -9`` of the master of a live generation's slot after it acknowledged entries
    that readers got but its replica never received (the replica is paused and its
    replication link cut, so the loss is certain, not a race).  The replica takes over with
    a log that lacks them; the producer's next append finds the log behind and writes them
    again, identical.  Every reader (hub cursors, an SSE client, a durable consumer) ends
    with ``done`` soon after the promotion, with every entry once, in order, the same
    content everywhere; new generations work on the new master; ``/readyz`` recovers.

    The master killed is the node the broker's URL names, which redis-py asks first when it
    reloads its slot map: the harder case for the clients, and the same in every run."""
    cluster = killable_cluster
    settings = make_settings(cluster.url)
    text = " ".join(f"w{i}" for i in range(100))
    tokens = len(tokenize(text))
    master = cluster.ports[0]
    assert master in {port for *_, port in cluster.slot_ranges()}, "the first node is a replica"
    replica = cluster.replica_of(master)
    live = next(p for p in cluster.ports if p not in (master, replica))  # to ask afterwards
    async with Broker.open(settings, consumers=[Analytics()]) as broker, \
            running_server(settings, broker) as url, \
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as http:
        for _ in range(100):  # ids are random: about three tries
            info = await broker.start(GenerationRequest(
                [{"role": "user", "content": "x"}],
                params={"text": text, "tokens_per_second": 40}))
            if master_of(cluster, settings, info.id) == master:
                break
            await broker.cancel(info.id)
        else:
            raise AssertionError("no generation id hashed to the first node")
        gid, meta = info.id, broker.log.keys(info.id).meta
        slot = key_slot(broker.log.keys(gid).log.encode())
        master_process = cluster.processes[cluster.ports.index(master)]
        replica_process = cluster.processes[cluster.ports.index(replica)]
        readers = [asyncio.create_task(test_hub.collect(broker, gid)) for _ in range(3)]
        sse = asyncio.create_task(read_sse(http, gid))
        async with broker.subscribe(gid) as cursor:
            async for event in cursor:
                if event.seq == 10:
                    break
        with cluster.node(master) as node:
            # A new replica gets the stream only after its first ACK: let it catch up first.
            assert await asyncio.to_thread(node.execute_command, "WAIT", 1, 5000) == 1
            replica_process.send_signal(signal.SIGSTOP)
            try:
                node.execute_command("CLIENT", "KILL", "TYPE", "replica")
                replicated = int(node.hget(meta, "last_seq") or 0)  # at most this much
                async with broker.subscribe(gid, after=replicated) as cursor:
                    async for event in cursor:  # readers get what the replica never will
                        if event.seq == replicated + 8:
                            break
                master_process.kill()
                await asyncio.to_thread(master_process.wait)
            finally:
                replica_process.send_signal(signal.SIGCONT)

        async def promoted() -> bool:
            try:
                owner = await asyncio.to_thread(cluster.master_of_slot, slot, live)
            except LookupError:  # no owner in that node's view mid-failover
                return False
            return owner == replica
        with caplog.at_level(logging.WARNING, logger="broker.producer"):
            await until(promoted, 20)
            async with asyncio.timeout(20):  # no reader hangs: block time plus backoffs
                results = await asyncio.gather(*readers)
                sse_events = await sse
        assert f"Redis lost entries {replicated + 1}.." in caplog.text  # the loss happened
        for events in results:
            test_hub.check_complete(events, tokens)
            assert events == results[0]
        assert "".join(e.data["text"] for e in results[0][:-1]) == text
        test_api.check_stream(sse_events, tokens)
        assert [(int(e.id), e.event, json.loads(e.data)) for e in sse_events] == [
            (e.seq, e.type, e.data) for e in results[0]]
        assert (await broker.state(gid)).text == text
        await consumed(broker.consumer_store, gid, "analytics")
        stats = (await http.get(f"/v1/streams/{gid}/stats")).json()
        assert (stats["tokens"], stats["complete"]) == (tokens, True)

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200
        await until(ready, 10)
        assert broker.hub.running
        # New generations on the slot's new master (ids are random: about 3 tries each).
        for _ in range(100):
            info = await broker.start(GenerationRequest(
                [{"role": "user", "content": "x"}],
                params={"max_tokens": 10, "tokens_per_second": 0}))
            if master_of(cluster, settings, info.id, via=live) == replica:
                break
        else:
            raise AssertionError("no generation id hashed to the new master")
        test_hub.check_complete([e async for e in broker.events(info.id)], 10)


async def test_a_quiet_producer_keeps_its_lease_on_the_cluster(
    redis_cluster: LocalCluster,
) -> None:
    """Entries further apart than the lease: only the lease renewer (a pipeline of scripts
    over leases in many slots) keeps the generation from being reaped by the watchdog."""
    settings = make_settings(redis_cluster.url, lease_seconds=1.0)
    async with Broker.open(settings) as broker:
        infos = [await broker.start(GenerationRequest(
            [{"role": "user", "content": "x"}],
            params={"text": "slow but alive", "tokens_per_second": 0.4})) for _ in range(3)]
        for info in infos:
            events = [e async for e in broker.events(info.id)]
            assert [e.type for e in events] == ["token"] * 3 + ["done"], events[-1].data
        assert broker.watchdog is None or broker.watchdog.reaped == 0


async def test_cancelled_blocking_reads_on_cluster_clients_never_hand_over_a_reply(
    cluster_settings: Settings,
) -> None:
    """The core test of the CVE-2023-28858 class, on a cluster client: a one-reader client,
    and the shared readers' client with several reads cancelled at once."""
    await test_connections.test_cancelled_blocking_reads_never_hand_over_an_unread_reply(
        cluster_settings)
    url = cluster_settings.redis_url or ""
    shared = blocking_client(url, cluster_settings, "readers", many=True)
    writer = command_client(url, cluster_settings)
    rng = random.Random(11)
    streams = [f"{cluster_settings.key_prefix}:{{s{n}}}:probe" for n in range(3)]
    try:
        for i in range(100):
            reads = [asyncio.create_task(shared.xread({s: "$"}, block=50)) for s in streams]
            await asyncio.sleep(rng.random() * 0.004)
            if rng.random() < 0.5:
                await writer.xadd(rng.choice(streams), {"i": str(i)}, maxlen=10)
            for read in reads:
                read.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
            key = f"{cluster_settings.key_prefix}:probe:{i}"
            await shared.set(key, f"value-{i}")
            assert await shared.get(key) == f"value-{i}".encode()
    finally:
        await shared.aclose()
        await writer.aclose()


async def test_a_plain_url_with_the_cluster_setting(redis_cluster: LocalCluster) -> None:
    settings = make_settings(f"redis://127.0.0.1:{redis_cluster.ports[1]}", redis_cluster=True)
    async with Broker.open(settings) as broker:
        assert isinstance(broker.redis, RedisCluster)
        info = await broker.start(GenerationRequest(
            [{"role": "user", "content": "x"}], params={"max_tokens": 10, "tokens_per_second": 0}))
        test_hub.check_complete([e async for e in broker.events(info.id)], 10)


async def test_a_cluster_client_closes_its_connections_after_a_failed_read(
    redis_cluster: LocalCluster,
) -> None:
    """A blocking read that times out leaves redis-py's cluster client waiting to reload
    its slot map, and redis-py's ``aclose`` then closes nothing; ours still closes every
    connection (the broker's blocking clients leaked theirs when it stopped just after a
    failover)."""
    settings = make_settings(redis_cluster.url, block_ms=200, redis_timeout_slack_seconds=0.2)
    url = settings.redis_url or ""
    name = f"{settings.key_prefix}:probe"
    client = blocking_client(url, settings, "probe")
    with pytest.raises(redis.exceptions.TimeoutError):
        # BLOCK above the socket timeout (0.4 s): the read times out on the client side.
        await client.xread({f"{settings.key_prefix}:{{p}}:quiet": "$"}, block=5_000)
    await client.aclose()

    async def all_closed() -> bool:
        for port in redis_cluster.ports:
            with redis_cluster.node(port) as node:
                if any(c.get("name") == name for c in node.client_list()):
                    return False
        return True
    await until(all_closed, 10)


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[LocalCluster]:
    binaries = cluster_binaries()
    if binaries is None:
        pytest.skip("no redis-server 7+ with redis-cli found to start a local Redis Cluster")
    try:
        cluster = start_cluster(*binaries, tls=True)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"redis-server could not run a TLS cluster (built without TLS?): {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_tls_cluster_by_rediss_cluster_url(
    tls_cluster: LocalCluster, tmp_path: Path,
) -> None:
    """``rediss+cluster://...?ssl_ca_certs=`` reaches every master over TLS, and a server
    certificate from another CA is refused at startup."""
    settings = make_settings(tls_cluster.url, max_sse_per_client=0)
    assert settings.redis_url is not None
    assert settings.redis_url.startswith("rediss+cluster://")
    async with Broker.open(settings, consumers=[Analytics()]) as broker, \
            running_server(settings, broker) as url, \
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as http:
        by_master = await spread(http, tls_cluster, settings, 1, max_tokens=20,
                                 tokens_per_second=200)
        for gids in by_master.values():
            events = await read_sse(http, gids[0])
            test_api.check_stream(events, 20)
            await consumed(broker.consumer_store, gids[0], "analytics")
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    wrong = make_settings(tls_cluster.url.replace(str(tls_cluster.ca_file), str(other_ca)))
    with pytest.raises(RedisUnavailable, match="certificate verify failed"):
        async with Broker.open(wrong):
            pass
