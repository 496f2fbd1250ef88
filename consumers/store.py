"""Redis state of the durable consumers: checkpoints, outputs, liveness, dead letters, totals.

Exactly-once *in effect* rests on one script, :data:`_COMMIT`: a worker's position in a
generation, the consumer type's state and the records it emitted are written together, in the
generation's hash slot, and only by the worker that owns the generation (fencing).  A worker
that crashes loses only what it had not committed; whoever takes the generation over starts
from the last commit, so each entry's effects land once.

Ownership is taken with :data:`_TAKE`, which records the new owner in the checkpoint: a worker
that was paused (SIGSTOP, a long GC, a network partition), lost its generation to another
worker and then wakes up has its next commit refused (:class:`Fenced`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from broker.keys import Keyspace, entry_id
from broker.log import StreamEntry

# KEYS: checkpoint, meta.  ARGV: worker, still mine ('1': only if the checkpoint already names
# this worker, as on a retry).  Returns the checkpoint hash (flat), false when the generation's
# metadata is gone (expired or never existed), or 0 when it is no longer this worker's.
_TAKE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return false end
if ARGV[2] == '1' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('HSETNX', KEYS[1], 'seq', 0)
local ttl = redis.call('TTL', KEYS[2])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: checkpoint, output, meta.
# ARGV: worker, expected seq, new seq, state json, sunk, done ('1'/''), fallback ttl,
#       n, then n record JSON documents.
# Returns {records, wake}: the output's record count after the commit, and 1 if this commit
# reached the mark a held-back producer waits for (the caller then wakes it).
_COMMIT = """
local cp = redis.call('HMGET', KEYS[1], 'owner', 'seq', 'records')
if cp[1] ~= ARGV[1] then return {-1, 0} end
if tonumber(cp[2] or '0') ~= tonumber(ARGV[2]) then return {-2, 0} end
local records = tonumber(cp[3] or '0')
for i = 1, tonumber(ARGV[8]) do
  records = records + 1
  redis.call('XADD', KEYS[2], '0-' .. records, 'data', ARGV[8 + i])
end
redis.call('HSET', KEYS[1], 'seq', ARGV[3], 'state', ARGV[4], 'records', records,
           'sunk', ARGV[5])
if ARGV[6] == '1' then redis.call('HSET', KEYS[1], 'done', '1') end
local ttl = redis.call('TTL', KEYS[3])
if ttl <= 0 then ttl = tonumber(ARGV[7]) end
redis.call('EXPIRE', KEYS[1], ttl)
if records > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
local hold = redis.call('HGET', KEYS[3], 'hold')
if hold and tonumber(ARGV[3]) >= tonumber(hold) then
  redis.call('HDEL', KEYS[3], 'hold')
  return {records, 1}
end
return {records, 0}
"""

# KEYS: checkpoint.  ARGV: worker, seq, max deliveries.  Counts a failed attempt at ``seq``;
# at the limit marks it to be skipped.  Returns {attempts, dead (0/1)} or {-1, 0} if fenced.
_FAIL = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return {-1, 0} end
local n = redis.call('HINCRBY', KEYS[1], 'fail:' .. ARGV[2], 1)
if n >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'skip:' .. ARGV[2], '1')
  return {n, 1}
end
return {n, 0}
"""

# KEYS: consumer types hash, workers hash.  ARGV: type, worker, status json, forget ms.
# Stamps the type's and the worker's heartbeat with the *Redis* clock (no clock skew between
# machines), and forgets workers silent for ``forget ms``.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now)
local status = cjson.decode(ARGV[3])
status['ts'] = now
redis.call('HSET', KEYS[2], ARGV[2], cjson.encode(status))
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local ok, st = pcall(cjson.decode, all[i + 1])
  if not ok or type(st) ~= 'table' or (tonumber(st['ts']) or 0) < now - tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[2], all[i])
  end
end
return now
"""

# KEYS: catalog.  ARGV: group, worker, idle ms, new owner, ids...
# Of the given catalog entries, those still pending for ``worker`` are claimed by ``new
# owner`` with their idle time set to ``idle ms`` (JUSTID: the delivery count is unchanged).
# With new owner = worker and idle 0 this is a heartbeat; with a parking consumer and a large
# idle it hands them over for immediate takeover.  Returns the ids no longer ours.
_TOUCH = """
local mine = {}
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', #ARGV + 1000, ARGV[2])
for _, p in ipairs(pending) do mine[p[1]] = true end
local keep, lost = {}, {}
for i = 5, #ARGV do
  if mine[ARGV[i]] then table.insert(keep, ARGV[i]) else table.insert(lost, ARGV[i]) end
