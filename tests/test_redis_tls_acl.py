"""Redis over TLS with the README's least-privilege ACL users.

One TLS-only redis-server (``--port 0``) whose ACL file holds exactly the README's
``tokentee-api`` and ``tokentee-worker`` lines.  The API runs as the API user, both
consumer types run as ``tokentee consume`` processes as the worker user, and every test
ends by checking that ``ACL LOG`` recorded no denial: a command the code needs but the
README's lines do not grant fails here even where the code swallows the error.
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
from typing import Any

import httpx
import pytest
import redis
import trustme

from broker.errors import RedisUnavailable
from broker.providers.simulated import tokenize
from broker.service import Broker
from broker.settings import Settings
from consumers.store import ConsumerStore
from tests.conftest import running_server
from tests.redis_tls import TlsRedis, TlsUnsupported, start_tls_redis, tls_redis_server
from tests.test_consumer_processes import live_workers
from tests.test_consumers import expected_sentences, until

pytestmark = pytest.mark.timeout(90)

README = (Path(__file__).parent.parent / "README.md").read_text()
PREFIX = "tokentee"  # the README's lines are written for the default prefix
API_PASSWORD = "api-" + secrets.token_hex(8)
WORKER_PASSWORD = "worker-" + secrets.token_hex(8)
ADMIN_PASSWORD = "admin-" + secrets.token_hex(8)
TEXT = "Fan it out once. Every reader gets every token! Does the worker keep up? It does."


def readme_acl() -> str:
    section = README[README.index("\n## Securing Redis"):]
    block = re.search(r"```acl\n(.*?)```", section, flags=re.S)
    assert block is not None, "the README's Redis security section has no acl block"
    return (block.group(1).replace("<api-password>", API_PASSWORD)
            .replace("<worker-password>", WORKER_PASSWORD))


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedis]:
    binary = tls_redis_server()
    if binary is None:
        pytest.skip("needs redis-server 7.0 or newer (ACL key selectors); none found")
    try:
        server = start_tls_redis(binary, readme_acl(), ADMIN_PASSWORD)
    except TlsUnsupported as exc:
        pytest.skip(f"redis-server without TLS support: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin(tls_redis: TlsRedis) -> Iterator[redis.Redis]:
    client = tls_redis.admin(ADMIN_PASSWORD)
    client.flushall()  # our private server: each test starts empty
    client.acl_log_reset()
    yield client
    denials = client.acl_log()
    client.close()
    assert denials == [], f"ACL denials: {denials}"


def settings_for(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": url, "key_prefix": PREFIX, "block_ms": 2_000, "lease_seconds": 3.0,
        "shutdown_grace_seconds": 1.0, "consumers": "", "claim_idle_seconds": 2.0,
        "stall_timeout_seconds": 5.0, "sentences_sink": "off",
    }
    values.update(overrides)
    return Settings(**values)


def worker(tls_redis: TlsRedis, ctype: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": tls_redis.url("tokentee-worker", WORKER_PASSWORD),
           "TOKENTEE_KEY_PREFIX": PREFIX, "TOKENTEE_BLOCK_MS": "2000",
           "TOKENTEE_CLAIM_IDLE_SECONDS": "2", "TOKENTEE_STALL_TIMEOUT_SECONDS": "5",
           "TOKENTEE_SHUTDOWN_GRACE_SECONDS": "1", "TOKENTEE_SENTENCES_SINK": "off"}
    return subprocess.Popen([sys.executable, "-m", "broker", "consume", ctype],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.terminate()
    _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, err.decode(errors="replace")
    return err.decode(errors="replace")


async def sse_text(http: httpx.AsyncClient, gid: str, after: int = 0) -> tuple[str, str]:
    """The text of ``gid``'s token events after ``after`` and its terminal type."""
    text, terminal = [], ""
    async with http.stream("GET", f"/v1/streams/{gid}/events?after={after}") as response:
        assert response.status_code == 200
        etype = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                etype = line[7:]
            elif line.startswith("data: ") and etype == "token":
                text.append(httpx.Response(200, content=line[6:]).json()["text"])
            elif line.startswith("data: ") and etype in ("done", "error", "cancelled"):
                terminal = etype
    return "".join(text), terminal


@pytest.fixture
async def api(tls_redis: TlsRedis, admin: redis.Redis) -> AsyncIterator[tuple[Broker, str]]:
    settings = settings_for(tls_redis.url("tokentee-api", API_PASSWORD))
    async with Broker.open(settings) as broker, running_server(settings, broker) as url:
        yield broker, url


