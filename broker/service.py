"""The broker: Redis, the log, the producers and the hub of one process, wired together.

This is the Python API for services that produce or subscribe without HTTP, and what the
HTTP app, the demo and the benchmark run on::

    async with Broker.open(Settings()) as broker:
        info = await broker.start(GenerationRequest(messages=[...]))
        async for event in broker.events(info.id):
            ...
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from broker.backpressure import ConsumerGate
from broker.channels import ChannelEvent, ChannelPosition, follow_channel
from broker.connections import blocking_client, check_reachable, command_client, is_cluster_url
from broker.embedded import embedded_redis
from broker.errors import GenerationNotFound
from broker.events import Event
from broker.figures import ReplicaFigures
from broker.hub import Cursor, Hub
from broker.keys import entry_id, is_channel, is_generation_id, seq_of
from broker.log import GenerationLog, GenerationMeta, XReadReply
from broker.manager import GenerationInfo, GenerationManager
from broker.metrics import BrokerMetrics
from broker.presence import check_cancel_unread_after
from broker.providers import ProviderRegistry
from broker.providers.base import GenerationRequest
from broker.settings import Settings
from broker.watchdog import LeaseWatchdog
from consumers.catalog import Announcement, follow_catalog
from consumers.runtime import ConsumerType, Worker, running_workers
from consumers.store import ConsumerStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenerationState:
    """A generation's status and the text it has produced so far."""

    meta: GenerationMeta
    text: str


