"""Who reads a generation, across replicas: the ``cancel_unread_after`` policy.

A generation started with ``cancel_unread_after`` is cancelled (``cancelled``, reason
``unread``) by its producer's process once nobody has read it for that long.  A *reader* is a
cursor from ``Broker.subscribe``/``Broker.events`` (an SSE response holds one, and so does a
channel follower) in any process; a durable consumer's cursor is not one.

Presence lives in one sorted set per generation (``Keyspace.readers``, in the generation's
hash slot), written only for generations with the policy.  Each hub with readers of such a
generation has one member, scored on Redis's clock:

- while it has readers, the time its presence lapses (``now + lease_seconds``), set when its
  first reader attaches and pushed forward every ``lease_seconds / 3`` by the hub's timer;
- once its last reader has left, the time it left.

So the highest score says until when the generation was read: in the future, it is read now;
in the past, it has been unread since then; a replica that died holding readers stops
refreshing, and its member counts as unread one lease after its last refresh.  Until the
first reader arrives there is no set, and the producer's process counts from the creation.

The set expires ``cancel_unread_after + 2 x lease_seconds`` after its last write, so it never
outlives the generation by much, and never vanishes before the policy could have fired.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from broker.connections import pipelined_script
from broker.keys import Keyspace

#: The largest ``cancel_unread_after`` accepted (seconds): a day.
MAX_CANCEL_UNREAD_AFTER = 86_400.0

#: The ``reason`` of the ``cancelled`` entry that ends a generation nobody read.
UNREAD = "unread"

# KEYS[1] the readers set.  ARGV: member, ms from now its presence lasts (0: it leaves now),
# ms the set is kept after this write.
_MARK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) / 1000))
return 1
"""

# KEYS[1] the readers set.  Returns ms since the generation was last read: 0 while it is read,
# -1 if nobody has ever read it (no set).
_UNREAD_MS = """
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #top == 0 then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(top[2])
if last >= now then return 0 end
return now - last
"""


def check_cancel_unread_after(value: float) -> float:
    """``value`` as a valid ``cancel_unread_after``, or ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("cancel_unread_after must be a number of seconds")
    if not (0 < value <= MAX_CANCEL_UNREAD_AFTER):  # NaN fails it too
        raise ValueError(
            f"cancel_unread_after must be > 0 and at most {MAX_CANCEL_UNREAD_AFTER:.0f} seconds"
        )
    return float(value)


class ReaderPresence:
    """Writes and reads the readers sets.  ``ttl_ms`` is how long a hub's presence lasts
    without a refresh (the hub refreshes every third of it)."""

    def __init__(self, redis: aioredis.Redis, keyspace: Keyspace, ttl_ms: int) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.ttl_ms = ttl_ms
        self._mark = redis.register_script(_MARK)
        self._unread = redis.register_script(_UNREAD_MS)

    def _keep_ms(self, grace: float) -> int:
        return int(grace * 1000) + 2 * self.ttl_ms

    async def here(self, member: str, generations: Iterable[tuple[str, float]]) -> None:
        """``member`` has readers of each ``(generation, cancel_unread_after)``: present for
        ``ttl_ms`` from now (one pipeline)."""
        calls: list[tuple[list[str], list[str | int]]] = [
            ([self.keyspace.readers(gid)], [member, self.ttl_ms, self._keep_ms(grace)])
            for gid, grace in generations
        ]
        if calls:
            await pipelined_script(self.redis, self._mark, calls)

    async def left(self, member: str, gid: str, grace: float) -> None:
        """``member``'s last reader of ``gid`` left: unread from now on, as far as it goes."""
        await self.gone(member, [(gid, grace)])

    async def gone(self, member: str, generations: Iterable[tuple[str, float]]) -> None:
        """``member`` stops with readers of each ``(generation, cancel_unread_after)``: each
        is unread from now on, as far as it goes (one pipeline)."""
        calls: list[tuple[list[str], list[str | int]]] = [
            ([self.keyspace.readers(gid)], [member, 0, self._keep_ms(grace)])
            for gid, grace in generations
        ]
        if calls:
            await pipelined_script(self.redis, self._mark, calls)

    async def unread_ms(self, gids: list[str]) -> list[int]:
        """For each of ``gids``, ms since it was last read (Redis clock): 0 while someone reads
        it, -1 if nobody ever has (one pipeline)."""
        replies = await pipelined_script(
            self.redis, self._unread, [([self.keyspace.readers(gid)], []) for gid in gids]
        )
        return [int(reply) for reply in replies]