async def test_api_and_workers_run_with_the_readme_acl_users_over_tls(
    tls_redis: TlsRedis, api: tuple[Broker, str],
) -> None:
    broker, url = api
    procs = [worker(tls_redis, "sentences"), worker(tls_redis, "analytics")]
    try:
        store = ConsumerStore(broker.redis, broker.log.keyspace, 3600)
        await live_workers(store, "sentences", 1)
        await live_workers(store, "analytics", 1)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            body = {"provider": "simulated", "channel": "talk",
                    "params": {"text": TEXT, "tokens_per_second": 400},
                    "messages": [{"role": "user", "content": "hi"}]}
            created = await http.post("/v1/streams", json=body,
                                      headers={"Idempotency-Key": "k-1"})
            assert created.status_code == 201, created.text
            gid = created.json()["id"]
            replay = await http.post("/v1/streams", json=body, headers={"Idempotency-Key": "k-1"})
            assert replay.status_code == 200
            assert replay.json()["id"] == gid

            readers = await asyncio.gather(*(sse_text(http, gid) for _ in range(3)))
            assert readers == [(TEXT, "done")] * 3
            assert await sse_text(http, gid, after=5) == ("".join(tokenize(TEXT)[5:]), "done")

            async def consumed() -> bool:
                stats = await http.get(f"/v1/streams/{gid}/stats")
                sentences = await http.get(f"/v1/streams/{gid}/sentences")
                return (stats.status_code == 200 and stats.json().get("status") == "done"
                        and sentences.status_code == 200
                        and [s["text"] for s in sentences.json()["sentences"]]
                        == expected_sentences(TEXT))
            await until(consumed)
            stats = (await http.get(f"/v1/streams/{gid}/stats")).json()
            assert stats["tokens"] == len(tokenize(TEXT))

            slow = {"prompt": "hi", "params": {"text": TEXT, "tokens_per_second": 2}}
            running = (await http.post("/v1/streams", json=slow)).json()["id"]
            cancel = await http.post(f"/v1/streams/{running}/cancel")
            assert cancel.status_code == 202
            assert (await sse_text(http, running))[1] == "cancelled"

            # cancel_unread_after: a reader's presence and departure, and the producer's
            # check, all under the API user.
            unread = {"prompt": "hi", "cancel_unread_after": 0.5,
                      "params": {"text": TEXT, "tokens_per_second": 2}}
            gone = (await http.post("/v1/streams", json=unread)).json()["id"]
            async with http.stream("GET", f"/v1/streams/{gone}/events") as response:
                async for line in response.aiter_lines():
                    if line == "event: token":
                        break

            async def cancelled_unread() -> bool:
                status = (await http.get(f"/v1/streams/{gone}")).json()
                return bool(status["cancel_reason"] == "unread")
            await until(cancelled_unread)

            snapshot = await http.get(f"/v1/streams/{gid}/events?snapshot=true")
            assert "event: snapshot" in snapshot.text
            async with http.stream("GET", "/v1/channels/talk/events") as channel:
                assert channel.status_code == 200
                async for line in channel.aiter_lines():
                    if line == "event: done":
                        break
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200
            assert "tokentee_consumer_up" in metrics.text
    finally:
        for proc in procs:
            await stop(proc)


def test_the_users_cannot_write_what_is_not_theirs_or_administer(
    tls_redis: TlsRedis, admin: redis.Redis,
) -> None:
    worker_client = redis.Redis.from_url(tls_redis.url("tokentee-worker", WORKER_PASSWORD))
    api_client = redis.Redis.from_url(tls_redis.url("tokentee-api", API_PASSWORD))
    try:
        forbidden: list[tuple[redis.Redis, tuple[Any, ...]]] = [
            (worker_client, ("XADD", f"{PREFIX}:{{gabc}}:log", "0-1", "type", "token")),
            (worker_client, ("SET", f"{PREFIX}:{{gabc}}:text", "forged")),
            (worker_client, ("FLUSHALL",)),
            (worker_client, ("CONFIG", "GET", "*")),
            (api_client, ("FLUSHALL",)),
            (api_client, ("CONFIG", "SET", "maxmemory", "1")),
            (api_client, ("KEYS", "*")),
            (api_client, ("SET", "other-app:key", "x")),
            (api_client, ("GET", "other-app:key")),
        ]
        for client, command in forbidden:
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        assert worker_client.xlen(f"{PREFIX}:catalog") >= 0  # and reading is allowed
    finally:
        admin.acl_log_reset()  # the denials above were the point
        for client in (worker_client, api_client):
            client.close()


def test_the_worker_user_can_list_its_groups_consumers(
    tls_redis: TlsRedis, admin: redis.Redis,
) -> None:
    """What ``Worker._forget_departed`` sends every tenth takeover scan (XINFO CONSUMERS on
    the catalog's group), which the workers of the test above do not live long enough to
    reach."""
    admin.xgroup_create(f"{PREFIX}:catalog", "sentences", id="0", mkstream=True)
    worker_client = redis.Redis.from_url(tls_redis.url("tokentee-worker", WORKER_PASSWORD))
    try:
        assert worker_client.xinfo_consumers(f"{PREFIX}:catalog", "sentences") == []
    finally:
        worker_client.close()


@pytest.mark.parametrize("command", ["serve", "consume"])
def test_a_wrong_password_stops_at_startup_without_printing_it(
    tls_redis: TlsRedis, admin: redis.Redis, command: str,
) -> None:
    secret = "wrong-" + secrets.token_hex(8)
    args = ["serve", "--port", "0"] if command == "serve" else ["consume", "sentences"]
    env = {**os.environ, "REDIS_URL": tls_redis.url("tokentee-api", secret),
           "TOKENTEE_KEY_PREFIX": PREFIX}
    done = subprocess.run([sys.executable, "-m", "broker", *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert secret not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "invalid username-password pair" in done.stderr
    assert "rediss://tokentee-api:***@127.0.0.1" in done.stderr
    admin.acl_log_reset()  # the failed AUTH is logged as a denial


async def test_plaintext_and_a_wrong_ca_are_refused(
    tls_redis: TlsRedis, admin: redis.Redis, tmp_path: Path,
) -> None:
    plain = f"redis://tokentee-api:{API_PASSWORD}@127.0.0.1:{tls_redis.port}/0"
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    wrong_ca = tls_redis.url("tokentee-api", API_PASSWORD, ca_file=other_ca)
    for url, message in ((plain, "Connection closed|reset"),
                         (wrong_ca, "certificate verify failed")):
        with pytest.raises(RedisUnavailable, match=message):
            async with Broker.open(settings_for(url)):
                pass