class Broker:
    """One process's broker.  Build it with :meth:`open`; everything it starts is stopped
    when that context exits (producers drained, hub and listeners cancelled and awaited,
    connections closed, and an embedded Redis stopped)."""

    def __init__(
        self, settings: Settings, redis: aioredis.Redis, log: GenerationLog, hub: Hub,
        manager: GenerationManager, url: str, metrics: BrokerMetrics | None = None, *,
        figures: ReplicaFigures,
    ) -> None:
        self.settings = settings
        # This process's figures (GET /metrics; snapshot() for dashboards), shared with the
        # hub and the manager that :meth:`open` built.
        self.metrics = metrics or manager.metrics
        self.redis = redis
        self.log = log
        self.hub = hub
        self.manager = manager
        self.url = url
        self.gate: ConsumerGate | None = None
        self.watchdog: LeaseWatchdog | None = None
        # This process's live figures, published for the console of any replica.
        self.figures = figures
        self.workers: list[Worker] = []
        self.consumer_store = ConsumerStore(redis, log.keyspace, settings.retention_seconds)
        self._shared_readers: aioredis.Redis | None = None  # on a cluster (reader_client)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, settings: Settings, *, redis_url: str | None = None,
        providers: ProviderRegistry | None = None, consumers: Sequence[ConsumerType] = (),
    ) -> AsyncIterator[Broker]:
        """Connect (or start an embedded Redis if no URL is configured) and run.

        ``redis_url`` overrides ``settings.redis_url``.  ``providers`` defaults to the
        registry built from the settings.  ``consumers``: durable consumer types to run a
        worker of in this process (sharing its hub); on exit, producers drain first, then
        these workers, so the consumers that hold producers back outlive them.
        """
        async with contextlib.AsyncExitStack() as stack:
            url = redis_url or settings.redis_url
            if url is None:
                url = await stack.enter_async_context(embedded_redis())
                logger.info("no REDIS_URL set: started an embedded redis-server at %s", url)
            redis = command_client(url, settings)
            stack.push_async_callback(redis.aclose)
            await check_reachable(redis, url)  # fail fast, with a clear error
            hub_redis = blocking_client(url, settings, "hub")
            stack.push_async_callback(hub_redis.aclose)
            control_redis = blocking_client(url, settings, "control")
            stack.push_async_callback(control_redis.aclose)
            shared_readers = None
            if is_cluster_url(url, settings):  # see reader_client
                shared_readers = blocking_client(url, settings, "readers", many=True)
                stack.push_async_callback(shared_readers.aclose)
            registry = providers or ProviderRegistry.from_settings(settings)
            stack.push_async_callback(registry.aclose)
            log = GenerationLog.for_settings(redis, settings)
            metrics = BrokerMetrics()
            hub = await stack.enter_async_context(Hub(log, hub_redis, settings, metrics))
            watchdog = None
            if settings.watchdog:
                # Entered before the manager, so it keeps watching while producers drain.
                watchdog_redis = blocking_client(url, settings, "watchdog")
                stack.push_async_callback(watchdog_redis.aclose)
                watchdog = await stack.enter_async_context(
                    LeaseWatchdog(log, watchdog_redis, settings)
                )
            gate = await stack.enter_async_context(
                ConsumerGate(redis, log.keyspace, settings)
            )
            workers = await stack.enter_async_context(running_workers(
                consumers, settings, redis_url=url, redis=redis, log=log, hub=hub,
            ))
            if workers and gate.enabled:
                await gate.refresh()  # our own workers just checked in: count them at once
            manager = GenerationManager(log, registry, settings, control_redis, gate, metrics)
            # Entered before the manager, so that a draining process still counts in the
            # deployment's figures; it drops out at once when it has drained.
            figures = await stack.enter_async_context(
                ReplicaFigures(redis, log.keyspace, manager.owner, metrics, hub)
            )
            await stack.enter_async_context(manager)
            broker = cls(settings, redis, log, hub, manager, url, metrics, figures=figures)
            broker._shared_readers = shared_readers
            broker.gate = gate
            broker.watchdog = watchdog
            broker.workers = workers
            yield broker

    # --- producing --------------------------------------------------------------------------

    async def start(
        self, request: GenerationRequest, provider: str | None = None, *,
        idempotency_key: str | None = None, channel: str | None = None,
        cancel_unread_after: float | None = None,
    ) -> GenerationInfo:
        """Start a generation in this process (see :meth:`GenerationManager.start`), or,
        with an ``idempotency_key`` used before, return that key's generation.  With
        ``channel``, followers of that channel (:meth:`channel`) get its events too.

        With ``cancel_unread_after`` (seconds, > 0, at most a day), the generation is
        cancelled (``cancelled``, reason ``unread``) once nobody has read it for that long,
        from its creation on: no cursor of :meth:`subscribe`/:meth:`events` (and so no SSE
        client) in any process.  Durable consumers do not count as readers.  The check runs
        every ``lease_seconds / 3``.

        Raises ``ValueError`` for a malformed channel name or ``cancel_unread_after``."""
        if channel is not None and not is_channel(channel):
            raise ValueError("a channel name is 1-128 characters of [A-Za-z0-9_.:-]")
        if cancel_unread_after is not None:
            cancel_unread_after = check_cancel_unread_after(cancel_unread_after)
        return await self.manager.start(request, provider, idempotency_key=idempotency_key,
                                        channel=channel,
                                        cancel_unread_after=cancel_unread_after)

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` was called (or the broker is closing)."""
        return self.manager.draining

    def drain(self) -> None:
        """Begin a graceful stop: :meth:`start` raises ``ShuttingDown`` from now on (HTTP
        503), running generations get ``shutdown_grace_seconds`` to finish, and those still
        running then end with ``error``/``shutdown``.  Reading, cancelling and the consumer
        workers go on until the broker is closed.  Idempotent; returns at once."""
        self.manager.drain()

    async def channel(self, name: str, after: str | None = None
                      ) -> AsyncIterator[ChannelEvent]:
        """Every event of every generation started in channel ``name``, tagged with its
        generation, in arrival order, forever; ``after``: a ``position`` of an earlier
        :class:`ChannelEvent`, to resume with nothing lost or repeated (default: from the
        channel's first generation).  Raises ``InvalidResumePoint`` for a malformed
        position and ``ValueError`` for a malformed name."""
        if not is_channel(name):
            raise ValueError("a channel name is 1-128 characters of [A-Za-z0-9_.:-]")
        position = ChannelPosition.parse(after) if after else None
        async for item in follow_channel(self, name, position):
            yield item

    async def cancel(self, gid: str, reason: str = "requested") -> str:
        """Cancel ``gid`` wherever its producer runs.  Returns the status after the request
        (``running`` while the producer is stopping).  Raises ``GenerationNotFound``."""
        _check_id(gid)
        status = await self.log.request_cancel(gid, reason)
        if not status:
            raise GenerationNotFound(gid)
        # A local producer hears it through the control stream like any other; cancelling
        # it directly as well saves that round trip.
        self.manager.cancel_local(gid, reason)
        return status

    # --- reading ----------------------------------------------------------------------------

    async def state(self, gid: str) -> GenerationState:
        """Status and text so far.  Raises ``GenerationNotFound``."""
        _check_id(gid)
        meta = await self.log.meta(gid)
        if meta is None:
            raise GenerationNotFound(gid)
        return GenerationState(meta=meta, text=await self.log.text(gid))

    async def snapshot(self, gid: str) -> Event:
        """The text so far as one ``snapshot`` event, for a late joiner: its ``seq`` is the
        last entry it covers, so ``events(gid, after=snapshot.seq)`` is the rest.  If the
        generation has ended, the terminal entry is left to that rest.  Raises
        ``GenerationNotFound``."""
        _check_id(gid)
        found = await self.log.snapshot(gid)
        if found is None:
            raise GenerationNotFound(gid)
        text, last_seq, status = found
        seq = last_seq - 1 if status != "running" and last_seq > 0 else last_seq
        return Event(seq=seq, type="snapshot", data={"text": text})

    def subscribe(
        self, gid: str, after: int = 0
    ) -> contextlib.AbstractAsyncContextManager[Cursor]:
        """A cursor over ``gid`` after sequence number ``after`` (see :meth:`Hub.subscribe`)."""
        _check_id(gid)
        return self.hub.subscribe(gid, after)

    @contextlib.asynccontextmanager
    async def reader_client(self, role: str) -> AsyncIterator[aioredis.Redis]:
        """A client for one blocking reader (a channel's announcements, the catalog, a
        consumer's records), with a connection of its own.  On a cluster it is one shared
        cluster client, which gives each concurrent read its own connection to the node
        that serves the key: a new cluster client would first load the slot map and the
        command table (100 ms and more) for every reader."""
        if self._shared_readers is not None:
            yield self._shared_readers
            return
        client = blocking_client(self.url, self.settings, role)
        try:
            yield client
        finally:
            await client.aclose()

    async def generations(self, after: str = "$") -> AsyncIterator[Announcement]:
        """Every generation announced on the catalog after position ``after`` (``"$"``: from
        now on, ``"0"``: all that are kept), from any broker process, forever.  Holds one
        dedicated Redis connection while iterating."""
        async with self.reader_client("catalog") as client:
            async for announcement in follow_catalog(
                client, self.log.keyspace, after=after, block_ms=self.settings.block_ms
            ):
                yield announcement

    async def records(
        self, gid: str, consumer_type: str, after: int = 0
    ) -> AsyncIterator[dict[str, Any]]:
        """The records ``consumer_type`` emits for ``gid`` (index > ``after``), as they are
        committed, until the type has processed the terminal entry.  Waits as long as the
        generation exists: with no worker of the type running, that is until its retention
        ends.  Raises ``GenerationNotFound`` (also when the generation expires meanwhile)
        and ``ValueError`` for ``after < 0``.  Holds one dedicated Redis connection while
        iterating."""
        _check_id(gid)
        if after < 0:
            raise ValueError("after must be >= 0")
        if await self.log.meta(gid) is None:
            raise GenerationNotFound(gid)
        key = self.log.keyspace.output(gid, consumer_type)
        async with self.reader_client("records") as client:
            while True:
                # Records and the done flag are committed together: once done is seen, every
                # record is in the stream, and a read from ``after`` returns them at once.
                cp = await self.consumer_store.checkpoint(gid, consumer_type)
                if cp is not None and cp.done and cp.records <= after:
                    return
                reply = cast(XReadReply, await client.xread(
                    {key: entry_id(after)}, block=self.settings.block_ms, count=500
                ))
                if not reply and await self.log.meta(gid) is None:
                    raise GenerationNotFound(gid)  # expired while we waited
                for _key, entries in reply or []:
                    for eid, fields in entries:
                        after = seq_of(eid)
                        yield json.loads(fields[b"data"])

    async def events(self, gid: str, after: int = 0) -> AsyncIterator[Event]:
        """Every event of ``gid`` after ``after`` up to and including the terminal one.

        Raises ``GenerationNotFound`` or ``InvalidResumePoint`` on the first iteration.
        Breaking out of the loop (or cancelling) releases the subscription.
        """
        async with self.subscribe(gid, after) as cursor:
            async for event in cursor:
                yield event


def _check_id(gid: str) -> None:
    # Anything else is no id we made, and could break the key's hash tag.
    if not is_generation_id(gid):
        raise GenerationNotFound(gid)
