"""The durable consumer runtime: consumer types, their workers, and how generations move
between workers.

A *consumer type* (``sentences``, ``analytics``, your own) is a Redis consumer group on the
catalog stream.  Each catalog entry announces one generation, so ``XREADGROUP`` shares the
generations among the type's workers; the worker that receives one processes that generation
from its checkpoint to its terminal entry, in order, and only then acknowledges the catalog
entry.  Every type sees every generation; within a type, each generation has one owner.

Delivery is at least once, effects exactly once: after each batch of entries the worker
commits its position, the type's state and the records it emitted in one script
(:mod:`consumers.store`).  A crash loses only uncommitted work, which the next owner redoes
from the checkpoint.

Ownership:

- A worker *touches* the catalog entries it holds every heartbeat (``XCLAIM ... JUSTID`` with
  idle 0), so their idle time stays near zero while it lives.
- A worker that stops (SIGKILL, SIGSTOP, a partition) stops touching; after
  ``claim_idle_seconds`` another worker of the type takes the generation over with
  ``XAUTOCLAIM`` and continues from the checkpoint.  The checkpoint records the new owner, so
  a paused worker that wakes up has its next commit refused and lets go.
- On SIGTERM a worker drains: it stops taking generations, gives those it holds
  ``shutdown_grace_seconds`` to finish, stops the rest (their last commit stands), and parks
  their catalog entries with a large idle time so another worker takes them over at once.

A handler that raises is retried from the checkpoint with backoff; after ``max_deliveries``
failed attempts at one entry, the entry goes to the type's dead-letter stream (log line and
metric) and is skipped, and the generation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from broker.connections import blocking_client, raise_if_cancelled
from broker.errors import GenerationNotFound
from broker.events import Event
from broker.hub import Hub
from broker.keys import is_consumer_type, is_generation_id
from broker.log import GenerationLog, StreamEntry
from broker.logs import set_generation
from broker.settings import Settings
from consumers.store import ConsumerStore, Fenced

logger = logging.getLogger(__name__)

# Catalog entries a draining worker hands over are claimed by this consumer name, with a large
# idle time, so that any live worker's next XAUTOCLAIM takes them.
PARKED = "parked"


class Generation:
    """What a consumer type's handlers see of one generation.

    ``state`` is checkpointed with every commit (JSON-serializable values only) and restored
    when another worker takes the generation over; ``scratch`` is for objects rebuilt from
    ``state`` (never saved).  ``emit`` adds a record to the type's output stream for this
    generation, committed atomically with the position and the state.
    """

    __slots__ = ("_records", "created", "id", "model", "provider", "scratch", "seq", "state")

    def __init__(self, gid: str, provider: str, model: str, created: float,
                 state: dict[str, Any], seq: int) -> None:
        self.id = gid
        self.provider = provider
        self.model = model
        self.created = created
        self.state = state
        self.seq = seq  # the last entry handled
        self.scratch: dict[str, Any] = {}
        self._records: list[dict[str, Any]] = []

    def emit(self, record: dict[str, Any]) -> None:
        self._records.append(record)


class ConsumerType:
    """Subclass, set :attr:`name`, override the handlers you need.

    Handlers may be plain or ``async`` functions.  They run once per entry in effect: a
    handler may run again for the same entry after a crash or a failure, but only the run
    whose checkpoint commits counts, so keep effects in ``gen.state`` and ``gen.emit``.
    Anything a handler does outside them (an HTTP call, a file) is at least once; dedupe by
    ``(gen.id, event.seq)``.
    """

    name: ClassVar[str] = ""

    def start(self, gen: Generation) -> Awaitable[None] | None:
        """Before the first entry of a generation."""
        return None

    def token(self, gen: Generation, event: Event) -> Awaitable[None] | None:
        """For each ``token`` entry, in order."""
        return None

    def gap(self, gen: Generation, event: Event) -> Awaitable[None] | None:
        """Entries the log no longer holds (``event.data``: first/last missing seq)."""
        return None

    def end(self, gen: Generation, event: Event) -> Awaitable[None] | None:
        """For the terminal entry (``done``, ``error`` or ``cancelled``)."""
        return None

    def other(self, gen: Generation, event: Event) -> Awaitable[None] | None:
        """For every other entry: ``reasoning``, ``reasoning_signature``,
        ``tool_call_delta``, ``tool_call``, and types a later version adds."""
        return None

    def checkpoint(self, gen: Generation) -> None:
        """Before each commit: move what lives in ``gen.scratch`` into ``gen.state``."""

    def deliver(self, gen: Generation, records: list[dict[str, Any]]) -> Awaitable[None] | None:
        """After a commit, with the records it made (a sink: stdout, a file, a queue).  At
        least once: after a takeover, records not yet known delivered are delivered again."""
        return None

    async def completed(self, gen: Generation, store: ConsumerStore) -> None:
        """After the final commit, before the catalog entry is acknowledged.  May run again
        after a crash, so it must be idempotent (see :meth:`ConsumerStore.add_once`)."""

    def close(self) -> None:
        """When the process's workers of this type have stopped (close files, clients)."""


