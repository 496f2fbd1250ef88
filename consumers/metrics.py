"""``GET /metrics``: Prometheus metrics of the durable consumers, read from Redis at scrape.

Every figure comes from Redis, not from process memory, so any broker replica reports the
same exact values and nothing is lost when a worker dies: the analytics totals (added once
per generation), each consumer type's liveness, workers, lag and backlog, and dead letters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, cast

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import ResponseError

from broker.backpressure import read_liveness
from broker.keys import Keyspace
from broker.log import StreamEntry
from broker.settings import Settings
from consumers.stats import metric_families

# Backlog is counted with XRANGE on servers without XINFO's ``lag`` (before Redis 7.0);
# past this many entries it is reported as this many.
_BACKLOG_CAP = 10_000


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def consumer_families(redis: aioredis.Redis, keyspace: Keyspace,
                            settings: Settings) -> list[Metric]:
    labels = ["type"]
    up = GaugeMetricFamily(
        "tokentee_consumer_up", "1 if the consumer type has a live worker (heartbeat within"
        " the stall timeout), else 0: stalled, no longer holding producers back.", labels=labels)
    age = GaugeMetricFamily("tokentee_consumer_heartbeat_age_seconds",
                            "Seconds since a worker of the type last checked in.", labels=labels)
    workers = GaugeMetricFamily("tokentee_consumer_workers", "Live workers.", labels=labels)
    active = GaugeMetricFamily("tokentee_consumer_active_generations",
                               "Generations the live workers are processing.", labels=labels)
    lag = GaugeMetricFamily("tokentee_consumer_lag_entries",
                            "Log entries written but not yet processed, summed over the"
                            " generations being processed.", labels=labels)
    pending = GaugeMetricFamily("tokentee_consumer_pending_generations",
                                "Generations taken by a worker and not yet finished.",
                                labels=labels)
    backlog = GaugeMetricFamily("tokentee_consumer_backlog_generations",
                                "Generations announced but not yet taken by any worker.",
                                labels=labels)
    dead = CounterMetricFamily("tokentee_consumer_dead_letters",
                               "Entries moved to the dead-letter stream.", labels=labels)

    now_ms, beats, dead_counts = await read_liveness(redis, keyspace)
    stall_ms = settings.stall_timeout_seconds * 1000
    types = sorted(k.decode() for k in beats)
    for ctype in types:
        beat_age = now_ms - int(beats[ctype.encode()])
        up.add_metric([ctype], 1.0 if beat_age <= stall_ms else 0.0)
        age.add_metric([ctype], beat_age / 1000)
        live = [st for st in await _workers(redis, keyspace, ctype)
                if now_ms - int(st.get("ts", 0)) <= stall_ms]
        workers.add_metric([ctype], len(live))
        active.add_metric([ctype], sum(int(st.get("generations", 0)) for st in live))
        lag.add_metric([ctype], sum(int(st.get("lag", 0)) for st in live))
        dead.add_metric([ctype], float(dead_counts.get(ctype.encode(), b"0")))
    for group in await _groups(redis, keyspace):
        name = _str(group["name"])
        pending.add_metric([name], float(group["pending"]))
        backlog.add_metric([name], float(await _backlog(redis, keyspace, group)))
    return [up, age, workers, active, lag, pending, backlog, dead]


async def _workers(redis: aioredis.Redis, keyspace: Keyspace, ctype: str) -> list[dict[str, Any]]:
    raw = cast(dict[bytes, bytes], await redis.hgetall(keyspace.consumer_workers(ctype)))
    out = []
    for value in raw.values():
        try:
            status = json.loads(value)
        except ValueError:
            continue
        if isinstance(status, dict):
            out.append(status)
    return out


async def _groups(redis: aioredis.Redis, keyspace: Keyspace) -> list[dict[str, Any]]:
    try:
        groups: list[dict[str, Any]] = await redis.xinfo_groups(keyspace.catalog)
        return groups
    except ResponseError:  # no catalog yet
        return []


async def _backlog(redis: aioredis.Redis, keyspace: Keyspace, group: dict[str, Any]) -> int:
    lag = group.get("lag")
    if lag is not None:  # Redis >= 7.0
        return int(lag)
    last = _str(group["last-delivered-id"])
    entries = cast(list[StreamEntry], await redis.xrange(
        keyspace.catalog, min=f"({last}", max="+", count=_BACKLOG_CAP
    ))
    return len(entries)


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def render(redis: aioredis.Redis, keyspace: Keyspace, settings: Settings) -> bytes:
    """The ``/metrics`` body: consumer and analytics metrics from Redis, then this
    process's own (prometheus-client's default registry: process and Python figures)."""
    totals_raw = cast(dict[bytes, bytes], await redis.hgetall(keyspace.totals("analytics")))
    totals = {k.decode(): float(v) for k, v in totals_raw.items()}
    families: Iterable[Metric] = [
        *metric_families(totals), *await consumer_families(redis, keyspace, settings)
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(list(families)))
    return generate_latest(registry) + generate_latest(REGISTRY)