end
if #keep > 0 then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[4], 0, unpack(keep), 'IDLE', ARGV[3], 'JUSTID')
end
return lost
"""

# KEYS: totals hash, applied zset (one slot).  ARGV: generation, now, keep seconds, then
# field/increment pairs.  Adds a generation's contribution once, whoever runs it how often.
_ADD_ONCE = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
for i = 4, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
return 1
"""

# KEYS: catalog.  ARGV: group, consumer.  Deletes the consumer only if nothing is pending for
# it (XGROUP DELCONSUMER would drop its pending entries, and their generations with them).
_FORGET = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) + 1
"""


class Fenced(Exception):
    """Another worker owns this generation now: stop without committing or acknowledging."""


@dataclass(slots=True)
class Checkpoint:
    """A consumer type's committed position in one generation."""

    seq: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    records: int = 0  # records in the output stream
    sunk: int = 0  # records handed to the sink (at least)
    done: bool = False  # the terminal entry has been handled
    skip: set[int] = field(default_factory=set)  # dead-lettered entries


def parse_checkpoint(raw: dict[bytes, bytes]) -> Checkpoint:
    d = {k.decode(): v.decode() for k, v in raw.items()}
    return Checkpoint(
        seq=int(d.get("seq", "0")),
        state=json.loads(d["state"]) if d.get("state") else {},
        records=int(d.get("records", "0")),
        sunk=int(d.get("sunk", "0")),
        done=d.get("done") == "1",
        skip={int(k[5:]) for k in d if k.startswith("skip:")},
    )


