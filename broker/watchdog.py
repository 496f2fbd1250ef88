"""The lease watchdog: ends generations whose producer is gone, whether or not anyone reads them.

Every API replica runs one (``TOKENTEE_WATCHDOG=false`` turns it off).  It follows the catalog
with a blocking ``XREAD`` on a connection of its own, so it learns of every generation any
replica starts, and keeps each running one in a timer heap keyed by the moment its lease would
run out.  When that moment comes it asks Redis for the generation's status and the lease's
remaining time (``PTTL``) in one pipeline per batch:

- ended, or its metadata gone: forgotten;
- lease still there (the producer renewed it): checked again when the renewed lease would run
  out;
- running without a lease: :meth:`GenerationLog.reap_if_orphaned` writes
  ``error``/``producer_lost``.

So a generation whose producer died ends at most ``lease_seconds`` (plus one round trip) after
the producer's last renewal, and its readers, wherever they are, get the terminal entry from
the log like any other.  The reap is the orphaned-mode finish script, atomic and refused when
anyone holds the lease or the generation has ended, so any number of watchdogs (one per
replica), a reader's hub reaper and the stale producer itself can race to it and the log gets
exactly one terminal entry.

At start it reads the catalog from the oldest generation whose metadata could still exist (its
backstop TTL: the generation deadline plus retention), so generations orphaned while no
replica ran are found too.  Consumer worker processes (``tokentee consume``) run no watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from types import TracebackType
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.connections import clock_ms, raise_if_cancelled
from broker.log import GenerationLog, XReadReply
from broker.settings import Settings

logger = logging.getLogger(__name__)

_BATCH = 500  # generations checked per pipeline, and catalog entries per read
_MARGIN = 0.01  # seconds after a lease's expiry before checking it: PTTL is then -2


class LeaseWatchdog:
    """Follows the catalog and reaps generations whose lease expired.  Use as an async
    context manager; both of its tasks are cancelled and awaited on exit."""

    def __init__(
        self, log: GenerationLog, block_redis: aioredis.Redis, settings: Settings
    ) -> None:
        self.log = log
        self.settings = settings
        self._block_redis = block_redis
        self._due: dict[str, float] = {}  # gid -> loop time of its next check
        self._heap: list[tuple[float, str]] = []  # (due, gid); stale pairs skipped on pop
        self._changed = asyncio.Event()  # an entry due before the heap's head was added
        self._tasks: list[asyncio.Task[None]] = []
        self.reaped = 0  # generations this watchdog ended with producer_lost

    async def __aenter__(self) -> LeaseWatchdog:
        self._tasks = [
            asyncio.create_task(self._follow(), name="tokentee-watchdog-catalog"),
            asyncio.create_task(self._check_loop(), name="tokentee-watchdog-leases"),
        ]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for outcome in await asyncio.gather(*self._tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                logger.error("watchdog task had failed: %r", outcome)
        self._tasks = []

    @property
    def tracked(self) -> int:
        """Generations this watchdog believes to be running."""
        return len(self._due)

    # --- following the catalog ------------------------------------------------------------

    async def _start_position(self) -> str:
        """The catalog id just before the oldest generation whose metadata could still
        exist (catalog ids carry Redis's clock in ms)."""
        # The clock of the node that holds the catalog (on a cluster each node has its own).
        now_ms = clock_ms(await self.log.redis.eval(
            "return redis.call('TIME')", 1, self.log.keyspace.catalog))
        window_s = self.settings.max_generation_seconds + self.settings.retention_seconds + 60
        return f"{max(0, now_ms - int(window_s * 1000))}-0"

    async def _follow(self) -> None:
        key = self.log.keyspace.catalog
        after: str | None = None
        first_check = self.settings.lease_seconds / 4
        while True:
            raise_if_cancelled()
            try:
                if after is None:
                    after = await self._start_position()
                reply = cast(XReadReply, await self._block_redis.xread(
                    {key: after}, block=self.settings.block_ms, count=_BATCH
                ))
            except RedisError as exc:  # connection, OOM, READONLY...: back off, retry
                logger.warning("watchdog catalog read failed (%s); retrying", exc)
                await asyncio.sleep(0.5)  # reconnect backoff, not a data poll
                continue
            raise_if_cancelled()
            for _key, entries in reply or []:
                for entry_id, fields in entries:
                    after = entry_id.decode()
                    gid = fields.get(b"id", b"").decode()
                    if gid and gid not in self._due:
                        # A fresh lease has about lease_seconds left: the first look, a
                        # quarter lease in, learns how much exactly.
                        self._schedule(gid, first_check)

    # --- checking leases -----------------------------------------------------------------

    def _schedule(self, gid: str, delay: float) -> None:
        due = asyncio.get_running_loop().time() + delay
        self._due[gid] = due
        if not self._heap or due < self._heap[0][0]:
            self._changed.set()
        heapq.heappush(self._heap, (due, gid))

    def _take_due(self, until: float) -> list[str]:
        batch: list[str] = []
        while self._heap and self._heap[0][0] <= until and len(batch) < _BATCH:
            due, gid = heapq.heappop(self._heap)
            if self._due.get(gid) == due:
                del self._due[gid]
                batch.append(gid)
        return batch

    async def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        # Generations due within this window of the first are checked with it: one pipeline
        # for many, and a check that comes early only reschedules by the lease's PTTL.
        window = min(self.settings.lease_seconds / 10, 0.5)
        while True:
            raise_if_cancelled()
            self._changed.clear()
            while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # stale pair
            if not self._heap:
                await self._changed.wait()
                continue
            wait = self._heap[0][0] - loop.time()
            if wait > 0:
                # Sleep until the next lease runs out, or until an earlier one is added.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
                continue
            batch = self._take_due(loop.time() + window)
            try:
                await self._check(batch)
            except RedisError as exc:  # OOM, READONLY, a failover...: look again shortly
                logger.warning("watchdog lease check failed: %s", exc)
                for gid in batch:
                    if gid not in self._due:
                        self._schedule(gid, min(1.0, self.settings.lease_seconds / 4))

    async def _check(self, gids: list[str]) -> None:
        lease = self.settings.lease_seconds
        for gid, (status, ttl_ms) in zip(gids, await self.log.lease_state(gids), strict=True):
            if status != "running":
                continue  # ended, or gone: forget it
            if ttl_ms >= 0:
                self._schedule(gid, ttl_ms / 1000 + _MARGIN)  # renewed: its new expiry
            elif ttl_ms == -1:
                self._schedule(gid, lease)  # a lease without expiry: no one set it so
            else:
                outcome = await self.log.reap_if_orphaned(gid)
                if outcome == "reaped":
                    self.reaped += 1
                elif outcome == "alive":
                    self._schedule(gid, lease)  # a producer holds it again, or it ended
