"""Backpressure from durable consumers to producers.

A producer may run at most ``max_lag`` entries ahead of the slowest *live* consumer type on
its generation.  Live means a worker of that type stamped the type's heartbeat within
``stall_timeout_seconds`` (Redis clock); a type silent for longer is reported as stalled and
stops holding producers back, so one dead consumer type cannot freeze every generation.  SSE
readers never hold a producer back: they read the log at their own pace.

How a producer waits, without polling:

1. At its limit it asks the log (:meth:`GenerationLog.hold`) for the slowest live type's
   position.  Below the resume mark, the same script records the mark in the generation's meta.
2. The consumer commit that reaches the mark clears it and posts ``progress`` on the control
   stream, which every broker process already follows with one blocking read; the manager
   hands it to :meth:`ConsumerGate.notify`.
3. The producer re-checks.  A change in the set of live types wakes every waiting producer.
   A fallback timeout (one heartbeat interval) covers a wake lost to a consumer that crashed
   between its commit and its post.

The resume mark sits a quarter window below the limit, so a held producer is woken once per
quarter window, not once per entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from types import TracebackType

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.connections import clock_ms, raise_if_cancelled
from broker.keys import Keyspace
from broker.settings import Settings

logger = logging.getLogger(__name__)


# KEYS: consumer types hash, dead-letter counts hash (one slot).  Redis's clock and both
# hashes from the node that holds them: on a cluster every node has its own clock, and the
# heartbeats were stamped with this one.
_LIVENESS = """
return {redis.call('TIME'), redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


async def read_liveness(
    redis: aioredis.Redis, keyspace: Keyspace
) -> tuple[int, dict[bytes, bytes], dict[bytes, bytes]]:
    """``(now ms, type -> last heartbeat ms, type -> dead letters)`` on Redis's clock."""
    now_t, beats, dead = await redis.eval(
        _LIVENESS, 2, keyspace.consumer_types, keyspace.dead_letter_counts
    )
    return clock_ms(now_t), _pairs(beats), _pairs(dead)


class ConsumerGate:
    """This process's view of which consumer types are live, and its held producers."""

    def __init__(self, redis: aioredis.Redis, keyspace: Keyspace, settings: Settings) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.settings = settings
        self.max_lag = settings.max_lag
        self.interval = settings.consumer_heartbeat_seconds
        self.live: tuple[str, ...] = ()
        self.stalled: tuple[str, ...] = ()
        self._waiters: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self.version = 0  # bumped whenever the set of live types changes
        self.holds = 0  # times a producer had to wait (for benchmarks and tests)

    async def __aenter__(self) -> ConsumerGate:
        if self.max_lag > 0:
            try:
                await self.refresh()
            except RedisError as exc:
                logger.warning("consumer liveness unknown (%s); retrying", exc)
            self._task = asyncio.create_task(self._refresh_loop(), name="tokentee-gate")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.notify_all()

    @property
    def enabled(self) -> bool:
        return self.max_lag > 0

    async def refresh(self) -> None:
        now_ms, beats, _dead = await read_liveness(self.redis, self.keyspace)
        stall_ms = self.settings.stall_timeout_seconds * 1000
        live: list[str] = []
        stalled: list[str] = []
        for raw_type, raw_ms in sorted(beats.items()):
            (live if now_ms - int(raw_ms) <= stall_ms else stalled).append(raw_type.decode())
        for ctype in set(stalled) - set(self.stalled):
            logger.warning(
                "consumer type %r has had no live worker for over %.0f s: it no longer holds"
                " producers back, and catches up from the log when a worker returns",
                ctype, self.settings.stall_timeout_seconds,
            )
        for ctype in set(self.stalled) & set(live):
            logger.info("consumer type %r is live again", ctype)
        changed = tuple(live) != self.live
        self.live, self.stalled = tuple(live), tuple(stalled)
        if changed:
            self.version += 1
            self.notify_all()

    async def _refresh_loop(self) -> None:
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except RedisError as exc:  # keep the last view; retried next interval
                logger.warning("consumer liveness refresh failed: %s", exc)

    def notify(self, gid: str) -> None:
        event = self._waiters.get(gid)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        for event in self._waiters.values():
            event.set()

    @contextlib.contextmanager
    def holding(self, gid: str) -> Iterator[asyncio.Event]:
        """Register a held producer of ``gid`` for wakes; clear the event before each check
        of the log, so a wake that lands between the check and the wait is not lost."""
        event = asyncio.Event()
        self._waiters[gid] = event
        try:
            yield event
        finally:
            self._waiters.pop(gid, None)

    async def wait(self, event: asyncio.Event) -> None:
        """Wait for a wake, or the fallback timeout."""
        self.holds += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.interval):
                await event.wait()
