"""Redis connection hygiene: cancelled reads never cross replies; BLOCK vs socket timeout."""

from __future__ import annotations

import asyncio
import random

import pytest

from broker.connections import blocking_client, command_client
from broker.settings import Settings
from tests.conftest import make_settings


async def test_cancelled_blocking_reads_never_hand_over_an_unread_reply(
    settings: Settings,
) -> None:
    """The CVE-2023-28858 class: cancel a blocking XREAD at random moments, then use the same
    client; every reply must belong to its own command."""
    url = settings.redis_url or ""
    blocking = blocking_client(url, settings)
    shared = command_client(url, settings)
    rng = random.Random(7)
    stream = f"{settings.key_prefix}:cancel-probe"
    try:
        for i in range(300):
            read = asyncio.create_task(blocking.xread({stream: "$"}, block=50))
            await asyncio.sleep(rng.random() * 0.004)  # a random moment in the read's life
            if rng.random() < 0.5:  # sometimes an entry arrives just as we cancel
                await shared.xadd(stream, {"i": str(i)}, maxlen=10)
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
            key = f"{settings.key_prefix}:probe:{i}"
            await blocking.set(key, f"value-{i}")
            assert await blocking.get(key) == f"value-{i}".encode()
            assert await shared.get(key) == f"value-{i}".encode()
    finally:
        await blocking.aclose()
        await shared.aclose()


@pytest.mark.timeout(30)
async def test_block_longer_than_redis_py_default_socket_timeout(redis_url: str) -> None:
    # redis-py 8 defaults socket_timeout to 5 s, which breaks a longer BLOCK.  Ours is set
    # from block_ms, so an idle blocking read simply returns nothing.
    settings = make_settings(redis_url, block_ms=5_500)
    client = blocking_client(redis_url, settings)
    try:
        reply = await client.xread({f"{settings.key_prefix}:idle": "$"}, block=settings.block_ms)
        assert not reply
    finally:
        await client.aclose()


def test_socket_timeout_is_above_block_time() -> None:
    s = Settings(redis_url="redis://x", block_ms=3_000, redis_timeout_slack_seconds=2)
    assert s.redis_socket_timeout == 5.0
