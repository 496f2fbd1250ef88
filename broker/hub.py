"""The per-process hub: reads each live generation's log once and feeds reader cursors.

One blocking ``XREAD`` on one dedicated connection covers every live stream this process has
readers for, plus a private *wake* stream: to add a stream to a read that is already blocked,
the hub appends to its wake stream, the read returns, and the next read names the new stream.
No connection per reader, no polling, no cancelled blocking reads in normal operation.

On a Redis Cluster one ``XREAD`` may only name keys of one hash slot, so the hub keeps one
*read group* per slot that has live streams: each with its own blocking ``XREAD`` (sent to
the node that owns the slot, on a connection of its own while it blocks), its own wake stream
in that slot, and its own reader task, which ends when the slot has no live stream left.
Without a cluster there is one group for everything, as described above.

A :class:`Cursor` is one reader's position (``last`` delivered seq).  Two modes:

- *live*: the hub appends new entries to the cursor's bounded buffer as it reads them;
- *behind*: the cursor reads the log itself with non-blocking ``XRANGE`` from its own
  position (on the shared command pool) until it reaches the hub's head, then turns live.

Every cursor starts behind (a late joiner or a resume is just a cursor behind the head), and a
live cursor whose buffer is full, or that would see a hole, drops back to behind instead of
buffering more: a slow reader costs a bounded buffer, never memory in proportion to its lag,
and never slows the hub, other readers or the producer.  Because asyncio is single-threaded
and a cursor only turns live after checking, with no await in between, that it has everything
up to the hub's head, there is no gap and no duplicate at the seam.

Entries that the log no longer holds (trimmed, expired) are reported to the reader as one
``gap`` event, never skipped silently.  If the log loses entries the hub has already read
(a failover to a replica that lacked them; the producer normally writes them again) and then
ends below the hub's head, where no read after the head can see the end, the reaper ends the
readers with ``error``/``log_lost``.

The hub also reaps generations whose producer died: a live stream that is silent for a lease
period and has no lease left is ended with ``error``/``producer_lost`` (unless built with
``reap=False``, as in consumer worker processes; the API replicas' watchdogs, which follow
every generation whether read or not, usually get there first).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from broker.connections import raise_if_cancelled
from broker.errors import GenerationNotFound, InvalidResumePoint
from broker.events import Event
from broker.keys import entry_id
from broker.log import GenerationLog, GenerationMeta, StreamEntry, XReadReply, decode_entries
from broker.logs import generation_context
from broker.metrics import BrokerMetrics
from broker.presence import ReaderPresence
from broker.settings import Settings

logger = logging.getLogger(__name__)

# Below this many streams in one XREAD, re-reading at once is cheap: no batching window.
_BATCH_FROM_STREAMS = 32


class _Stream:
    """Hub state for one generation that has at least one cursor in this process."""

    __slots__ = ("activity", "cursors", "gid", "head", "log_key", "readers", "slot",
                 "terminal_seq", "unread_after")

    def __init__(self, gid: str, log_key: str, head: int, terminal_seq: int | None) -> None:
        self.gid = gid
        self.log_key = log_key
        self.slot: int | None = None  # the log's hash slot when Redis is a cluster
        self.head = head  # highest seq this hub knows to be in the log
        self.terminal_seq = terminal_seq
        self.cursors: set[Cursor] = set()
        self.readers = 0  # cursors that count as readers (not a durable consumer's)
        self.unread_after: float | None = None  # the generation's cancel_unread_after
        self.activity = time.monotonic()

    @property
    def live(self) -> bool:
        return self.terminal_seq is None

    @property
    def watched(self) -> bool:
        """Live, with the ``cancel_unread_after`` policy: this hub reports its readers."""
        return self.unread_after is not None and self.terminal_seq is None


class _ReadGroup:
    """The live streams read by one blocking ``XREAD``: those of one hash slot on a cluster
    (``slot``), else all of them (``slot`` None)."""

    __slots__ = ("blocked", "by_key", "slot", "task", "wake_key", "wake_key_bytes",
                 "wake_last", "woken")

    def __init__(self, slot: int | None, wake_key: str) -> None:
        self.slot = slot
        self.wake_key = wake_key
        self.wake_key_bytes = wake_key.encode()
        self.wake_last = "0-0"
        self.by_key: dict[bytes, _Stream] = {}
        self.blocked = False  # an XREAD of this group is in flight
        self.woken = False  # the wake stream exists (delete it when done)
        self.task: asyncio.Task[None] | None = None


class Cursor:
    """One reader's position in one generation.  Iterate it for :class:`Event` values.

    Iteration ends after the terminal entry.  ``__anext__`` is safe to cancel (for example
    by a heartbeat timeout): the cursor's position only moves when an event is returned.
    """

    def __init__(self, hub: Hub, stream: _Stream, after: int, max_buffer: int) -> None:
        self._hub = hub
        self._stream = stream
        self.last = after  # seq of the last event handed to the reader
        self._tail = after  # seq of the last event in the buffer (or ``last``)
        self._buffer: deque[Event] = deque()
        self._max_buffer = max_buffer
        self._behind = True
        self._wake = asyncio.Event()
        self._done = False  # subscribe() decides, once it has validated ``after``
        self.closed = False
        self.fell_behind = 0  # how often the hub had to drop this cursor to log reads

    @property
    def gid(self) -> str:
        return self._stream.gid

    @property
    def head(self) -> int:
        """The highest seq this process knows the log to hold (a reader's lag is
        ``head - last``)."""
        return self._stream.head

    @property
    def finished(self) -> bool:
        """True once the terminal event was returned (or the reader resumed after it)."""
        return self._done

    def __aiter__(self) -> Cursor:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._buffer:
                return self._take()
            if self._done or self.closed:
                raise StopAsyncIteration
            if self._behind:
                await self._catch_up()
                raise_if_cancelled()
                continue
            self._wake.clear()
            await self._wake.wait()

    def ready(self, limit: int = 1_000) -> list[Event]:
        """The events already buffered (up to ``limit``), without waiting: lets a writer
        send several events in one write."""
        out: list[Event] = []
        while self._buffer and len(out) < limit and not self._done:
            out.append(self._take())
        return out

    def _take(self) -> Event:
        event = self._buffer.popleft()
        self.last = event.seq
        if event.terminal:
            self._done = True
        return event

    async def _catch_up(self) -> None:
        stream = self._stream
        # What the hub knew *before* the read: only entries the hub had seen before we asked
        # can be judged missing from an empty reply; newer ones may have been appended after
        # the read was served, and the next round reads them.
        head_before = stream.head
        terminal_before = stream.terminal_seq
        events = await self._hub.log.read(stream.gid, self.last, self._hub.settings.catchup_batch)
        if events:
            # A hole before the first entry (trimmed), or between two (a producer that ended
            # after entries a failover lost, ``skip_lost``): one ``gap`` event for each.
            if events[-1].seq - self.last == len(events):  # contiguous: the usual case
                self._buffer.extend(events)
            else:
                previous = self.last
                for event in events:
                    if event.seq > previous + 1:
                        self._buffer.append(_gap(previous + 1, event.seq - 1))
                    self._buffer.append(event)
                    previous = event.seq
            self._tail = events[-1].seq
            return
        # The log holds nothing after ``last``.  If the hub had seen more before we asked,
        # those entries are gone (trimmed or expired): say so instead of waiting for them.
        if head_before > self.last:
            if terminal_before is not None:
                # The terminal entry is gone too: end the reader explicitly.
                if head_before - 1 > self.last:
                    self._buffer.append(_gap(self.last + 1, head_before - 1))
                self._buffer.append(_lost(head_before))
            else:
                self._buffer.append(_gap(self.last + 1, head_before))
            self._tail = head_before
            return
        if stream.head > self.last:
            return  # the hub saw new entries while we read: read again
        if stream.terminal_seq is not None and self.last >= stream.terminal_seq:
            self._done = True
            return
        self._behind = False  # caught up with the hub's head: go live

    def _offer(self, events: list[Event]) -> None:
        """Called by the hub with new entries (contiguous, ascending)."""
        if self._done or self.closed:
            return
        if not self._behind:
            # A cursor that read the log itself can be ahead of the hub: skip what it has.
            fresh = events if events[0].seq > self._tail else [
                e for e in events if e.seq > self._tail
            ]
            if not fresh:
                if events[-1].terminal and events[-1].seq <= self.last:
                    # The reader resumed after the terminal entry before the hub had read
                    # it: nothing follows, so end instead of waiting forever.
                    self._done = True
                    self._wake.set()
                return
            if fresh[0].seq != self._tail + 1 or len(self._buffer) + len(fresh) > (
                self._max_buffer
            ):
                # Full or discontinuous: keep what is buffered (contiguous after ``last``)
                # and read the rest from the log at the reader's own pace.
                self._behind = True
                self.fell_behind += 1
            else:
                self._buffer.extend(fresh)
                self._tail = fresh[-1].seq
        self._wake.set()

    def _close(self) -> None:
        self.closed = True
        self._wake.set()


def _gap(first: int, last: int) -> Event:
    return Event(seq=last, type="gap", data={"first_missing": first, "last_missing": last})


_GONE = "the log of this generation is gone"
_ROLLED_BACK = ("the log of this generation lost entries this reader had read, and ended"
                " (a Redis failover to a replica that had not received them)")


def _lost(seq: int, message: str = _GONE) -> Event:
    """A synthetic terminal for a generation whose log (or its end) is gone from Redis."""
    return Event(seq=seq, type="error", data={"code": "log_lost", "message": message})


class Hub:
    """Per-process fan-out from the log to cursors.  Use as an async context manager."""

    def __init__(
        self, log: GenerationLog, block_redis: aioredis.Redis, settings: Settings,
        metrics: BrokerMetrics | None = None, *, reap: bool = True,
    ) -> None:
        self.log = log
        self.presence = ReaderPresence(log.redis, log.keyspace, settings.lease_ms)
        # False in consumer worker processes: they end nobody's generation (that is the
        # API replicas' watchdog's job), they only notice one whose keys vanished.
        self.reap = reap
        self.settings = settings
        self.metrics = metrics or BrokerMetrics()
        self._block_redis = block_redis
        self._id = secrets.token_hex(8)
        self._cluster = isinstance(block_redis, RedisCluster)
        self._streams: dict[str, _Stream] = {}
        # Read groups by hash slot; without a cluster, one permanent group (key None).
        self._groups: dict[int | None, _ReadGroup] = {}
        if not self._cluster:
            self._groups[None] = _ReadGroup(None, log.keyspace.hub_wake(self._id))
        self._group_serial = 0
        self._preparing: dict[str, asyncio.Task[_Stream]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._cursors = 0
        self.idle = asyncio.Event()  # set while no cursor is open in this process
        self.idle.set()
        self.reads = 0  # XREAD calls issued (for benchmarks)

    async def __aenter__(self) -> Hub:
        self._tasks = [asyncio.create_task(self._reaper(), name="tokentee-hub-reaper")]
        if not self._cluster:
            self._start_group(self._groups[None])
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        groups = list(self._groups.values())
        tasks = [*self._tasks, *self._preparing.values(),
                 *(g.task for g in groups if g.task is not None)]
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                logger.error("hub task had failed: %r", outcome)
        self._tasks = []
        # Its readers leave with it (a SIGTERM's clients reconnect elsewhere, and report
        # there): the unread period runs from now, not from when this hub's presence would
        # lapse.  Reported below, after the cursors are closed (no await before that), and
        # not again as each cursor then goes (unread_after cleared).
        leaving = [(s.gid, cast(float, s.unread_after))
                   for s in self._streams.values() if s.readers and s.watched]
        for stream in list(self._streams.values()):
            stream.unread_after = None
            for cursor in list(stream.cursors):
                cursor._close()
        if leaving:
            try:
                await self.presence.gone(self._id, leaving)
            except (RedisError, RedisClusterException) as exc:
                logger.warning("could not report readers of %d generation(s) leaving: %s",
                               len(leaving), exc)
        for group in groups:
            if group.woken or group.slot is None:
                with contextlib.suppress(RedisError, RedisClusterException):
                    await self.log.redis.delete(group.wake_key)

    # --- public API ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the hub's reader and reaper tasks run (false before ``__aenter__``,
        after ``__aexit__``, or if one of them died)."""
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def cursor_count(self) -> int:
        return self._cursors

    @property
    def read_groups(self) -> int:
        """Blocking reads this hub runs at once: 1, or on a cluster one per hash slot with
        live streams."""
        return sum(1 for g in self._groups.values() if g.task is not None)

    @contextlib.asynccontextmanager
    async def subscribe(self, gid: str, after: int = 0, *, reader: bool = True
                        ) -> AsyncIterator[Cursor]:
        """A cursor over ``gid`` that yields every entry with ``seq > after``.

        Raises :class:`GenerationNotFound` for an unknown id and :class:`InvalidResumePoint`
        for ``after`` below 0 or beyond what the generation has written.  Leaving the
        context releases everything the cursor held.

        ``reader``: the cursor keeps a generation with ``cancel_unread_after`` alive (for
        that generation, the first reader of this hub is recorded in Redis before the cursor
        is returned).  Durable consumers pass False: they do not count as readers.
        """
        if after < 0:
            raise InvalidResumePoint("resume id must be >= 0")
        while True:
            stream, needs_wake = await self._attach(gid)
            # _attach may have awaited another subscriber's preparation, and that subscriber
            # may have left since: only join a stream the hub still tracks.
            if self._streams.get(gid) is stream:
                break
        cursor = Cursor(self, stream, after, self.settings.client_queue_size)
        stream.cursors.add(cursor)  # before any await, so the stream cannot be released
        self._cursors += 1
        self.idle.clear()
        if reader:
            stream.readers += 1
        # Decided before any await: of two readers arriving together, the first reports.
        first_reader = reader and stream.readers == 1
        try:
            if needs_wake:
                await self._wake_reader(stream)
            if first_reader and stream.watched:
                await self._present([stream])
            if after > stream.head:
                # The hub's head can trail the log by one read; ask the log before refusing.
                meta = await self.log.meta(gid)
                if meta is None or after > meta.last_seq:
                    raise InvalidResumePoint(
                        f"resume id {after} is beyond the end of generation {gid}"
                    )
            cursor._done = stream.terminal_seq is not None and after >= stream.terminal_seq
            yield cursor
        finally:
            cursor._close()
            stream.cursors.discard(cursor)
            self._cursors -= 1
            if not self._cursors:
                self.idle.set()
            self._release(stream)
            if reader:
                stream.readers -= 1
                if not stream.readers and stream.watched:
                    await self._left(stream)

    # --- stream bookkeeping ----------------------------------------------------------------

    async def _attach(self, gid: str) -> tuple[_Stream, bool]:
        """The hub's stream for ``gid``, loading it if needed (``GenerationNotFound``), and
        whether the caller must wake the reader for it (a newly registered live stream).

        Loading runs in a task the hub owns, shared by every subscriber that arrives
        meanwhile: a subscriber cancelled while it waits cancels only its own wait.  There
        is no await between registering the stream and returning it, so the caller's cursor
        is in place before anything can release the stream.
        """
        stream = self._streams.get(gid)
        if stream is not None:
            return stream, False
        loading = self._preparing.get(gid)
        if loading is None:
            loading = asyncio.create_task(self._load(gid), name=f"tokentee-hub-load-{gid}")
            self._preparing[gid] = loading
            loading.add_done_callback(functools.partial(self._loaded, gid))
        stream = await asyncio.shield(loading)
        registered = self._streams.get(gid)
        if registered is not None:
            return registered, False
        self._streams[gid] = stream
        if not stream.live:
            return stream, False
        group = self._group_for(stream)
        group.by_key[stream.log_key.encode()] = stream
        if group.task is None and self._tasks:
            # A new slot's group: its first read names the stream, no wake needed.
            self._start_group(group)
            return stream, False
        return stream, True

    async def _load(self, gid: str) -> _Stream:
        meta = await self.log.meta(gid)
        if meta is None:
            raise GenerationNotFound(gid)
        stream = _Stream(
            gid, self.log.keys(gid).log, meta.last_seq, meta.last_seq if meta.terminal else None
        )
        stream.unread_after = meta.cancel_unread_after
        if self._cluster:
            stream.slot = key_slot(stream.log_key.encode())
        return stream

    def _group_for(self, stream: _Stream) -> _ReadGroup:
        group = self._groups.get(stream.slot)
        if group is None:
            # The wake stream must be in the slot: tag it with this generation's id.
            self._group_serial += 1
            wake = self.log.keyspace.hub_wake(f"{self._id}.{self._group_serial}", stream.gid)
            group = self._groups[stream.slot] = _ReadGroup(stream.slot, wake)
        return group

    def _start_group(self, group: _ReadGroup) -> None:
        name = "tokentee-hub-reader" if group.slot is None else f"tokentee-hub-slot-{group.slot}"
        group.task = asyncio.create_task(self._reader(group), name=name)
        if group.slot is not None:
            group.task.add_done_callback(self._reader_done)

    @staticmethod
    def _reader_done(task: asyncio.Task[None]) -> None:
        # A slot's reader that ended by itself is not awaited by ``__aexit__``: report its
        # failure here (a bug: Redis errors are retried inside the loop).
        if not task.cancelled() and task.exception() is not None:
            logger.error("hub reader %s failed", task.get_name(), exc_info=task.exception())

    def _loaded(self, gid: str, task: asyncio.Task[_Stream]) -> None:
        if self._preparing.get(gid) is task:
            del self._preparing[gid]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter re-raises it through its shield

    def _release(self, stream: _Stream) -> None:
        if stream.cursors:
            return
        if self._streams.get(stream.gid) is stream:
            del self._streams[stream.gid]
        self._unfollow(stream)
        # A blocked XREAD may still name the stream; its reply is ignored when it returns.

    def _unfollow(self, stream: _Stream) -> None:
        group = self._groups.get(stream.slot)
        if group is not None and group.by_key.get(stream.log_key.encode()) is stream:
            del group.by_key[stream.log_key.encode()]

    async def _wake_reader(self, stream: _Stream) -> None:
        """Make a blocked read return so that the next one names the new stream.

        Only a blocked read needs waking; otherwise the next read names the stream anyway.
        If the wake fails, the stream still joins the read after at most ``block_ms``, so the
        failure is logged, not raised (raising would strand readers already attached).
        """
        group = self._groups.get(stream.slot)
        if group is None or not group.blocked:
            return
        group.woken = True
        try:
            async with self.log.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(group.wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.expire(group.wake_key, 86_400)  # outlives no crashed process by long
                await pipe.execute()
        except (RedisError, RedisClusterException) as exc:
            logger.warning("hub wake failed (%s); new stream joins at the next read", exc)
            self.metrics.redis_error("hub_wake")

    # --- the reader ----------------------------------------------------------------------------

    async def _reader(self, group: _ReadGroup) -> None:
        backoff = 0.1
        try:
            while True:
                raise_if_cancelled()
                if group.slot is not None and not group.by_key:
                    return  # no live stream left in this slot; a new one starts a new group
                try:
                    await self._read_once(group)
                    backoff = 0.1
                except (RedisError, RedisClusterException) as exc:
                    # Any Redis failure (on a cluster also a failover, or a slot that no
                    # node serves for a moment): a dead reader would leave cursors waiting.
                    self.metrics.redis_error("hub_read")
                    logger.warning("hub read failed (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)  # reconnect backoff, not a data poll
                    backoff = min(backoff * 2, 5.0)
        finally:
            if group.slot is not None and self._groups.get(group.slot) is group:
                del self._groups[group.slot]  # with no await since the check above
                if group.woken:
                    with contextlib.suppress(RedisError, RedisClusterException):
                        await self.log.redis.delete(group.wake_key)

    async def _xread(self, group: _ReadGroup, names: dict[Any, Any]) -> XReadReply | None:
        # On a cluster all of ``names`` are in the group's slot, and the cluster client sends
        # the read straight to the node that serves it (``connections._Cluster``); on
        # ``MOVED`` redis-py updates its slot map and retries on the new owner, and after a
        # connection error the map is reloaded before the next read.
        return cast(XReadReply | None, await self._block_redis.xread(
            names, block=self.settings.block_ms, count=self.settings.catchup_batch
        ))

    async def _read_once(self, group: _ReadGroup | None = None) -> None:
        group = group or self._groups[None]
        names: dict[Any, Any] = {group.wake_key: group.wake_last}
        for key, stream in group.by_key.items():
            names[key] = entry_id(stream.head)
        # Building ``names`` and setting ``blocked`` happen with no await in between, so a
        # stream attached after this point finds ``blocked`` set and wakes the read.
        group.blocked = True
        try:
            with self.metrics.hub_read_seconds.time():
                reply = await self._xread(group, names)
        finally:
            group.blocked = False
        self.reads += 1
        for key, entries in reply or []:
            if key == group.wake_key_bytes:
                group.wake_last = entries[-1][0].decode()
                continue
            target = group.by_key.get(key)
            if target is not None:
                self._dispatch(target, entries)
        if reply and self.settings.hub_batch_ms and len(names) > _BATCH_FROM_STREAMS:
            # Each XREAD costs Redis and us work per stream it names; re-issuing it the
            # moment one entry arrived would cost that per entry.  A short pause after
            # delivering lets the next read collect the entries of many streams: a batching
            # window that only ever follows data (an idle hub stays blocked in XREAD), and
            # only where the read is wide enough for the saving to beat the added latency.
            await asyncio.sleep(self.settings.hub_batch_ms / 1000)

    def _dispatch(self, stream: _Stream, entries: list[StreamEntry]) -> None:
        events = [e for e in decode_entries(entries) if e.seq > stream.head]
        if events:
            now = time.time()
            for event in events:
                if event.ts:  # entries the broker did not write may have no ts
                    self.metrics.hub_entry_age_seconds.observe(max(0.0, now - event.ts))
            self._deliver(stream, events)

    def _deliver(self, stream: _Stream, events: list[Event]) -> None:
        """Hand new entries (ascending, after ``head``) to every cursor of the stream."""
        stream.head = events[-1].seq
        stream.activity = time.monotonic()
        if events[-1].terminal:
            stream.terminal_seq = events[-1].seq
            self._unfollow(stream)
        for cursor in stream.cursors:
            cursor._offer(events)

    def _lose(self, gid: str, meta: GenerationMeta | None) -> None:
        """End the readers of a live stream whose end they can never read, with an explicit
        error instead of letting them wait forever: the generation's keys are gone
        (``meta`` None: expired, or Redis restarted without its data), or it ended at or
        below the hub's head (the log lost entries the hub had read, in a failover, and
        whoever ended it numbered the terminal entry after what was left)."""
        stream = self._streams.get(gid)
        if stream is None or not stream.live:
            return
        with generation_context(gid):
            if meta is None:
                logger.warning("generation %s vanished from Redis; ending its readers", gid)
                message = _GONE
            elif meta.terminal and meta.last_seq <= stream.head:
                logger.error("generation %s ended at seq %d, below the %d its readers got:"
                             " the log lost entries; ending its readers", gid, meta.last_seq,
                             stream.head)
                message = _ROLLED_BACK
            else:
                return
        self._deliver(stream, [_lost(stream.head + 1, message)])

    # --- the reaper ----------------------------------------------------------------------------

    async def _reaper(self) -> None:
        """Every third of a lease: report this hub's readers of generations with the
        ``cancel_unread_after`` policy; every lease: end the readers of generations whose
        producer died.  Periodic liveness checks, not data polls."""
        tick = self.settings.lease_seconds / 3
        ticks = 0
        while True:
            raise_if_cancelled()
            await asyncio.sleep(tick)
            await self._present([s for s in self._streams.values() if s.readers and s.watched])
            ticks += 1
            if ticks % 3 == 0:
                await self._reap_quiet()

    async def _present(self, streams: list[_Stream]) -> None:
        """This hub has readers of ``streams`` (watched ones): present for a lease from now.
        A failure is logged: the next tick retries, well within the lease."""
        if not streams:
            return
        try:
            await self.presence.here(
                self._id, [(s.gid, cast(float, s.unread_after)) for s in streams]
            )
        except (RedisError, RedisClusterException) as exc:
            self.metrics.redis_error("presence")
            logger.warning("could not report readers of %d generation(s): %s",
                           len(streams), exc)

    async def _left(self, stream: _Stream) -> None:
        """The last reader of ``stream`` in this hub left: the generation is unread from now
        on, unless another hub has readers.  If the write fails, this hub's presence lapses
        a lease after its last refresh instead."""
        try:
            await self.presence.left(self._id, stream.gid, cast(float, stream.unread_after))
        except (RedisError, RedisClusterException) as exc:
            self.metrics.redis_error("presence")
            logger.warning("generation %s: could not report its last reader leaving: %s",
                           stream.gid, exc)

    async def _reap_quiet(self) -> None:
        interval = self.settings.lease_seconds
        now = time.monotonic()
        quiet = [
            s.gid for s in self._streams.values() if s.live and now - s.activity >= interval
        ]
        if not quiet:
            return
        try:
            alive = await self.log.lease_alive(quiet)
            for gid, ok in zip(quiet, alive, strict=True):
                if ok:
                    continue
                if self.reap:
                    await self.log.reap_if_orphaned(gid)
                # Gone, or ended where our read cannot see it: end the readers.
                self._lose(gid, await self.log.meta(gid))
        except RedisError as exc:  # OOM, READONLY, ...: retried at the next check
            self.metrics.redis_error("reaper")
            logger.warning("reaper check failed: %s", exc)
