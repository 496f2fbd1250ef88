"""The generation log in Redis: create, append, finish, cancel, read.

All writes to one generation go through Lua scripts over keys in one hash slot, so each step
is atomic and cluster-safe:

- ``append``: writes a batch of entries with explicit ids ``0-<seq>``, the accumulated text
  and ``last_seq``, and renews the producer's lease.  An entry at or below ``last_seq`` is
  skipped (a retried call cannot duplicate a token).  A finished generation, or one leased by
  another producer, refuses the append (fencing).  A batch that starts beyond
  ``last_seq + 1`` is refused with :class:`LogBehind`: the log lost entries its producer had
  written (a Redis failover to a replica that lacked them), and the producer repairs it.
- ``finish``: writes the one terminal entry together with the status, drops the lease and sets
  the retention TTL.  A second finish is a no-op that reports the existing status, so there is
  exactly one terminal entry whoever races to write it (producer, cancel, reaper).  The
  producer says which seq its terminal entry follows, so that it is never written over a seq
  that readers already got with other content.
- ``request_cancel``: marks the generation for cancellation; if no producer holds the lease it
  writes ``cancelled`` itself, since nobody else would.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from broker.connections import pipelined_script
from broker.events import STATUSES, Event, decode_entry, dumps, encode_fields
from broker.keys import GenerationKeys, Keyspace, entry_id, seq_of
from broker.settings import Settings

logger = logging.getLogger(__name__)

# Reply shapes (RESP2, bytes) of the stream commands we use.
StreamEntry = tuple[bytes, dict[bytes, bytes]]
XReadReply = list[tuple[bytes, list[StreamEntry]]]

_APPEND = """
local meta = redis.call('HMGET', KEYS[2], 'status', 'last_seq', 'cancel')
local status = meta[1]
if status ~= 'running' then return {-1, status or ''} end
-- The lease is the fencing token: only its holder appends.  A producer whose lease expired
-- (it was paused, or cut off from Redis, past lease_seconds) never gets it back: nobody
-- re-grants a lease, so its appends stay refused and the generation is reaped.
local holder = redis.call('GET', KEYS[4])
if holder ~= ARGV[1] then return {-2, holder or ''} end
local last = tonumber(meta[2] or '0')
local n = tonumber(ARGV[4])
local i = 5
for _ = 1, n do
  local seq = tonumber(ARGV[i])
  if seq > last then
    -- Entries are contiguous, so only the first new one can leave a hole, before anything
    -- was written: the log lacks entries the producer wrote (lost in a failover).
    if seq ~= last + 1 then return {-3, last} end
    redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '0-' .. seq,
               'type', ARGV[i + 1], 'data', ARGV[i + 2], 'ts', ARGV[i + 3])
    if ARGV[i + 4] ~= '' then redis.call('APPEND', KEYS[3], ARGV[i + 4]) end
    last = seq
  end
  i = i + 5
end
if tonumber(meta[2] or '0') == 0 and last > 0 then
  -- First entries: the log and text keys now exist; give them the meta's backstop TTL, so
  -- nothing outlives its retention even if every process dies before finishing it.
  local ttl = redis.call('TTL', KEYS[2])
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', KEYS[3], ttl)
  end
