"""Each API process's live figures, shared through Redis so that any replica can show the
whole deployment's (the console's broker figures).

Behind a load balancer the console's polls reach one replica or another; a replica that
answered with its own figures only would show each poll a different process.  So every
broker process publishes its figures (running generations, SSE clients, hub readers, tokens
in and out, and their rates over the last few seconds) every second into one hash
(``Keyspace.figures``, a field per process), and any of them answers with the sum over the
processes whose entry is fresh.

Each field's value is ``<expiry ms> <JSON>``, stamped on Redis's clock by the publishing
script, so hosts' clocks do not matter; an entry lapses :data:`TTL_SECONDS` after its
process last published (a process that died drops out within that), the reading script drops
lapsed fields, and a process that stops cleanly removes its own at once.  (Redis 7.0 has no
expiry per hash field.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.connections import raise_if_cancelled
from broker.hub import Hub
from broker.keys import Keyspace
from broker.metrics import BrokerMetrics

logger = logging.getLogger(__name__)

#: How often a process publishes its figures (seconds).
PERIOD_SECONDS = 1.0
#: How long a published entry counts without a newer one (seconds).
TTL_SECONDS = 3 * PERIOD_SECONDS
# The rates are taken over the samples of this many seconds, so that they do not jitter.
_WINDOW_SECONDS = 3.0

# KEYS[1] the figures hash.  ARGV: field, JSON, ms the entry lasts.
_PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[3])) .. ' ' .. ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) / 1000) + 1)
return 1
"""

# KEYS[1] the figures hash.  Returns field, JSON, field, JSON... of the entries that have not
# lapsed, and deletes those that have.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local fresh = {}
for i = 1, #all, 2 do
  local value = all[i + 1]
  local space = string.find(value, ' ', 1, true)
  local expires = space and tonumber(string.sub(value, 1, space - 1))
  if expires and expires > now then
    fresh[#fresh + 1] = all[i]
    fresh[#fresh + 1] = string.sub(value, space + 1)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return fresh
"""


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    tokens_in: int
    tokens_out: int


class ReplicaFigures:
    """Publishes this process's figures every :data:`PERIOD_SECONDS` while entered, and reads
    every process's (see the module docstring).  ``replica`` names this process."""

    def __init__(self, redis: aioredis.Redis, keyspace: Keyspace, replica: str,
                 metrics: BrokerMetrics, hub: Hub) -> None:
        self.redis = redis
        self.key = keyspace.figures
        self.replica = replica
        self.metrics = metrics
        self.hub = hub
        self.host = socket.gethostname()
        self._samples: deque[_Sample] = deque()
        self._publish = redis.register_script(_PUBLISH)
        self._read = redis.register_script(_READ)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReplicaFigures:
        await self._publish_once()
        self._task = asyncio.create_task(self._run(), name="figures")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # Gone from the deployment's figures at once, not a TTL later.
        with contextlib.suppress(RedisError, OSError):
            await self.redis.hdel(self.key, self.replica)

    def local(self) -> dict[str, Any]:
        """This process's figures now; the rates over the last few seconds."""
        counts = self.metrics.snapshot()
        tokens_in, tokens_out = counts["tokens_in"], counts["tokens_out"]
        now = time.monotonic()
        self._samples.append(_Sample(now, tokens_in, tokens_out))
        while len(self._samples) > 2 and now - self._samples[1].at >= _WINDOW_SECONDS:
            self._samples.popleft()
        oldest = self._samples[0]
        span = now - oldest.at
        rate_in = (tokens_in - oldest.tokens_in) / span if span > 0 else 0.0
        rate_out = (tokens_out - oldest.tokens_out) / span if span > 0 else 0.0
        return {
            "replica": self.replica,
            "host": self.host,
            "pid": os.getpid(),
            "active_generations": counts["active_generations"],
            "sse_clients": counts["sse_clients"],
            "hub_readers": self.hub.cursor_count,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "tokens_in_per_second": round(rate_in, 1),
            "tokens_out_per_second": round(rate_out, 1),
        }

    async def replicas(self) -> list[dict[str, Any]]:
        """Every process's figures whose entry is fresh (this one's taken now), by replica
        id.  Raises ``RedisError`` if Redis cannot be read."""
        raw = await self._read(keys=[self.key])
        found: dict[str, dict[str, Any]] = {}
        for field, value in zip(raw[::2], raw[1::2], strict=True):
            name = field.decode() if isinstance(field, bytes) else str(field)
            with contextlib.suppress(ValueError):  # not ours: left out
                figures = json.loads(value)
                if isinstance(figures, dict):
                    found[name] = figures
        found[self.replica] = self.local()
        return [found[name] for name in sorted(found)]

    async def _publish_once(self) -> None:
        try:
            await self._publish(keys=[self.key], args=[
                self.replica, json.dumps(self.local()), int(TTL_SECONDS * 1000)])
        except (RedisError, OSError) as exc:
            raise_if_cancelled()
            self.metrics.redis_error("figures")
            logger.debug("publishing this process's figures failed: %s", exc)

    async def _run(self) -> None:
        # A fixed beat, like a heartbeat: the figures change all the time, so there is no
        # event to wait for instead.
        while True:
            await asyncio.sleep(PERIOD_SECONDS)
            await self._publish_once()


def deployment_totals(replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of several processes added up; the fan-out ratio is the deployment's
    tokens out per token in (0 before the first token)."""
    total = {name: sum(r.get(name, 0) for r in replicas)
             for name in ("active_generations", "sse_clients", "hub_readers",
                          "tokens_in", "tokens_out")}
    for name in ("tokens_in_per_second", "tokens_out_per_second"):
        total[name] = round(sum(r.get(name, 0.0) for r in replicas), 1)
    total["fanout_ratio"] = (round(total["tokens_out"] / total["tokens_in"], 2)
                             if total["tokens_in"] else 0.0)
    return total
