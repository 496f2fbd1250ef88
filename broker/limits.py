"""Limits that protect the broker from one client: open event streams, prompt size.

Open event streams are counted per client across all replicas in one Redis sorted set per
client (``Keyspace.sse_slots``): a member per open stream, scored by the time it expires on
Redis's clock.  The replica holding a stream pushes its expiry forward every third of the
slot TTL; a crashed replica stops doing so and its members age out within one TTL, so a
client is never locked out for long by connections that no longer exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.errors import TooManyStreams
from broker.keys import Keyspace

logger = logging.getLogger(__name__)

# KEYS[1] the client's slots; ARGV: member, limit, ttl ms.  Returns 1 (taken) or 0 (full).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) / 1000))
return 1
"""

# KEYS[1] the client's slots; ARGV: ttl ms, members.  Only members still present are pushed
# forward (XX): a slot released meanwhile must not come back.
_REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end
redis.call('EXPIRE', KEYS[1], math.ceil(ttl / 1000))
return 1
"""


class ConnectionSlots:
    """Per-client counts of open event streams, shared by every replica through Redis.

    :meth:`hold` takes a slot for the length of a stream; :meth:`running` keeps this
    process's slots alive.  ``limit`` 0 turns counting off.  If Redis fails while a slot is
    being taken, the error propagates (the request fails with 503); a failed release is
    logged and the slot ages out.
    """

    def __init__(self, redis: aioredis.Redis, keyspace: Keyspace, limit: int, *,
                 ttl_ms: int = 60_000) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.limit = limit
        self.ttl_ms = ttl_ms
        self._acquire = redis.register_script(_ACQUIRE)
        self._refresh = redis.register_script(_REFRESH)
        self._held: dict[str, set[str]] = {}  # key -> members this process holds

    @contextlib.asynccontextmanager
    async def hold(self, client: str) -> AsyncIterator[None]:
        """A slot of ``client`` until the block exits.  Raises :class:`TooManyStreams`."""
        if self.limit <= 0:
            yield
            return
        key = self.keyspace.sse_slots(client)
        member = secrets.token_hex(8)
        taken = await self._acquire(keys=[key], args=[member, self.limit, self.ttl_ms])
        if not taken:
            raise TooManyStreams(
                f"too many open event streams for this client (limit {self.limit})"
            )
        self._held.setdefault(key, set()).add(member)
        try:
            yield
        finally:
            members = self._held.get(key, set())
            members.discard(member)
            if not members:
                self._held.pop(key, None)
            try:
                await self.redis.zrem(key, member)
            except RedisError as exc:
                logger.warning("could not release an event-stream slot (it ages out): %s", exc)

    def held(self) -> int:
        return sum(len(m) for m in self._held.values())

    async def refresh(self) -> None:
        """Push the expiry of every slot this process holds forward by one TTL."""
        for key, members in list(self._held.items()):
            if members:
                await self._refresh(keys=[key], args=[self.ttl_ms, *members])

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Refresh this process's slots every third of the TTL while the block runs."""
        if self.limit <= 0:
            yield
            return
        task = asyncio.create_task(self._refresh_loop(), name="tokentee-sse-slots")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                await self.refresh()
            except RedisError as exc:
                # Next round retries; members expire only after a whole TTL without one.
                logger.warning("could not refresh event-stream slots: %s", exc)


def prompt_chars(messages: Iterable[Mapping[str, Any]]) -> int:
    """Size of a request's messages in characters: string contents as they are, structured
    contents (parts, tool calls) as compact JSON."""
    total = 0
    for message in messages:
        for name, value in message.items():
            if name == "role" or value is None:
                continue
            total += len(value) if isinstance(value, str) else len(
                json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    return total


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