class ConsumerStore:
    """Reads and writes consumer state for one key prefix.  Stateless apart from the client."""

    def __init__(self, redis: aioredis.Redis, keyspace: Keyspace, retention_seconds: int) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.retention_seconds = retention_seconds
        self._take = redis.register_script(_TAKE)
        self._commit = redis.register_script(_COMMIT)
        self._queued: list[tuple[list[str], list[str | int], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._fail = redis.register_script(_FAIL)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._touch = redis.register_script(_TOUCH)
        self._add_once = redis.register_script(_ADD_ONCE)
        self._forget = redis.register_script(_FORGET)

    # --- per generation -------------------------------------------------------------------

    async def take(self, gid: str, ctype: str, worker: str, *,
                   still_mine: bool = False) -> Checkpoint | None:
        """Own ``gid`` for ``ctype`` and return its checkpoint; ``None`` if the generation
        is gone.  With ``still_mine`` (a retry), raises :class:`Fenced` instead of taking
        a generation that another worker has taken over meanwhile."""
        keys = [self.keyspace.checkpoint(gid, ctype), self.keyspace.generation(gid).meta]
        raw = await self._take(keys=keys, args=[worker, "1" if still_mine else ""])
        if raw == 0:
            raise Fenced(f"{ctype} lost generation {gid} to another worker")
        if not raw:
            return None
        flat = cast(list[bytes], raw)
        return parse_checkpoint(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def commit(
        self, gid: str, ctype: str, worker: str, *, expected: int, seq: int,
        state: str, sunk: int, done: bool, records: list[str],
    ) -> tuple[int, bool]:
        """Commit progress from ``expected`` to ``seq`` with the type's state and new
        records, JSON-encoded.  Returns ``(record count, wake)``; raises :class:`Fenced` if
        the generation is no longer this worker's.

        Commits that arrive in the same event-loop turn (the hub hands one read's entries
        to many generations at once) go to Redis in one pipeline: a lone command costs
        redis-py about 170 us of CPU here, one of a pipeline of 50 about 50 us.  If the
        caller is cancelled, its commit may still be applied; the next commit from the old
        position is then refused (:class:`Fenced`), never applied twice."""
        keys = [self.keyspace.checkpoint(gid, ctype), self.keyspace.output(gid, ctype),
                self.keyspace.generation(gid).meta]
        args: list[str | int] = [
            worker, expected, seq, state, sunk, "1" if done else "", self.retention_seconds,
            len(records), *records,
        ]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((keys, args, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="tokentee-commits")
        count, wake = await future
        if int(count) < 0:
            raise Fenced(f"{ctype} lost generation {gid} to another worker")
        return int(count), bool(wake)

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other generations of this turn queue theirs
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                results = await self._run_commits([(k, a) for k, a, _ in batch])
            except BaseException as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception)
                                             else RedisError("commit flush cancelled"))
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller was cancelled
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _run_commits(self, calls: list[tuple[list[str], list[str | int]]]) -> list[Any]:
        """EVALSHA each call in one pipeline; load the script and redo those that found it
        missing (a restarted or flushed Redis)."""
        if isinstance(self.redis, RedisCluster):
            # redis-py's cluster pipeline refuses EVALSHA (it cannot route a script load to
            # every node from a pipeline) but routes EVAL by its keys: send the script
            # itself, which Redis compiles once and caches.
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.eval(_COMMIT, len(keys), *keys, *args)
                return list(await pipe.execute(raise_on_error=False))
        sha = self._commit.sha
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    keys, args = calls[i]
                    pipe.evalsha(sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    missing.append(i)
                else:
                    results[i] = reply
            if not missing:
                break
            await self.redis.script_load(_COMMIT)
            todo = missing
        return results

    async def aclose(self) -> None:
        """Wait for commits in flight (a worker calls this when it stops)."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None

    async def mark_sunk(self, gid: str, ctype: str, sunk: int) -> None:
        await self.redis.hset(self.keyspace.checkpoint(gid, ctype), "sunk", sunk)

    async def fail(self, gid: str, ctype: str, worker: str, seq: int,
                   max_deliveries: int) -> tuple[int, bool]:
        """Count a failed attempt at ``seq``.  Returns ``(attempts, dead)``."""
        n, dead = await self._fail(keys=[self.keyspace.checkpoint(gid, ctype)],
                                   args=[worker, seq, max_deliveries])
        if int(n) < 0:
            raise Fenced(f"{ctype} lost generation {gid} to another worker")
        return int(n), bool(dead)

    async def dead_letter(self, ctype: str, fields: dict[str, str]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.keyspace.dead_letters(ctype), fields,  # type: ignore[arg-type]
                      maxlen=10_000, approximate=True)
            pipe.hincrby(self.keyspace.dead_letter_counts, ctype, 1)
            await pipe.execute()

    async def checkpoint(self, gid: str, ctype: str) -> Checkpoint | None:
        raw = cast(dict[bytes, bytes],
                   await self.redis.hgetall(self.keyspace.checkpoint(gid, ctype)))
        return parse_checkpoint(raw) if raw else None

    async def records(self, gid: str, ctype: str, after: int = 0,
                      count: int | None = None) -> list[dict[str, Any]]:
        """Output records of ``ctype`` for ``gid`` with index > ``after``."""
        raw = cast(list[StreamEntry], await self.redis.xrange(
            self.keyspace.output(gid, ctype), min=entry_id(after + 1), max="+", count=count
        ))
        return [json.loads(fields[b"data"]) for _id, fields in raw if b"data" in fields]

    # --- per consumer type ----------------------------------------------------------------

    async def heartbeat(self, ctype: str, worker: str, status: dict[str, Any],
                        forget_ms: int) -> int:
        """Stamp the type's and the worker's heartbeat; returns Redis's clock in ms."""
        now = await self._heartbeat(
            keys=[self.keyspace.consumer_types, self.keyspace.consumer_workers(ctype)],
            args=[ctype, worker, json.dumps(status), forget_ms],
        )
        return int(now)

    async def owners(self, gids: list[str], ctype: str) -> list[str | None]:
        """The worker each generation's checkpoint for ``ctype`` names as its owner."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for gid in gids:
                pipe.hget(self.keyspace.checkpoint(gid, ctype), "owner")
            return [o.decode() if o else None for o in await pipe.execute()]

    async def forget_consumer(self, ctype: str, name: str) -> bool:
        """Delete consumer ``name`` from ``ctype``'s group if it holds no pending entry."""
        return bool(await self._forget(keys=[self.keyspace.catalog], args=[ctype, name]))

    async def forget_worker(self, ctype: str, worker: str) -> None:
        await self.redis.hdel(self.keyspace.consumer_workers(ctype), worker)

    async def touch(self, ctype: str, worker: str, ids: list[str], *, idle_ms: int = 0,
                    new_owner: str | None = None) -> list[str]:
        """Reset the idle time of catalog entries ``worker`` holds (or hand them to
        ``new_owner`` with ``idle_ms``).  Returns the ids that are no longer ``worker``'s."""
        if not ids:
            return []
        lost = await self._touch(
            keys=[self.keyspace.catalog],
            args=[ctype, worker, idle_ms, new_owner or worker, *ids],
        )
        return [x.decode() for x in cast(list[bytes], lost)]

    async def add_once(self, ctype: str, gid: str, increments: dict[str, float]) -> bool:
        """Add ``gid``'s increments to ``ctype``'s totals unless they were added already."""
        args: list[str | float] = [gid, time.time(), 2 * self.retention_seconds + 86_400]
        for name, value in increments.items():
            # HINCRBYFLOAT refuses inf and NaN (an upstream's usage of 1e999, say), and an
            # error halfway through the script would leave the totals half added.
            if math.isfinite(value):
                args += [name, repr(float(value))]
        added = await self._add_once(
            keys=[self.keyspace.totals(ctype), self.keyspace.totals_applied(ctype)], args=args
        )
        return bool(added)

    async def totals(self, ctype: str) -> dict[str, float]:
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self.keyspace.totals(ctype)))
        return {k.decode(): float(v) for k, v in raw.items()}
