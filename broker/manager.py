"""The generation manager: owns this process's producer tasks.

It starts generations, keeps their leases alive while the upstream is quiet (a producer
whose lease could not be renewed because it expired is stopped), follows the control stream
so that a cancel posted to *any* broker process reaches the producer wherever it runs, and
drains on shutdown: no new generations, producers get ``shutdown_grace_seconds`` to finish,
then are cancelled (each writes ``error`` with code ``shutdown``) and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from types import TracebackType
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.backpressure import ConsumerGate
from broker.connections import raise_if_cancelled
from broker.errors import AtCapacity, IdempotencyConflict, ShuttingDown
from broker.keys import new_generation_id
from broker.log import GenerationLog, StreamEntry, XReadReply
from broker.logs import generation_context
from broker.metrics import BrokerMetrics
from broker.presence import UNREAD, ReaderPresence
from broker.producer import Producer
from broker.providers import ProviderRegistry
from broker.providers.base import GenerationRequest
from broker.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenerationInfo:
    id: str
    provider: str
    model: str
    created: float
    replayed: bool = False  # an Idempotency-Key's earlier generation, not a new one


# A reservation whose generation is gone (expired) is replaced after this long; younger, the
# generation may still be being created by the request that reserved the key.
_RESERVATION_GRACE_SECONDS = 30.0


class GenerationManager:
    """Starts and owns producers.  Use as an async context manager."""

    def __init__(
        self, log: GenerationLog, providers: ProviderRegistry, settings: Settings,
        control_redis: aioredis.Redis, gate: ConsumerGate | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.log = log
        self.metrics = metrics or BrokerMetrics()
        self.providers = providers
        self.settings = settings
        self.owner = f"p-{secrets.token_hex(8)}"
        self._control_redis = control_redis
        self.gate = gate
        self._producers: dict[str, tuple[Producer, asyncio.Task[None]]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        self._starting = 0  # start() calls between the capacity check and registration
        self.presence = ReaderPresence(log.redis, log.keyspace, settings.lease_ms)
        # Local generations with cancel_unread_after: (seconds, loop time created).
        self._unread: dict[str, tuple[float, float]] = {}

    async def __aenter__(self) -> GenerationManager:
        # Resolve the control stream's current end before accepting work, so a cancel
        # posted after start() returned can never fall between two reads.
        last = cast(list[StreamEntry], await self._control_redis.xrevrange(
            self.log.keyspace.control, count=1
        ))
        start_id = last[0][0].decode() if last else "0-0"
        self._background = [
            asyncio.create_task(self._follow_control(start_id), name="tokentee-control"),
            asyncio.create_task(self._renew_leases(), name="tokentee-leases"),
        ]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def active(self) -> list[str]:
        return list(self._producers)

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` (or :meth:`aclose`) began: ``start`` refuses new work."""
        return self._draining

    def drain(self) -> None:
        """Stop taking new generations (``start`` raises ``ShuttingDown``) and give the
        running ones ``shutdown_grace_seconds`` from now to finish; those still running then
        end with ``error``/``shutdown``.  Returns at once (the deadline runs in a task this
        manager owns, awaited by :meth:`aclose`); calling it again changes nothing."""
        if self._draining:
            return
        self._draining = True
        self._drain_task = asyncio.create_task(self._end_within_grace(),
                                               name="tokentee-drain")

    async def _end_within_grace(self) -> None:
        # No producer can register after drain() began: start() re-checks the flag after
        # its only await, so this snapshot is complete.
        tasks = [task for _, task in self._producers.values()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_seconds)
        for gid, (producer, task) in list(self._producers.items()):
            if task in pending and _cancel(producer, task, stop_code="shutdown"):
                logger.info("generation %s ended by shutdown", gid)
        await asyncio.gather(*pending, return_exceptions=True)

    async def start(
        self, request: GenerationRequest, provider_name: str | None = None, *,
        idempotency_key: str | None = None, channel: str | None = None,
        cancel_unread_after: float | None = None,
    ) -> GenerationInfo:
        """Validate, create and start a generation; return once it is in the log.

        Raises ``UnknownProvider`` / ``ProviderConfigError`` before anything is written, and
        ``AtCapacity`` when this process already runs ``max_active_generations``.  The
        producer task belongs to this manager, not to the caller: it keeps running when the
        caller goes away.

        With ``idempotency_key``, the first request with that key starts the generation and
        every later one, from any broker process, gets the same generation back
        (``replayed``) without a second upstream call, for as long as the generation is
        kept.  The same key with a different request raises ``IdempotencyConflict``.

        With ``channel``, the generation is also announced on that channel, whose followers
        get the events of every generation started in it.

        With ``cancel_unread_after`` (seconds), this manager cancels the generation
        (``cancelled``, reason ``unread``) once nobody has read it for that long, counted from
        its creation: no ``Hub.subscribe`` reader in any process (durable consumers do not
        count).  See :mod:`broker.presence`.
        """
        if self._draining:
            raise ShuttingDown(
                "this broker process is shutting down; start the generation on another one"
            )
        name = provider_name or self.settings.default_provider
        provider = self.providers.validate(name, request)
        model = provider.model_for(request)
        gid = new_generation_id()
        ttl = int(self.settings.max_generation_seconds + self.settings.retention_seconds) + 60
        created = time.time()
        reservation = None
        if idempotency_key is not None:
            reservation = json.dumps({
                "id": gid, "provider": name, "model": model, "created": created,
                "request": _fingerprint(name, request, channel, cancel_unread_after),
            })
            earlier = await self._reserve(idempotency_key, reservation, ttl)
            if earlier is not None:
                return earlier
        # Counted with the starts still awaiting Redis, so concurrent ones cannot overshoot.
        limit = self.settings.max_active_generations
        full = limit > 0 and len(self._producers) + self._starting >= limit
        self._starting += 1
        try:
            if full:
                raise AtCapacity(f"this process already runs its limit of {limit} generations")
            await self.log.create(
                gid, provider=name, model=model, owner=self.owner,
                lease_ms=self.settings.lease_ms, ttl_seconds=ttl, created=created,
                channel=channel, cancel_unread_after=cancel_unread_after,
            )
            if self._draining:
                # drain() began while we created it: it would not see this producer.  End
                # the generation here instead of starting a producer nobody drains.
                await self.log.finish(
                    gid, "error", {"code": "shutdown", "message": "the broker process shut"
                                   " down before the generation started"},
                    owner=self.owner, finish_reason="error",
                )
                raise ShuttingDown(
                    "this broker process is shutting down; start the generation on another one"
                )
        except BaseException:
            if idempotency_key is not None:
                # Not started (or ended at once): a retry with the key starts afresh.
                with contextlib.suppress(RedisError):
                    await self.log.swap_idempotency(idempotency_key, reservation, None, ttl)
            raise
        finally:
            self._starting -= 1
        producer = Producer(self.log, gid, provider, request, self.settings, self.owner,
                            self.gate, self.metrics)
        task = asyncio.create_task(producer.run(), name=f"tokentee-producer-{gid}")
        self._producers[gid] = (producer, task)
        if cancel_unread_after is not None:
            self._unread[gid] = (cancel_unread_after, asyncio.get_running_loop().time())
        self.metrics.active_generations += 1
        task.add_done_callback(lambda _t, gid=gid: self._producer_done(gid))  # type: ignore[misc]
        return GenerationInfo(id=gid, provider=name, model=model, created=created)

    async def _reserve(self, key: str, reservation: str, ttl: int) -> GenerationInfo | None:
        """Reserve ``key`` for the generation in ``reservation``; or return the generation an
        earlier request with the key started (waiting briefly while it is being created)."""
        fingerprint = json.loads(reservation)["request"]
        expected: str | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while True:
            earlier = await self.log.swap_idempotency(key, expected, reservation, ttl)
            if earlier == expected:
                return None  # the swap happened: this request starts the generation
            if earlier is None:
                expected = None  # the stale reservation vanished meanwhile: try afresh
                continue
            info = json.loads(earlier)
            if info.get("request") != fingerprint:
                raise IdempotencyConflict(
                    "this Idempotency-Key was used for a different request"
                )
            if await self.log.meta(info["id"]) is not None:
                return GenerationInfo(id=info["id"], provider=info["provider"],
                                      model=info["model"], created=info["created"],
                                      replayed=True)
            if time.time() - float(info["created"]) > _RESERVATION_GRACE_SECONDS:
                expected = earlier  # its generation expired: replace the reservation
                continue
            if loop.time() > deadline:
                raise ShuttingDown("the generation for this Idempotency-Key is not ready")
            # Another request reserved the key and is creating the generation right now
            # (one Redis transaction away): there is no event to wait on across processes.
            await asyncio.sleep(0.02)

    def _producer_done(self, gid: str) -> None:
        entry = self._producers.pop(gid, None)
        self._unread.pop(gid, None)
        if entry is None:
            return
        self.metrics.active_generations -= 1
        task = entry[1]
        if not task.cancelled() and task.exception() is not None:
            with generation_context(gid):
                logger.error("producer %s crashed", gid, exc_info=task.exception())

    def cancel_local(self, gid: str, reason: str = "requested", *,
                     stop_code: str | None = None) -> bool:
        """Cancel ``gid`` if its producer runs in this process: it ends ``cancelled`` with
        ``reason``, or ``error`` with ``stop_code`` if given.  Returns whether a producer
        was cancelled (not one that is already writing its terminal entry)."""
        entry = self._producers.get(gid)
        if entry is None:
            return False
        return _cancel(*entry, reason, stop_code=stop_code)

    async def wait(self, gid: str) -> None:
        """Wait until the local producer of ``gid`` has ended (no-op if not local)."""
        entry = self._producers.get(gid)
        if entry is not None:
            await asyncio.gather(entry[1], return_exceptions=True)

    async def _follow_control(self, last_id: str) -> None:
        """Blocking read of the control stream: act on cancels for local producers, and
        pass consumer progress to producers held back by them."""
        key = self.log.keyspace.control
        while True:
            raise_if_cancelled()
            try:
                reply = cast(XReadReply, await self._control_redis.xread(
                    {key: last_id}, block=self.settings.block_ms, count=100
                ))
            except RedisError as exc:  # connection, OOM, READONLY...: back off, retry
                self.metrics.redis_error("control_read")
                logger.warning("control stream read failed (%s); retrying", exc)
                await asyncio.sleep(0.5)  # back off before reconnecting, not a data poll
                continue
            for _key, entries in reply:
                for entry_id, fields in entries:
                    last_id = entry_id.decode()
                    op = fields.get(b"op")
                    gid = fields.get(b"id", b"").decode()
                    if op == b"cancel":
                        reason = fields.get(b"reason", b"requested").decode()
                        if self.cancel_local(gid, reason):
                            with generation_context(gid):
                                logger.info("cancelling generation %s (%s)", gid, reason)
                    elif op == b"progress" and self.gate is not None:
                        self.gate.notify(gid)

    async def _renew_leases(self) -> None:
        """Keep leases of quiet producers alive (appends renew them too).  Renewal is fenced
        (``_RENEW``: only the holder renews, nothing recreates a lease), so a producer whose
        lease expired learns it here, and is stopped: its appends would be refused."""
        interval = self.settings.lease_seconds / 3
        lease_ms = self.settings.lease_ms
        while True:
            raise_if_cancelled()
            await asyncio.sleep(interval)
            gids = list(self._producers)
            if not gids:
                continue
            try:
                renewed = await self.log.renew_leases(gids, self.owner, lease_ms)
            except RedisError as exc:  # retried at the next interval, well within the lease
                self.metrics.redis_error("lease_renew")
                logger.warning("lease renewal failed: %s", exc)
                continue
            for gid, ok in zip(gids, renewed, strict=True):
                # A producer that finished meanwhile (its lease deleted) is finishing, and
                # cancel_local leaves it alone.
                if not ok and self.cancel_local(gid, stop_code="producer_lost"):
                    logger.warning("generation %s: lease lost; producer stops", gid)
            await self._cancel_unread()

    async def _cancel_unread(self) -> None:
        """Cancel the local generations with ``cancel_unread_after`` that nobody has read for
        that long.  Runs with the lease renewal, every third of a lease: a generation is
        cancelled within about ``lease_seconds / 3`` after its period ran out."""
        gids = [gid for gid in self._unread if not self._producers[gid][0].finishing]
        if not gids:
            return
        try:
            unread_ms = await self.presence.unread_ms(gids)
        except RedisError as exc:  # checked again at the next interval
            self.metrics.redis_error("unread_check")
            logger.warning("unread check failed: %s", exc)
            return
        now = asyncio.get_running_loop().time()
        for gid, ms in zip(gids, unread_ms, strict=True):
            policy = self._unread.get(gid)
            if policy is None:  # ended while we asked
                continue
            after, created = policy
            # No readers set: nobody has read it yet, so it is unread since its creation.
            unread = now - created if ms < 0 else ms / 1000
            if unread < after:
                continue
            del self._unread[gid]
            if self.cancel_local(gid, UNREAD):
                self.metrics.unread_cancels += 1
                with generation_context(gid):
                    logger.info("generation %s: nobody read it for %.1f s (cancel_unread_after"
                                " %s); cancelling it", gid, unread, after)

    async def aclose(self) -> None:
        """Drain (see :meth:`drain`; the grace period counts from the first call) and await
        every producer.

        Background tasks (control listener, lease renewal) are stopped afterwards, even if
        the drain itself is cancelled: they run until then, so cancels from other processes
        still reach draining producers and their leases stay alive.
        """
        self.drain()
        try:
            if self._drain_task is not None:
                try:
                    await asyncio.shield(self._drain_task)
                except asyncio.CancelledError:
                    self._drain_task.cancel()
                    await asyncio.gather(self._drain_task, return_exceptions=True)
                    raise
        finally:
            for task in self._background:
                task.cancel()
            for outcome in await asyncio.gather(*self._background, return_exceptions=True):
                if isinstance(outcome, Exception):
                    logger.error("manager task had failed: %r", outcome)
            self._background = []


def _cancel(producer: Producer, task: asyncio.Task[None], reason: str = "requested", *,
            stop_code: str | None = None) -> bool:
    """Cancel a producer's task unless it is already writing its terminal entry (which a
    cancellation could only interrupt) or has been cancelled already: the first reason
    stands (a lease lost and an unread check in the same round must not turn the
    ``producer_lost`` stop into an ``unread`` cancel).  Returns whether it was cancelled."""
    if producer.finishing or task.cancelling():
        return False
    producer.cancel_reason = reason
    producer.stop_code = stop_code
    task.cancel()
    return True


def _fingerprint(provider: str, request: GenerationRequest, channel: str | None,
                 cancel_unread_after: float | None = None) -> str:
    """What makes two requests "the same" for an Idempotency-Key."""
    parts: list[object] = [provider, request.model, request.messages, request.params, channel]
    if cancel_unread_after is not None:  # absent: the same fingerprint as before the option
        parts.append(cancel_unread_after)
    body = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()