async def _call(result: Awaitable[None] | None) -> None:
    if inspect.isawaitable(result):
        await result


def _log_trimmed(ctype: str, count: int) -> None:
    logger.error(
        "consumer %s: %d pending catalog entries were trimmed before their takeover; those"
        " generations are not processed by this type (raise catalog_maxlen)", ctype, count,
    )


class HandlerFailed(Exception):
    """A handler raised; the generation is retried from its checkpoint."""


class _Interrupted(Exception):
    """Processing stopped before the terminal entry (the hub is shutting down)."""


@dataclass(slots=True)
class _Held:
    """A generation this worker is processing."""

    gid: str
    task: asyncio.Task[None]
    head: int = 0  # last seq the log is known to hold
    seq: int = 0  # last seq committed
    sunk: int = 0  # records this worker has handed to the sink (survives retries)


class Worker:
    """One worker of one consumer type.  An async context manager: entering joins the group
    and starts taking generations; leaving drains (see the module docstring)."""

    def __init__(
        self, ctype: ConsumerType, settings: Settings, *, redis: aioredis.Redis,
        group_redis: aioredis.Redis, log: GenerationLog, hub: Hub, name: str | None = None,
    ) -> None:
        if not is_consumer_type(ctype.name):
            raise ValueError(f"consumer type name {ctype.name!r} must match"
                             " [a-z][a-z0-9_-]{0,31}")
        self.ctype = ctype
        self.type = ctype.name
        self.settings = settings
        self.redis = redis
        self._group_redis = group_redis  # one connection, for the blocking XREADGROUP
        self.log = log
        self.hub = hub
        self.keyspace = log.keyspace
        self.store = ConsumerStore(redis, log.keyspace, settings.retention_seconds)
        self.name = name or f"w-{os.getpid()}-{secrets.token_hex(4)}"
        self._held: dict[str, _Held] = {}  # catalog entry id -> generation in hand
        self._room = asyncio.Event()  # set while fewer than consumer_concurrency are held
        self._room.set()
        self._takers: list[asyncio.Task[None]] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        # Set if a loop of this worker died of an unexpected error: the worker no longer
        # works, and a worker process exits (non-zero) so that it is restarted.
        self.failed = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self._ensure_group()
        await self._beat()  # live before taking anything: producers start counting on us
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat_loop(), name=f"tokentee-{self.type}-heartbeat"
        )
        self._takers = [
            asyncio.create_task(self._read_loop(), name=f"tokentee-{self.type}-read"),
            asyncio.create_task(self._claim_loop(), name=f"tokentee-{self.type}-claim"),
        ]
        for task in (*self._takers, self._heartbeat_task):
            task.add_done_callback(self._loop_ended)
        logger.info("consumer %s worker %s started", self.type, self.name)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.drain()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("consumer %s worker %s: %s failed; the worker stops checking in",
                         self.type, self.name, task.get_name(), exc_info=task.exception())
            self.failed.set()
            # A worker that no longer takes generations must not keep its type looking
            # live: without heartbeats it is reported stalled and stops holding producers,
            # and its generations are taken over by other workers.
            if self._heartbeat_task is not None and self._heartbeat_task is not task:
                self._heartbeat_task.cancel()

    async def drain(self) -> None:
        """Stop taking generations; let held ones finish within the grace period; stop the
        rest (their last commit stands) and park their catalog entries for takeover."""
        for task in self._takers:
            task.cancel()
        await asyncio.gather(*self._takers, return_exceptions=True)
        self._takers = []
        try:
            tasks = [held.task for held in self._held.values()]
            if tasks:
                _, pending = await asyncio.wait(
                    tasks, timeout=self.settings.shutdown_grace_seconds
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(RedisError):
                await self._park_all()
        finally:
            if self._heartbeat_task is not None:
                self._heartbeat_task.cancel()
                await asyncio.gather(self._heartbeat_task, return_exceptions=True)
                self._heartbeat_task = None
            await self.store.aclose()
            with contextlib.suppress(RedisError):
                await self.store.forget_worker(self.type, self.name)
            logger.info("consumer %s worker %s stopped", self.type, self.name)

    async def _park_all(self) -> None:
        """Hand every catalog entry still pending for this worker to :data:`PARKED` with a
        large idle time (so others take them over now), then leave the group."""
        pending = await self.redis.xpending_range(
            self.keyspace.catalog, self.type, min="-", max="+", count=100_000,
            consumername=self.name,
        )
        ids = [cast(bytes, p["message_id"]).decode() for p in pending]
        idle_ms = int(self.settings.claim_idle_seconds * 1000) * 10
        await self.store.touch(self.type, self.name, ids, idle_ms=idle_ms, new_owner=PARKED)
        if ids:
            logger.info("consumer %s: handed %d unfinished generations over", self.type,
                        len(ids))
        await self.redis.xgroup_delconsumer(self.keyspace.catalog, self.type, self.name)

    async def _ensure_group(self) -> None:
        try:
            # From the start of the catalog: a new type processes every generation still
            # retained, not only those created after it was first deployed.
            await self.redis.xgroup_create(self.keyspace.catalog, self.type, id="0",
                                           mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- taking generations ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """New generations: ``XREADGROUP ... >`` for as many as there is room for."""
        while True:
            raise_if_cancelled()
            await self._room.wait()
            room = self.settings.consumer_concurrency - len(self._held)
            try:
                reply = await self._group_redis.xreadgroup(
                    self.type, self.name, {self.keyspace.catalog: ">"}, count=room,
                    block=self.settings.block_ms,
                )
            except RedisError as exc:
                # Connection loss, READONLY after a failover, MISCONF, ...: back off and
                # retry; a vanished group (Redis lost its data) is created again.
                logger.warning("consumer %s: catalog read failed (%s); retrying", self.type,
                               exc)
                await asyncio.sleep(0.5)  # back off before reconnecting, not a data poll
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    with contextlib.suppress(RedisError):
                        await self._ensure_group()
                continue
            try:
                for _key, entries in cast(list[tuple[bytes, list[StreamEntry]]], reply or []):
                    for eid, fields in entries:
                        await self._take(eid.decode(), fields)
            except RedisError as exc:  # acknowledging a foreign entry failed: it comes back
                logger.warning("consumer %s: %s", self.type, exc)

    async def _claim_loop(self) -> None:
        """Generations whose owner went silent: ``XAUTOCLAIM`` after ``claim_idle``.

        XAUTOCLAIM has no blocking form, so this runs on a timer (half the idle time)."""
        idle_ms = int(self.settings.claim_idle_seconds * 1000)
        rounds = 0
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.settings.claim_idle_seconds / 2)
            await self._room.wait()
            try:
                start = "0-0"
                while len(self._held) < self.settings.consumer_concurrency:
                    room = self.settings.consumer_concurrency - len(self._held)
                    reply = await self.redis.xautoclaim(
                        self.keyspace.catalog, self.type, self.name, idle_ms,
                        start_id=start, count=room,
                    )
                    start = reply[0].decode()
                    for eid, fields in reply[1]:
                        if eid is None:  # Redis 6.2: a pending entry trimmed from the catalog
                            _log_trimmed(self.type, 1)
                            continue
                        await self._take(eid.decode(), fields, claimed=True)
                    if len(reply) > 2 and reply[2]:  # Redis >= 7.0 reports them apart
                        _log_trimmed(self.type, len(reply[2]))
                    if start == "0-0":
                        break
                rounds += 1
                if rounds % 10 == 0:
                    await self._forget_departed()
            except RedisError as exc:
                logger.warning("consumer %s: takeover scan failed: %s", self.type, exc)
            except Exception:
                # Not a Redis failure: a bug or a reply shape this code does not know.  The
                # scan is the only way orphaned generations are recovered, so log it and
                # keep scanning rather than die.
                logger.exception("consumer %s: takeover scan failed", self.type)

    async def _forget_departed(self) -> None:
        """Drop group consumers that hold nothing and have been silent for long (workers
        that were killed).  Harmless to a live one: its next read re-creates it."""
        quiet_ms = max(60_000, int(self.settings.claim_idle_seconds * 10_000))
        for consumer in await self.redis.xinfo_consumers(self.keyspace.catalog, self.type):
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name not in (self.name, PARKED) and consumer["idle"] > quiet_ms:
                # Deleted only if it still holds nothing, checked in the same script: an
                # entry parked or claimed meanwhile would be lost with the consumer.
                await self.store.forget_consumer(self.type, name)

    async def _take(self, eid: str, fields: dict[bytes, bytes] | None, *,
                    claimed: bool = False) -> None:
        if eid in self._held:  # ours already (we were paused past the idle time)
            return
        gid = (fields or {}).get(b"id", b"").decode("utf-8", "replace")
        if not is_generation_id(gid):
            # A catalog entry trimmed while pending (no fields) or not ours: nothing to do.
            logger.warning("consumer %s: skipping catalog entry %s (no generation id)",
                           self.type, eid)
            await self.redis.xack(self.keyspace.catalog, self.type, eid)
            return
        if claimed:
            logger.info("consumer %s: took over generation %s", self.type, gid)
        task = asyncio.create_task(self._own(eid, gid), name=f"tokentee-{self.type}-{gid}")
        self._held[eid] = _Held(gid, task)
        if len(self._held) >= self.settings.consumer_concurrency:
            self._room.clear()
        task.add_done_callback(lambda t, eid=eid: self._released(eid, t))  # type: ignore[misc]

    def _released(self, eid: str, task: asyncio.Task[None]) -> None:
        held = self._held.get(eid)
        if held is not None and held.task is task:
            del self._held[eid]
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("consumer %s: generation task failed", self.type,
                         exc_info=task.exception())

    # --- heartbeat ---------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.settings.consumer_heartbeat_seconds)
            try:
                await self._beat()
            except RedisError as exc:
                logger.warning("consumer %s: heartbeat failed: %s", self.type, exc)

    async def _beat(self) -> None:
        status = {
            "generations": len(self._held),
            "lag": sum(max(0, h.head - h.seq) for h in self._held.values()),
        }
        forget_ms = int(max(self.settings.stall_timeout_seconds, 60) * 10_000)
        await self.store.heartbeat(self.type, self.name, status, forget_ms)
        missing = await self.store.touch(self.type, self.name, list(self._held))
        held = [(eid, self._held[eid]) for eid in missing if eid in self._held]
        if not held:
            return
        # Not in our part of the group's pending list: claimed by another worker, or the
        # catalog entry was trimmed (Redis 7 then drops it from the list).  The checkpoint's
        # owner decides.
        owners = await self.store.owners([h.gid for _, h in held], self.type)
        for (_eid, h), owner in zip(held, owners, strict=True):
            if owner != self.name:
                logger.warning("consumer %s: generation %s was taken over by %s",
                               self.type, h.gid, owner)
                h.task.cancel()

    # --- processing one generation ---------------------------------------------------------

    async def _own(self, eid: str, gid: str) -> None:
        """Process ``gid`` to its end and acknowledge its catalog entry.  Retries failed
        handlers from the checkpoint; gives up silently when fenced (no longer ours)."""
        set_generation(gid)  # this task is about gid alone: its log lines say so
        held = self._held[eid]
        attempt = 0
        while True:
            try:
                # A retry goes on only if the generation is still ours, one entry per commit
                # so that a failure is pinned on the entry that caused it.
                await self._process(gid, held, retry=attempt > 0)
                break
            except HandlerFailed:
                attempt += 1
                await asyncio.sleep(min(0.05 * 2 ** attempt, 5.0))
            except Fenced as exc:
                logger.info("%s", exc)
                return
            except GenerationNotFound:
                break  # expired between the catalog and the subscription: nothing to do
            except (RedisError, _Interrupted) as exc:
                # Leave it pending and stop touching it: after claim_idle this worker or
                # another takes it over from the checkpoint.
                logger.warning("consumer %s: generation %s interrupted by Redis (%s)",
                               self.type, gid, exc)
                return
        await self.redis.xack(self.keyspace.catalog, self.type, eid)

    async def _process(self, gid: str, held: _Held, *, retry: bool = False) -> None:
        cp = await self.store.take(gid, self.type, self.name, still_mine=retry)
        meta = await self.log.meta(gid) if cp is not None else None
        if cp is None or meta is None:
            logger.info("consumer %s: generation %s is gone (retention); skipping",
                        self.type, gid)
            return
        gen = Generation(gid, meta.provider, meta.model, meta.created, cp.state, cp.seq)
        records, sunk = cp.records, max(cp.sunk, held.sunk)
        if sunk < records:  # a previous owner may have stopped before its sink got them
            await self._deliver(gen, await self.store.records(gid, self.type, after=sunk))
            sunk = held.sunk = records
        committed = held.seq = held.head = cp.seq
        if not cp.done:
            if cp.seq == 0 and 0 not in cp.skip:  # start's failures count against seq 0
                await self._guarded(gen, 0, cp.skip, self.ctype.start, gen)
            async with self.hub.subscribe(gid, after=cp.seq, reader=False) as cursor:
                done = False
                while not done:
                    first = await anext(cursor, None)
                    if first is None:
                        if cursor.finished:
                            break
                        raise _Interrupted(f"the hub stopped following {gid}")
                    size = 1 if retry else self.settings.consumer_batch
                    batch = [first, *cursor.ready(size - 1)]
                    held.head = max(cursor.head, batch[-1].seq)
                    for event in batch:
                        if event.seq not in cp.skip:
                            await self._guarded(gen, event.seq, cp.skip, self._handle,
                                                gen, event)
                        gen.seq = event.seq
                    done = batch[-1].terminal
                    new, gen._records = gen._records, []
                    for i, record in enumerate(new, start=records + 1):
                        record.update(generation=gid, index=i)
                    # The type's checkpoint hook and the JSON encoding can fail too (a value
                    # JSON cannot hold): that counts against the batch's last entry.
                    encoded: list[str] = []
                    await self._guarded(gen, gen.seq, cp.skip, self._encode, gen, new,
                                        encoded)
                    records, wake = await self.store.commit(
                        gid, self.type, self.name, expected=committed, seq=gen.seq,
                        state=encoded[0], sunk=sunk, done=done, records=encoded[1:],
                    )
                    committed = held.seq = gen.seq
                    if wake:
                        await self._wake_producer(gid)
                    if new:
                        await self._deliver(gen, new)
                        sunk = held.sunk = records
            if sunk != cp.sunk:
                await self.store.mark_sunk(gid, self.type, sunk)
        await self.ctype.completed(gen, self.store)

    def _encode(self, gen: Generation, records: list[dict[str, Any]],
                out: list[str]) -> None:
        self.ctype.checkpoint(gen)
        out.append(json.dumps(gen.state, separators=(",", ":")))
        out += [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in records]

    def _handle(self, gen: Generation, event: Event) -> Awaitable[None] | None:
        if event.type == "token":
            return self.ctype.token(gen, event)
        if event.type == "gap":
            return self.ctype.gap(gen, event)
        if event.terminal:
            return self.ctype.end(gen, event)
        return self.ctype.other(gen, event)

    async def _guarded(self, gen: Generation, seq: int, skip: set[int],
                       handler: Callable[..., Awaitable[None] | None], *args: Any) -> None:
        """Await a handler's result; on failure count the attempt, dead-letter the entry at
        ``max_deliveries``, and raise :class:`HandlerFailed` to retry from the checkpoint."""
        try:
            await _call(handler(*args))
        except (asyncio.CancelledError, Fenced):
            raise
        except Exception as exc:
            attempts, dead = await self.store.fail(
                gen.id, self.type, self.name, seq, self.settings.max_deliveries
            )
            if not dead:
                logger.warning("consumer %s: generation %s entry %d failed (attempt %d/%d):"
                               " %r", self.type, gen.id, seq, attempts,
                               self.settings.max_deliveries, exc)
                raise HandlerFailed from exc
            logger.error("consumer %s: generation %s entry %d failed %d times; moved to the"
                         " dead-letter stream %s", self.type, gen.id, seq, attempts,
                         self.keyspace.dead_letters(self.type), exc_info=exc)
            entries = await self.log.read(gen.id, seq - 1, 1)
            entry = entries[0] if entries and entries[0].seq == seq else None
            await self.store.dead_letter(self.type, {
                "generation": gen.id, "seq": str(seq), "consumer": self.type,
                "worker": self.name, "attempts": str(attempts), "error": repr(exc)[:2000],
                "entry_type": entry.type if entry else "",
                "entry_data": json.dumps(entry.data) if entry else "",
            })
            skip.add(seq)
            raise HandlerFailed from exc

    async def _deliver(self, gen: Generation, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        try:
            await _call(self.ctype.deliver(gen, records))
        except Exception:
            # The records are committed in Redis; a broken sink must not stop the consumer.
            logger.exception("consumer %s: sink failed for generation %s", self.type, gen.id)

    async def _wake_producer(self, gid: str) -> None:
        await self.redis.xadd(
            self.keyspace.control, {"op": "progress", "id": gid},
            maxlen=self.settings.control_maxlen, approximate=True,
        )


@contextlib.asynccontextmanager
async def running_workers(
    types: Sequence[ConsumerType], settings: Settings, *, redis_url: str,
    redis: aioredis.Redis, log: GenerationLog, hub: Hub,
) -> AsyncIterator[list[Worker]]:
    """One worker per type, sharing a process's command client and hub; each gets its own
    connection for its blocking catalog read.  Drains them all on exit."""
    async with contextlib.AsyncExitStack() as stack:
        workers: list[Worker] = []
        for ctype in types:
            stack.callback(ctype.close)
            group_redis = blocking_client(redis_url, settings, f"consumer-{ctype.name}")
            stack.push_async_callback(group_redis.aclose)
            workers.append(await stack.enter_async_context(Worker(
                ctype, settings, redis=redis, group_redis=group_redis, log=log, hub=hub,
            )))
        yield workers
