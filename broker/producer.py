"""The producer: reads one upstream call once and writes it to the generation's log.

One producer task per generation.  It reads provider events and hands token entries to a
writer that appends them in batches (group commit: whatever arrived while the previous append
was in flight goes in the next one), so a fast upstream costs one Redis round trip per batch,
not per token.  The buffer between the two is bounded: past ``4 x append_batch`` pending
entries the reader stops reading the upstream until the writer catches up.

However the generation ends (upstream finished or failed, deadline, cancel, shutdown,
unexpected error) the producer writes exactly one terminal entry, atomically with the status
(:meth:`GenerationLog.finish`).  If the log refuses it because the generation already ended
(cancelled while orphaned, reaped), nothing more is written.

Redis replication is asynchronous: a replica promoted after its master crashed can lack the
newest entries, which readers may already have got from the old master.  The producer keeps
the entries it appended during the last lease period and writes them again, identical, when
the log turns out to lack them (:class:`LogBehind`); while the promoted replica still has its
lease, that period covers everything the replica can lack.  If it cannot, the generation
ends with ``error``/``log_lost``, numbered after the lost entries (never reusing their seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from broker.backpressure import ConsumerGate
from broker.connections import TRANSIENT_ERRORS
from broker.events import (
    Finish,
    ProviderEvent,
    ReasoningDelta,
    ReasoningSignature,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    UpstreamFailure,
    Usage,
    dumps,
)
from broker.log import AppendResult, GenerationFenced, GenerationLog, LogBehind
from broker.logs import generation_context
from broker.metrics import BrokerMetrics
from broker.providers.base import GenerationRequest, Provider
from broker.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
# (type, data, finish_reason)
Terminal = tuple[str, dict[str, Any], str]
PendingEntry = tuple[int, str, dict[str, Any], float, str]


class CancelRequested(Exception):
    """The log reported a cancel request (fallback to the control stream)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LogLost(Exception):
    """The log lost entries this producer wrote (a Redis failover), and it no longer holds
    them to write again."""


# A failover in the middle of a repair can call for another: give up after this many.
_REPAIRS = 3


