"""Following the catalog: every new generation, as it is announced.

The broker appends one catalog entry per generation (``id``, ``provider``, ``model``,
``created``) right after the generation's metadata exists, so a follower never has to scan
keys and always finds the generation it is told about (within retention).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from broker.connections import raise_if_cancelled
from broker.keys import Keyspace
from broker.log import StreamEntry, XReadReply


@dataclass(frozen=True, slots=True)
class Announcement:
    """One catalog entry.  ``entry_id`` is the catalog position, to resume after it."""

    entry_id: str
    id: str
    provider: str
    model: str
    created: float


def _announcement(entry_id: bytes, fields: dict[bytes, bytes]) -> Announcement:
    def get(name: str) -> str:
        return fields.get(name.encode(), b"").decode()

    return Announcement(
        entry_id=entry_id.decode(), id=get("id"), provider=get("provider"),
        model=get("model"), created=float(get("created") or 0),
    )


async def follow_catalog(
    redis: aioredis.Redis, keyspace: Keyspace, *, after: str = "$", block_ms: int = 5_000,
) -> AsyncIterator[Announcement]:
    """Yield announcements after catalog position ``after`` (``"0"``: from the oldest kept;
    ``"$"``: only generations created from now on), forever.

    Uses blocking ``XREAD`` on ``redis``: give it a client of its own whose socket timeout
    exceeds ``block_ms`` (``broker.connections.blocking_client``).  ``"$"`` is resolved to
    the catalog's current last id once, so nothing announced between two reads is missed.
    Stop by breaking out of the loop or cancelling.
    """
    key = keyspace.catalog
    if after == "$":
        last = cast(list[StreamEntry], await redis.xrevrange(key, count=1))
        after = last[0][0].decode() if last else "0-0"
    while True:
        reply = cast(XReadReply, await redis.xread({key: after}, block=block_ms, count=100))
        raise_if_cancelled()
        for _key, entries in reply or []:
            for entry_id, fields in entries:
                after = entry_id.decode()
                yield _announcement(entry_id, fields)