end
redis.call('HSET', KEYS[2], 'last_seq', last)
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[3])
return {last, meta[3] or ''}
"""

# ARGV: owner ('' = not a producer), mode ('owner' | 'orphaned' | 'any'), type, data, ts,
#       status, finish_reason, retention seconds, after (the seq the caller knows the log
#       holds, 0 if it knows none), on_behind ('refuse' | 'skip'), then field/value pairs
#       for the meta hash.
_FINISH = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return {0, ''} end
if status ~= 'running' then return {0, status} end
local holder = redis.call('GET', KEYS[4])
if ARGV[2] == 'owner' then
  if holder ~= ARGV[1] then return {0, 'running'} end
elseif ARGV[2] == 'orphaned' then
  if holder then return {0, 'running'} end
end
local last = tonumber(redis.call('HGET', KEYS[2], 'last_seq') or '0')
local after = tonumber(ARGV[9])
if last < after then
  -- The log lost entries the caller wrote (a failover): numbering the terminal entry
  -- last + 1 would give readers who got those entries a second, different entry with the
  -- same seq.  Refuse (the producer repairs the log first), or leave the hole.
  if ARGV[10] ~= 'skip' then return {-3, tostring(last)} end
  last = after
end
local seq = last + 1
redis.call('XADD', KEYS[1], '0-' .. seq, 'type', ARGV[3], 'data', ARGV[4], 'ts', ARGV[5])
redis.call('HSET', KEYS[2], 'status', ARGV[6], 'last_seq', seq, 'finish_reason', ARGV[7])
for j = 11, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[j], ARGV[j + 1]) end
redis.call('DEL', KEYS[4])
local ttl = tonumber(ARGV[8])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ttl) end
return {seq, ARGV[6]}
"""

# KEYS: lease.  ARGV: owner, lease ms.  Renews the lease only for the producer that holds it:
# a lease that expired, or that finish or a reaper removed, is never recreated.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_REQUEST_CANCEL = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return '' end
if status ~= 'running' then return status end
redis.call('HSET', KEYS[2], 'cancel', ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 1 then return 'running' end
return 'orphaned'
"""

# KEYS: meta, then the checkpoint of each live consumer type.  ARGV: resume mark.
# Returns the slowest position among the types that have taken the generation (a checkpoint
# exists), or -1 if none has.  Below the mark, records the mark in the meta so that the
# commit that reaches it wakes the producer (consumers.store._COMMIT).
_HOLD = """
local slowest = nil
for i = 2, #KEYS do
  local seq = redis.call('HGET', KEYS[i], 'seq')
  if seq then
    seq = tonumber(seq)
    if slowest == nil or seq < slowest then slowest = seq end
  end
end
if slowest == nil then
  redis.call('HDEL', KEYS[1], 'hold')
  return -1
end
if slowest < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'hold', ARGV[1])
else
  redis.call('HDEL', KEYS[1], 'hold')
end
return slowest
"""

# KEYS: idempotency key.  ARGV: expected value ('' = none), new value ('' = delete), ttl.
# Compare-and-set: returns the value that was there (false if none); writes only on a match.
_CLAIM_KEY = """
local current = redis.call('GET', KEYS[1])
if (current or '') == ARGV[1] then
  if ARGV[2] == '' then redis.call('DEL', KEYS[1])
  else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
end
return current
"""


@dataclass(frozen=True, slots=True)
class GenerationMeta:
    """A generation's metadata hash, decoded."""

    id: str
    status: str
    provider: str
    model: str
    created: float
    last_seq: int
    finished: float | None
    finish_reason: str | None
    extra: dict[str, str]
    # Why it was cancelled (``requested``, ``unread``, ...): set once a cancel was asked for.
    cancel_reason: str | None = None
    # The ``cancel_unread_after`` policy (seconds) it was started with, if any.
    cancel_unread_after: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status != "running"

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_reason is not None


@dataclass(frozen=True, slots=True)
class AppendResult:
    last_seq: int
    cancel_reason: str | None  # set once someone asked to cancel the generation


class GenerationFenced(Exception):
    """The generation is no longer ours to write: it finished, or our lease on it expired."""


class LogBehind(Exception):
    """The log holds fewer entries than the writer knows it wrote: Redis lost the newest
    ones (a failover to a replica that had not received them).  ``last_seq`` is what the log
    holds now; nothing was written."""

    def __init__(self, gid: str, last_seq: int) -> None:
        super().__init__(f"generation {gid}: the log holds only up to seq {last_seq}")
        self.last_seq = last_seq


def decode_entries(raw: list[StreamEntry]) -> list[Event]:
    """Decode log entries.  An entry tokentee did not write (an id other than ``0-<seq>``,
    added by hand or by another program) is skipped with a warning instead of failing every
    reader of the stream."""
    events: list[Event] = []
    for eid, fields in raw:
        try:
            seq = seq_of(eid)
        except ValueError:
            logger.warning("skipping foreign log entry %r", eid)
            continue
        events.append(decode_entry(seq, fields))
    return events