class Producer:
    """Runs one generation.  Construct, then ``await run()`` in a task the manager owns.

    Cancelling that task is how a generation is cancelled: set :attr:`cancel_reason` first
    (``"requested"``, or the caller's reason); the producer closes the upstream request,
    flushes what it has read, writes ``cancelled`` and re-raises the cancellation.  With
    :attr:`stop_code` set instead (``"shutdown"``, ``"producer_lost"``), it writes ``error``
    with that code: the generation did not end by anyone's wish.
    """

    def __init__(
        self, log: GenerationLog, gid: str, provider: Provider, request: GenerationRequest,
        settings: Settings, owner: str, gate: ConsumerGate | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.log = log
        self.metrics = metrics or BrokerMetrics()
        self.gid = gid
        self.provider = provider
        self.request = request
        self.settings = settings
        self.owner = owner
        self.lease_ms = settings.lease_ms
        self.cancel_reason = "requested"
        self.stop_code: str | None = None
        self.seq = 0
        self.written = 0  # the highest seq this producer has appended (acknowledged)
        # The highest seq it has sent in an append, acknowledged or not: an append whose
        # reply was lost (the master crashed) may have reached readers all the same.
        self.sent = 0
        # What it appended during the last lease period (and when, in loop time), to write
        # again if Redis loses it.  A promoted replica that holds our lease got a renewal
        # less than a lease ago, and with it everything appended before that renewal.
        self._recent: deque[tuple[float, PendingEntry]] = deque()
        self._keep_seconds = settings.lease_seconds + 1.0
        self._pending: list[PendingEntry] = []
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._upstream_done = False
        self._usage: dict[str, Any] | None = None
        self.finishing = False  # writing the terminal entry: further cancels are refused
        self._carry = ""  # a high surrogate whose pair may start the next delta
        self._tool_calls: dict[int, dict[str, str]] = {}  # open tool calls, by index
        # Backpressure: the highest seq we may read up to before asking the log how far the
        # slowest live consumer type is (None: no live consumer type holds us back).
        self.gate = gate if gate is not None and gate.enabled else None
        self._limit = 0
        self._limit_version = -1  # gate.version the limit was computed for

    async def run(self) -> None:
        """Run the generation to its terminal entry.  Every log line meanwhile (the writer
        task's included) carries the generation's id."""
        with generation_context(self.gid):
            await self._run()

    async def _run(self) -> None:
        terminal: Terminal | None = None
        deadline = asyncio.timeout(self.settings.max_generation_seconds)
        try:
            async with deadline:
                terminal = await self._pump()
        except TimeoutError:
            if deadline.expired():
                terminal = _error(
                    "deadline_exceeded", "the generation exceeded its total deadline"
                )
            else:  # a provider's own timeout that escaped it
                logger.exception("generation %s: provider timed out", self.gid)
                terminal = _error("upstream_timeout", "the upstream timed out")
        except CancelRequested as request:
            terminal = ("cancelled", {"reason": request.reason}, "cancelled")
        except LogLost as exc:
            logger.error("generation %s: %s", self.gid, exc)
            terminal = _error("log_lost", str(exc))
        except GenerationFenced as exc:
            # Ended by someone else (a cancel of an orphan, a reaper), or our lease expired
            # while we were paused or cut off: write nothing of ours.
            logger.warning("generation %s: %s; producer stops", self.gid, exc)
            self.finishing = True
            await self._end_orphaned()
        except asyncio.CancelledError:
            terminal = self._cancelled_terminal()
            raise
        except RedisError as exc:
            logger.error("generation %s: redis failed: %s", self.gid, exc)
            terminal = _error("storage_error", "the log could not be written")
        except Exception:
            logger.exception("generation %s: producer failed", self.gid)
            terminal = _error("internal_error", "the producer failed unexpectedly")
        finally:
            if terminal is not None:
                await self._finish_despite_cancels(terminal)

    def _cancelled_terminal(self) -> Terminal:
        if self.stop_code is not None:
            return _error(self.stop_code, _STOP_MESSAGES.get(self.stop_code, self.stop_code))
        return ("cancelled", {"reason": self.cancel_reason}, "cancelled")

    async def _end_orphaned(self) -> None:
        """Our lease is gone: end the generation with ``producer_lost`` unless it has ended
        or someone holds it (the same idempotent write as a watchdog's, so whichever comes
        first writes the one terminal entry).  Without it, a generation whose producer
        outlived its lease would wait for a watchdog or a reader's reaper."""
        try:
            await self._retrying(functools.partial(self.log.reap_if_orphaned, self.gid))
        except RedisError as exc:
            logger.error("generation %s: could not end it after losing the lease: %s",
                         self.gid, exc)

    async def _finish_despite_cancels(self, terminal: Terminal) -> None:
        """Write the terminal entry even if another cancel lands meanwhile.

        The manager refuses to cancel a finishing producer, but a cancel can be in flight
        already (a direct cancel racing the control stream's).  ``_finish`` is idempotent
        (appends skip written entries, a second finish is a no-op), so it is simply retried;
        the cancellation is re-raised afterwards.
        """
        self.finishing = True
        cancelled = False
        for _ in range(3):
            try:
                await self._finish(terminal)
                break
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    async def _finish(self, terminal: Terminal) -> None:
        etype, data, reason = terminal
        if self._pending:  # read from upstream before the stop: keep it if we can
            try:
                await self._append(self._pending)
                self._count_tokens(self._pending)
                self._pending.clear()
            except GenerationFenced as exc:
                logger.warning("generation %s: %s; producer stops", self.gid, exc)
                await self._end_orphaned()
                return
            except LogLost as exc:  # the terminal entry below says so
                logger.error("generation %s: could not flush %d entries: %s", self.gid,
                             len(self._pending), exc)
            except Exception:
                # Whatever broke the pending batch must not also cost the terminal entry:
                # _write_terminal numbers it after every seq sent (the batch may have reached
                # readers), and later readers get a gap for what the log does not hold.
                logger.exception("generation %s: could not flush %d entries", self.gid,
                                 len(self._pending))
        extra = {"usage": dumps(self._usage)} if self._usage is not None else {}
        if etype == "cancelled":
            # Why, in the metadata too (a cancel request wrote it already; a local cancel such
            # as the unread policy's did not).
            extra["cancel"] = str(data.get("reason", "requested"))
        try:
            seq, status = await self._write_terminal(etype, data, reason, extra)
        except GenerationFenced as exc:  # from a repair
            logger.warning("generation %s: %s; producer stops", self.gid, exc)
            await self._end_orphaned()
            return
        except RedisError as exc:
            # Nothing more we can do from here; the lease expires and a reader's reaper ends
            # the generation with ``producer_lost``, so no reader hangs.
            logger.error("generation %s: could not write terminal entry: %s", self.gid, exc)
            return
        if not seq and status == "running":
            # The finish script refused us as owner: our lease expired (or was never ours).
            logger.warning("generation %s: this producer lost its lease", self.gid)
            await self._end_orphaned()
        elif not seq:
            logger.info("generation %s had already ended (%s)", self.gid, status)
        else:
            logger.info("generation %s ended: %s (%s) after %d entries", self.gid, etype,
                        reason, seq)

    async def _write_terminal(
        self, etype: str, data: dict[str, Any], reason: str, extra: dict[str, str],
    ) -> tuple[int, str]:
        """The finish write, after everything this producer appended: if the log lost some of
        it, write it again first; if that is impossible, end with ``error``/``log_lost``
        numbered after what was lost (a reader that got those seqs then gets no other entry
        under them; one that did not gets a ``gap``).  If writing them again fails otherwise,
        the planned terminal entry is written after every seq sent, with that gap."""
        finish = functools.partial(self.log.finish, self.gid, owner=self.owner, meta=extra)
        try:
            for _ in range(_REPAIRS):
                try:
                    return await self._retrying(functools.partial(
                        finish, etype, data, finish_reason=reason, after=self.sent))
                except LogBehind as exc:
                    repair = self._lost_after(exc.last_seq)
                try:
                    await self._append(repair)
                except (GenerationFenced, LogLost):
                    raise
                except Exception:
                    # Whatever broke the pending flush broke this again: it must not also
                    # cost the terminal entry, written below after every seq sent.
                    logger.exception("generation %s: could not write %d entries again",
                                     self.gid, len(repair))
                    break
            else:
                raise LogLost(f"Redis kept losing the end of the log ({_REPAIRS} failovers?)")
        except LogLost as exc:
            logger.error("generation %s: %s", self.gid, exc)
            etype, data, reason = _error("log_lost", str(exc))
        return await self._retrying(functools.partial(
            finish, etype, data, finish_reason=reason, after=self.sent, skip_lost=True))

    async def _append(self, batch: list[PendingEntry]) -> AppendResult:
        """Append ``batch`` (the entries after :attr:`written`).  If the log lacks entries
        before it (a failover to a replica that had not received them), write those again,
        identical, in the same call: readers that got them from the old master see nothing,
        later readers get the same entries."""
        entries = batch
        for _ in range(_REPAIRS):
            if entries:
                self.sent = max(self.sent, entries[-1][0])
            try:
                result = await self._retrying(functools.partial(
                    self.log.append, self.gid, self.owner, self.lease_ms, entries))
            except LogBehind as exc:
                lost = self._lost_after(exc.last_seq)  # may hold some of ``batch`` already
                entries = lost + [entry for entry in batch if entry[0] > lost[-1][0]]
                continue
            self._keep(entries)
            return result
        raise LogLost(f"Redis kept losing the end of the log ({_REPAIRS} failovers?)")

    def _lost_after(self, last: int) -> list[PendingEntry]:
        """The entries after ``last`` up to :attr:`sent` that this producer appended or tried
        to (those whose append was never acknowledged are still pending), to write again;
        raises :class:`LogLost` if it no longer holds all of them."""
        lost = [entry for _, entry in self._recent if entry[0] > last]
        lost += [e for e in self._pending if max(last, self.written) < e[0] <= self.sent]
        if not lost or lost[0][0] != last + 1:
            raise LogLost(
                f"Redis lost entries {last + 1}..{self.sent} of this generation (a failover"
                " to a replica that had not received them)"
            )
        if self.written > last:
            logger.warning("generation %s: Redis lost entries %d..%d (a failover?); writing"
                           " %d..%d again", self.gid, last + 1, self.written, last + 1,
                           lost[-1][0])
        else:  # only appends that were never acknowledged are missing
            logger.warning("generation %s: entries %d..%d, whose appends were not"
                           " acknowledged, are not in the log (a failover?); writing them"
                           " again", self.gid, last + 1, lost[-1][0])
        return lost

    def _keep(self, appended: list[PendingEntry]) -> None:
        now = asyncio.get_running_loop().time()
        for entry in appended:
            if entry[0] > self.written:
                self._recent.append((now, entry))
                self.written = entry[0]
        while self._recent and self._recent[0][0] < now - self._keep_seconds:
            self._recent.popleft()

    async def _pump(self) -> Terminal:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer(), name=f"tokentee-writer-{self.gid}")
                try:
                    result = await self._read_upstream()
                finally:
                    self._upstream_done = True
                    self._wake.set()
        except BaseExceptionGroup as group:
            # Only the writer runs in the group: surface its failure (fenced, Redis, cancel
            # request) as the producer's own.
            raise group.exceptions[0] from None
        return result

    async def _read_upstream(self) -> Terminal:
        stream: AsyncIterator[ProviderEvent] = self.provider.stream(self.request)
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for event in stream:
                ended: Terminal | None = None
                match event:
                    case TextDelta(text=text) if text:
                        text = self._whole_characters(text)
                        if text:
                            ended = await self._add("token", {"text": text}, text)
                    case ReasoningDelta(text=text) if text:
                        ended = await self._add("reasoning", {"text": text})
                    case ReasoningSignature(signature=signature) if signature:
                        ended = await self._add("reasoning_signature", {"signature": signature})
                    case ToolCallDelta():
                        ended = await self._tool_call_delta(event)
                    case ToolCallEnd(index=index):
                        ended = await self._tool_call_end(index)
                    case Usage(usage=usage):
                        self._usage = usage
                    case Finish(reason=reason):
                        for index in list(self._tool_calls):  # calls the upstream left open
                            ended = await self._tool_call_end(index)
                            if ended is not None:
                                return ended
                        data: dict[str, Any] = {"finish_reason": reason}
                        if self._usage is not None:
                            data["usage"] = self._usage
                        return ("done", data, reason)
                    case UpstreamFailure(code=code, message=message):
                        return _error(code, message)
                if ended is not None:
                    return ended
        return _error("upstream_incomplete", "the upstream stream ended without finishing")

    async def _add(self, etype: str, data: dict[str, Any], text: str = "") -> Terminal | None:
        """Queue one entry for the writer; then hold for the consumers, or for the writer,
        as needed.  Returns the ``max_entries`` error instead when the cap is reached."""
        if self.seq + 1 >= self.settings.max_entries:
            return _error(
                "max_entries",
                f"the generation reached the cap of {self.settings.max_entries} entries",
            )
        self.seq += 1
        self._pending.append((self.seq, etype, data, time.time(), text))
        self._wake.set()
        gate = self.gate
        if gate is not None and gate.live and (
            self.seq >= self._limit or self._limit_version != gate.version
        ):
            await self._hold()
        if len(self._pending) >= 4 * self.settings.append_batch:
            self._drained.clear()
            await self._drained.wait()
        return None

    async def _tool_call_delta(self, delta: ToolCallDelta) -> Terminal | None:
        call = self._tool_calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
        data: dict[str, Any] = {"index": delta.index}
        if delta.id:
            call["id"] = data["id"] = delta.id
        if delta.name:
            call["name"] = data["name"] = delta.name
        if delta.arguments:
            call["arguments"] += delta.arguments
            data["arguments"] = delta.arguments
        return await self._add("tool_call_delta", data) if len(data) > 1 else None

    async def _tool_call_end(self, index: int) -> Terminal | None:
        call = self._tool_calls.pop(index, None)
        if call is None:
            return None
        return await self._add("tool_call", {"index": index, **call})

    async def _hold(self) -> None:
        """At the backpressure limit: stop reading the upstream (TCP flow control then
        reaches the LLM server) until every live consumer type that has taken this
        generation is within the window again, with a quarter window of hysteresis.

        A type counts once one of its workers has taken the generation: a type whose
        workers are all busy with other generations must not hold this one, or two types
        with full workers could each wait for the other.  See :mod:`broker.backpressure`."""
        gate = self.gate
        assert gate is not None
        resume_at = self.seq - gate.max_lag + max(1, gate.max_lag // 4)
        with gate.holding(self.gid) as wake:
            while gate.live:
                wake.clear()
                version = gate.version
                slowest = await self._retrying(
                    functools.partial(self.log.hold, self.gid, list(gate.live), resume_at)
                )
                if slowest < 0:
                    # No live type has taken the generation yet (its workers are busy, or
                    # about to): nothing to wait for; look again a window later.
                    self._limit, self._limit_version = self.seq + gate.max_lag, version
                    return
                self._limit, self._limit_version = slowest + gate.max_lag, version
                if slowest >= resume_at:
                    return
                await gate.wait(wake)

    def _whole_characters(self, text: str) -> str:
        """Token text that Redis can store.  A provider that decodes JSON escapes per chunk
        can split a surrogate pair (an emoji) across two deltas: keep a trailing high
        surrogate for the next delta, and replace any surrogate left unpaired."""
        text = self._carry + text
        self._carry = ""
        if "\ud800" <= text[-1] <= "\udbff":
            text, self._carry = text[:-1], text[-1]
        if text.isascii():
            return text
        # Re-pair surrogates through UTF-16; any left unpaired come back as U+FFFD.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

    async def _writer(self) -> None:
        batch_size = self.settings.append_batch
        while True:
            if not self._pending:
                if self._upstream_done:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._pending[:batch_size]
            result = await self._append(batch)
            self._count_tokens(batch)
            del self._pending[: len(batch)]
            self._drained.set()
            if result.cancel_reason is not None:
                raise CancelRequested(result.cancel_reason)


    def _count_tokens(self, written: list[PendingEntry]) -> None:
        self.metrics.tokens_in += sum(1 for entry in written if entry[1] == "token")

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a log write, retrying connection failures and cluster failovers
        (:data:`~broker.connections.TRANSIENT_ERRORS`) with backoff.

        Safe because both writes are idempotent: appends carry explicit sequence numbers
        (what Redis already applied is skipped) and a second finish is a no-op.  Gives up
        after ``append_retry_seconds`` and lets the ``RedisError`` through.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.append_retry_seconds
        delay = 0.05
        while True:
            try:
                return await call()
            except RedisError as exc:
                self.metrics.redis_error("log_write")
                if not isinstance(exc, TRANSIENT_ERRORS) or (
                    loop.time() + delay > give_up
                ):
                    raise
                logger.warning("generation %s: redis write failed (%s); retrying", self.gid, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


_STOP_MESSAGES = {
    "shutdown": "the broker process shut down before the generation finished",
    "producer_lost": "the producer of this generation lost its lease",
}


def _error(code: str, message: str) -> Terminal:
    return ("error", {"code": code, "message": message}, "error")

