"""The README's least-privilege ACL users, with its cluster additions, on the test cluster.

ACLs are per node, so the users are set on every master.  The API runs as the API user and
both consumer types run as ``tokentee consume`` processes as the worker user, with
generations on every master; every node's ``ACL LOG`` must stay empty: a command the
cluster client needs (``CLUSTER SLOTS``, ``COMMAND``) but the README
does not grant fails here even where the code swallows the error.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from broker.connections import blocking_client, command_client
from broker.hub import Hub
from broker.log import GenerationLog
from broker.service import Broker
from consumers.store import ConsumerStore
from tests.conftest import running_server
from tests.redis_cluster import LocalCluster, redis_cluster
from tests.test_cluster import ids_in_one_slot
from tests.test_consumer_processes import live_workers
from tests.test_consumers import expected_sentences, until
from tests.test_redis_tls_acl import settings_for, sse_text, stop

__all__ = ["redis_cluster"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(90)

README = (Path(__file__).parent.parent / "README.md").read_text()
PREFIX = "tokentee"
API_PASSWORD = "api-" + secrets.token_hex(8)
WORKER_PASSWORD = "worker-" + secrets.token_hex(8)
TEXT = "One read upstream. Many readers on three masters! Do the workers keep up? They do."


def cluster_acl() -> dict[str, str]:
    """user -> its README line with the README's cluster additions, without ``user``."""
    security = README[README.index("\n## Securing Redis"):]
    block = re.search(r"```acl\n(.*?)```", security, flags=re.S)
    assert block is not None, "the README's Redis security section has no acl block"
    cluster = README[README.index("\n## Redis Cluster"):]
    extra = dict(re.findall(r"^- `(tokentee-\w+)`: `([^`]+)`$", cluster, flags=re.M))
    assert set(extra) == {"tokentee-api", "tokentee-worker"}, extra
    lines = {}
    for line in block.group(1).strip().splitlines():
        user = line.split()[1]
        lines[user] = (line.removeprefix("user ").replace("<api-password>", API_PASSWORD)
                       .replace("<worker-password>", WORKER_PASSWORD) + " " + extra[user])
    return lines


def url(cluster: LocalCluster, user: str, password: str) -> str:
    return f"redis+cluster://{user}:{password}@127.0.0.1:{cluster.ports[0]}"


@pytest.fixture(scope="module")
def users(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    for port in redis_cluster.ports:
        with redis.Redis(port=port) as node:
            for line in cluster_acl().values():
                node.execute_command("ACL", "SETUSER", *line.split())
    try:
        yield redis_cluster
    finally:
        for port in redis_cluster.ports:
            with redis.Redis(port=port) as node:
                node.execute_command("ACL", "DELUSER", "tokentee-api", "tokentee-worker")


@pytest.fixture
def no_denials(users: LocalCluster) -> Iterator[None]:
    for port in users.ports:
        with redis.Redis(port=port) as node:
            node.acl_log_reset()
    yield
    for port in users.ports:
        with redis.Redis(port=port) as node:
            denials = node.acl_log()
            assert denials == [], f"ACL denials on {port}: {denials}"


def worker(cluster: LocalCluster, ctype: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": url(cluster, "tokentee-worker", WORKER_PASSWORD),
           "TOKENTEE_KEY_PREFIX": PREFIX, "TOKENTEE_BLOCK_MS": "2000",
           "TOKENTEE_CLAIM_IDLE_SECONDS": "2", "TOKENTEE_STALL_TIMEOUT_SECONDS": "5",
           "TOKENTEE_SHUTDOWN_GRACE_SECONDS": "1", "TOKENTEE_SENTENCES_SINK": "off"}
    return subprocess.Popen([sys.executable, "-m", "broker", "consume", ctype],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture
async def api(users: LocalCluster, no_denials: None) -> AsyncIterator[tuple[Broker, str]]:
    settings = settings_for(url(users, "tokentee-api", API_PASSWORD))
    async with Broker.open(settings) as broker, running_server(settings, broker) as base:
        yield broker, base


async def test_api_and_workers_with_the_readme_acl_users_on_a_cluster(
    users: LocalCluster, api: tuple[Broker, str],
) -> None:
    broker, base = api
    procs = [worker(users, "sentences"), worker(users, "analytics")]
    try:
        store = ConsumerStore(broker.redis, broker.log.keyspace, 3600)
        await live_workers(store, "sentences", 1)
        await live_workers(store, "analytics", 1)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            body = {"prompt": "hi", "channel": "talk",
                    "params": {"text": TEXT, "tokens_per_second": 200}}
            gids = []
            for i in range(6):
                created = await http.post("/v1/streams", json=body,
                                          headers={"Idempotency-Key": f"k-{i}"})
                assert created.status_code == 201, created.text
                gids.append(created.json()["id"])
            for gid in gids:
                assert await sse_text(http, gid) == (TEXT, "done")

                async def consumed(gid: str = gid) -> bool:
                    stats = await http.get(f"/v1/streams/{gid}/stats")
                    sentences = await http.get(f"/v1/streams/{gid}/sentences")
                    return (stats.status_code == 200 and stats.json().get("status") == "done"
                            and [s["text"] for s in sentences.json()["sentences"]]
                            == expected_sentences(TEXT))
                await until(consumed)
            slow = {"prompt": "hi", "params": {"text": TEXT, "tokens_per_second": 2}}
            running = (await http.post("/v1/streams", json=slow)).json()["id"]
            assert (await http.post(f"/v1/streams/{running}/cancel")).status_code == 202
            assert (await sse_text(http, running))[1] == "cancelled"
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200
            assert "tokentee_consumer_up" in metrics.text
    finally:
        for proc in procs:
            await stop(proc)


async def test_a_worker_users_hub_wakes_a_slots_read(
    users: LocalCluster, api: tuple[Broker, str],
) -> None:
    """A consumer worker's hub writes the wake stream of a slot (``{<id>}:hub:...``)."""
    broker, _ = api
    settings = settings_for(url(users, "tokentee-worker", WORKER_PASSWORD))
    assert settings.redis_url is not None
    first, second = ids_in_one_slot(PREFIX, 2)
    for gid in (first, second):
        await broker.log.create(gid, provider="p", model="m", owner="x", lease_ms=60_000,
                                ttl_seconds=60)
    redis_client = command_client(settings.redis_url, settings)
    hub_client = blocking_client(settings.redis_url, settings, "hub")
    try:
        log = GenerationLog.for_settings(redis_client, settings)
        async with Hub(log, hub_client, settings) as hub, hub.subscribe(first):
            async def blocked() -> bool:
                return any(g.blocked for g in hub._groups.values())
            await until(blocked, 10)
            async with hub.subscribe(second) as cursor:
                waiting = asyncio.ensure_future(anext(cursor))
                await broker.log.append(second, "x", 60_000,
                                        [(1, "token", {"text": "t"}, 1.0, "t")])
                assert (await asyncio.wait_for(waiting, 10)).seq == 1
    finally:
        await hub_client.aclose()
        await redis_client.aclose()
