"""Fixtures: one private Redis per session, one key prefix per test, real HTTP servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis

from broker.embedded import EmbeddedRedisProcess
from broker.server import build_server
from broker.service import Broker
from broker.settings import Settings

# Every key a test run makes starts with this run's prefix, so a shared server
# (TOKENTEE_TEST_REDIS_URL) is cleaned by prefix at the end and never flushed.
RUN_PREFIX = f"tt-test-{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``TOKENTEE_TEST_REDIS_URL`` if set, else a private redis-server that the suite starts
    and stops."""
    url = os.environ.get("TOKENTEE_TEST_REDIS_URL")
    if url:
        try:
            yield url
        finally:
            asyncio.run(delete_prefix(url, RUN_PREFIX, pattern=f"{RUN_PREFIX}-*"))
        return
    server = EmbeddedRedisProcess()
    try:
        yield server.start()
    finally:
        server.stop()


def make_settings(redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "key_prefix": f"{RUN_PREFIX}-{secrets.token_hex(4)}",
        "block_ms": 2_000,
        "lease_seconds": 3.0,
        "shutdown_grace_seconds": 1.0,
        "heartbeat_seconds": 15.0,
        # Tests read from one address with many clients; tests/test_limits.py sets its own.
        "max_sse_per_client": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def settings(redis_url: str) -> AsyncIterator[Settings]:
    s = make_settings(redis_url)
    yield s
    await delete_prefix(redis_url, s.key_prefix)


async def delete_prefix(redis_url: str, prefix: str, pattern: str | None = None) -> None:
    """Remove the keys a test made (by prefix); the server itself is never flushed."""
    client = aioredis.from_url(redis_url)
    try:
        async for key in client.scan_iter(match=pattern or f"{prefix}:*", count=1000):
            await client.unlink(key)
    finally:
        await client.aclose()


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    async with Broker.open(settings) as b:
        yield b


@contextlib.asynccontextmanager
async def running_server(settings: Settings, broker: Broker) -> AsyncIterator[str]:
    """A real uvicorn server on a loopback port, serving ``broker``; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # connections queue in the backlog until uvicorn serves: no wait needed
    port = sock.getsockname()[1]
    server = build_server(settings, broker, log_level="warning", access_log=False)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def base_url(settings: Settings, broker: Broker) -> AsyncIterator[str]:
    async with running_server(settings, broker) as url:
        yield url


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(30.0)) as client:
        yield client