def _s(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


class GenerationLog:
    """Reads and writes generations.  Stateless apart from the client; safe to share."""

    def __init__(
        self, redis: aioredis.Redis, keyspace: Keyspace, *, retention_seconds: int,
        max_entries: int, catalog_maxlen: int, control_maxlen: int,
    ) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.retention_seconds = retention_seconds
        self.max_entries = max_entries
        self.catalog_maxlen = catalog_maxlen
        self.control_maxlen = control_maxlen
        self._append = redis.register_script(_APPEND)
        self._finish = redis.register_script(_FINISH)
        self._request_cancel = redis.register_script(_REQUEST_CANCEL)
        self._renew = redis.register_script(_RENEW)
        self._hold = redis.register_script(_HOLD)
        self._claim_key = redis.register_script(_CLAIM_KEY)

    @classmethod
    def for_settings(cls, redis: aioredis.Redis, settings: Settings) -> GenerationLog:
        return cls(
            redis, Keyspace(settings.key_prefix), retention_seconds=settings.retention_seconds,
            max_entries=settings.max_entries, catalog_maxlen=settings.catalog_maxlen,
            control_maxlen=settings.control_maxlen,
        )

    def keys(self, gid: str) -> GenerationKeys:
        return self.keyspace.generation(gid)

    # --- writing ---------------------------------------------------------------------------

    async def create(
        self, gid: str, *, provider: str, model: str, owner: str, lease_ms: int,
        ttl_seconds: int, extra: dict[str, str] | None = None, created: float | None = None,
        channel: str | None = None, cancel_unread_after: float | None = None,
    ) -> float:
        """Create the generation's metadata, take its lease, announce it on the catalog.

        The metadata gets a backstop TTL (``ttl_seconds``: the generation deadline plus
        retention) so that nothing outlives its retention even if every process dies.
        Returns the creation time.
        """
        keys = self.keys(gid)
        created = created or time.time()
        fields: dict[str, str] = {
            "id": gid, "status": "running", "provider": provider, "model": model,
            "created": f"{created:.6f}", "last_seq": "0", **(extra or {}),
        }
        if channel is not None:
            fields["channel"] = channel
        if cancel_unread_after is not None:
            fields["unread_after"] = repr(cancel_unread_after)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.meta, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(keys.meta, ttl_seconds)
            pipe.set(keys.lease, owner, px=lease_ms)
            await pipe.execute()
        # The catalog is another slot, so it cannot share the transaction.  Announcing after
        # the metadata exists means a subscriber that reads the catalog always finds it.
        await self.redis.xadd(
            self.keyspace.catalog,
            {"id": gid, "provider": provider, "model": model, "created": f"{created:.6f}"},
            maxlen=self.catalog_maxlen, approximate=True,
        )
        if channel is not None:
            # The channel lives as long as its newest generation could.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self.keyspace.channel(channel), {"id": gid, "model": model},
                          maxlen=self.catalog_maxlen, approximate=True)
                pipe.expire(self.keyspace.channel(channel), ttl_seconds)
                await pipe.execute()
        return created

    async def append(
        self, gid: str, owner: str, lease_ms: int,
        entries: list[tuple[int, str, dict[str, Any], float, str]],
    ) -> AppendResult:
        """Append ``(seq, type, data, ts, text)`` entries.  Raises :class:`GenerationFenced`
        if the generation finished or is leased to someone else, and :class:`LogBehind` if
        the log lacks entries before the first new one (nothing is written then)."""
        keys = self.keys(gid)
        args: list[str | int] = [owner, self.max_entries, lease_ms, len(entries)]
        for seq, etype, data, ts, text in entries:
            fields = encode_fields(etype, data, ts)
            args += [seq, fields[1], fields[3], fields[5], text]
        last, flag = await self._append(keys=list(keys.all()), args=args)
        if int(last) == -1:
            raise GenerationFenced(f"generation {gid} has ended ({_s(flag) or 'gone'})")
        if int(last) == -3:
            raise LogBehind(gid, int(flag))
        if int(last) < 0:
            raise GenerationFenced(
                f"generation {gid}: this producer lost its lease"
                + (f" (held by {_s(flag)})" if flag else "")
            )
        reason = _s(flag) if isinstance(flag, bytes) else None
        return AppendResult(last_seq=int(last), cancel_reason=reason or None)

    async def finish(
        self, gid: str, etype: str, data: dict[str, Any], *, owner: str = "",
        mode: str = "owner", finish_reason: str = "", meta: dict[str, str] | None = None,
        after: int = 0, skip_lost: bool = False,
    ) -> tuple[int, str]:
        """Write the terminal entry atomically with the status.

        Returns ``(seq, status)``: ``seq`` is the terminal entry's sequence number, or 0 if
        this call wrote nothing because the generation had already ended (``status`` then
        says how) or, in ``owner``/``orphaned`` mode, a live producer holds it.

        ``after`` is the last seq the caller knows it wrote.  If the log holds less (entries
        lost in a failover), raises :class:`LogBehind` and writes nothing, or with
        ``skip_lost`` numbers the terminal entry ``after + 1``, leaving the lost seqs as a
        hole that readers get as a ``gap``.
        """
        status = {"done": "done", "error": "error", "cancelled": "cancelled"}[etype]
        keys = self.keys(gid)
        now = time.time()
        args: list[str | int] = [
            owner, mode, etype, dumps(data), f"{now * 1000:.3f}", status,
            finish_reason, self.retention_seconds, after, "skip" if skip_lost else "refuse",
        ]
        fields = {"finished": f"{now:.6f}", **(meta or {})}
        if etype == "error":
            fields["error_code"] = str(data.get("code", "error"))
        for k, v in fields.items():
            args += [k, v]
        seq, st = await self._finish(keys=list(keys.all()), args=args)
        if int(seq) == -3:
            raise LogBehind(gid, int(st))
        return int(seq), st.decode() if isinstance(st, bytes) else str(st)

    async def request_cancel(self, gid: str, reason: str = "requested") -> str:
        """Ask whoever produces ``gid`` to cancel it.

        Returns the status after the request: ``running`` (a producer will write
        ``cancelled`` shortly), a terminal status, or ``""`` if the generation is unknown.
        """
        keys = self.keys(gid)
        raw = await self._request_cancel(keys=list(keys.all()), args=[reason])
        state = raw.decode() if isinstance(raw, bytes) else str(raw)
        if state == "orphaned":
            # No producer holds the lease: nobody would notice the flag, so end it here.
            _, status = await self.finish(gid, "cancelled", {"reason": reason},
                                          mode="orphaned", finish_reason="cancelled")
            return status
        if state == "running":
            await self.redis.xadd(
                self.keyspace.control, {"op": "cancel", "id": gid, "reason": reason},
                maxlen=self.control_maxlen, approximate=True,
            )
        return state

    async def swap_idempotency(self, key: str, expected: str | None, new: str | None,
                               ttl_seconds: int) -> str | None:
        """Set ``Idempotency-Key`` ``key`` to ``new`` (``None``: delete it) if it holds
        ``expected`` (``None``: nothing).  Returns what it held before, whether or not it
        matched."""
        raw = await self._claim_key(keys=[self.keyspace.idempotency(key)],
                                    args=[expected or "", new or "", ttl_seconds])
        return raw.decode() if isinstance(raw, bytes) else None

    async def hold(self, gid: str, consumer_types: list[str], resume_at: int) -> int:
        """The position of the slowest of ``consumer_types`` that have taken ``gid`` (-1 if
        none has); below ``resume_at`` the generation is marked held, so the consumer
        commit that reaches the mark wakes the producer (through the control stream)."""
        keys = [self.keys(gid).meta,
                *(self.keyspace.checkpoint(gid, ctype) for ctype in consumer_types)]
        return int(await self._hold(keys=keys, args=[resume_at]))

    async def reap_if_orphaned(self, gid: str) -> str:
        """End a running generation whose producer lost its lease (crashed process).

        Returns ``"reaped"`` if this call wrote the ``producer_lost`` error, ``"missing"`` if
        the generation's metadata is gone (expired, or Redis lost its data), else
        ``"alive"`` (it ended meanwhile, or a producer holds it again).
        """
        seq, status = await self.finish(
            gid, "error", {"code": "producer_lost",
                           "message": "the producer of this generation stopped responding"},
            mode="orphaned", finish_reason="error",
        )
        if seq:
            logger.warning("generation %s: producer lost, ended with error", gid)
            return "reaped"
        return "missing" if not status else "alive"

    # --- reading ---------------------------------------------------------------------------

    async def meta(self, gid: str) -> GenerationMeta | None:
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys(gid).meta))
        if not raw:
            return None
        d = {k.decode(): v.decode() for k, v in raw.items()}
        known = {"id", "status", "provider", "model", "created", "last_seq", "finished",
                 "finish_reason", "cancel", "hold", "channel", "unread_after"}
        status = d.get("status", "running")
        return GenerationMeta(
            id=d.get("id", gid),
            status=status if status in STATUSES else "running",
            provider=d.get("provider", ""),
            model=d.get("model", ""),
            created=float(d.get("created", "0")),
            last_seq=int(d.get("last_seq", "0")),
            finished=float(d["finished"]) if d.get("finished") else None,
            finish_reason=d.get("finish_reason") or None,
            extra={k: v for k, v in d.items() if k not in known},
            cancel_reason=d.get("cancel") or None,
            cancel_unread_after=float(d["unread_after"]) if d.get("unread_after") else None,
        )

    async def snapshot(self, gid: str) -> tuple[str, int, str] | None:
        """``(text, last_seq, status)`` read together (one transaction: the append script
        writes the text and ``last_seq`` together), or ``None`` for an unknown generation."""
        keys = self.keys(gid)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(keys.text)
            pipe.hmget(keys.meta, ["last_seq", "status"])
            text, (last_seq, status) = await pipe.execute()
        if status is None:
            return None
        return (text or b"").decode(), int(last_seq or 0), status.decode()

    async def text(self, gid: str) -> str:
        raw = cast(bytes | None, await self.redis.get(self.keys(gid).text))
        return raw.decode() if raw else ""

    async def read(self, gid: str, after: int, count: int) -> list[Event]:
        """Up to ``count`` entries with ``seq > after``, in order (non-blocking XRANGE)."""
        raw = cast(list[StreamEntry], await self.redis.xrange(
            self.keys(gid).log, min=entry_id(after + 1), max="+", count=count
        ))
        return decode_entries(raw)

    async def renew_leases(self, gids: list[str], owner: str, lease_ms: int) -> list[bool]:
        """Renew ``owner``'s leases on ``gids`` (one pipeline); ``False`` for each lease that
        ``owner`` no longer holds (expired, or the generation ended): that producer is lost
        and must stop, since its appends are refused from now on."""
        replies = await pipelined_script(
            self.redis, self._renew,
            [([self.keys(gid).lease], [owner, lease_ms]) for gid in gids],
        )
        return [bool(reply) for reply in replies]

    async def lease_state(self, gids: list[str]) -> list[tuple[str, int]]:
        """``(status, lease ms left)`` of each of ``gids``, in one pipeline: status ``""``
        for a generation whose metadata is gone, ms left -2 where no lease exists."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for gid in gids:
                keys = self.keys(gid)
                pipe.hget(keys.meta, "status")
                pipe.pttl(keys.lease)
            replies = await pipe.execute()
        return [((replies[i] or b"").decode(), int(replies[i + 1]))
                for i in range(0, len(replies), 2)]

    async def lease_alive(self, gids: list[str]) -> list[bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for gid in gids:
                pipe.exists(self.keys(gid).lease)
            return [bool(x) for x in await pipe.execute()]
