"""Live figures of one broker process for the console: what runs, who reads, how fast.

Two counters are kept here because nothing else keeps them yet:

- entries written: the growth of ``last_seq`` of the generations this process produces,
  read from their metadata at each sample (a generation that ended since the previous sample
  is read once more, so its last entries count too);
- events sent: SSE frames with an ``id`` that left this process (:class:`SseTraffic`, an
  ASGI middleware, which also counts the open event streams).

Rates are taken over the samples of the last few seconds, so several pages polling at once
do not make them jitter.  Consumer figures (liveness, lag, backlog) come from Redis through
:func:`consumers.metrics.consumer_families`, the same figures ``/metrics`` reports.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.service import Broker
from consumers.metrics import consumer_families

_WINDOW_SECONDS = 3.0
_CONSUMER_FIGURES = {
    "tokentee_consumer_up": "up",
    "tokentee_consumer_workers": "workers",
    "tokentee_consumer_active_generations": "generations",
    "tokentee_consumer_lag_entries": "lag",
    "tokentee_consumer_pending_generations": "pending",
    "tokentee_consumer_backlog_generations": "backlog",
    "tokentee_consumer_dead_letters": "dead_letters",
}


@dataclass(slots=True)
class TrafficCounts:
    open: int = 0  # event-stream responses in progress
    events_sent: int = 0  # frames with an id sent, since the process started


class SseTraffic:
    """ASGI middleware: counts open ``text/event-stream`` responses and the frames with an
    ``id:`` line they send (one per event, in every wire format) into ``counts``."""

    def __init__(self, app: ASGIApp, counts: TrafficCounts) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        streaming = False

        async def counting_send(message: Message) -> None:
            nonlocal streaming
            if message["type"] == "http.response.start":
                streaming = any(
                    name == b"content-type" and value.startswith(b"text/event-stream")
                    for name, value in message.get("headers", [])
                )
                if streaming:
                    self.counts.open += 1
            elif streaming and message["type"] == "http.response.body":
                body: bytes = message.get("body", b"")
                self.counts.events_sent += body.count(b"\nid: ") + body.startswith(b"id: ")
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if streaming:
                self.counts.open -= 1


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    written: int
    sent: int


class LiveFigures:
    """Samples one broker process (see the module docstring)."""

    def __init__(self, traffic: TrafficCounts) -> None:
        self.traffic = traffic
        self._seen: dict[str, int] = {}  # generation -> last_seq counted so far
        self._written = 0
        self._samples: deque[_Sample] = deque()

    async def _count_written(self, broker: Broker) -> None:
        active = broker.manager.active
        tracked = list(dict.fromkeys([*self._seen, *active]))
        if not tracked:
            return
        keyspace = broker.log.keyspace
        async with broker.redis.pipeline(transaction=False) as pipe:
            for gid in tracked:
                pipe.hget(keyspace.generation(gid).meta, "last_seq")
            replies: list[bytes | None] = await pipe.execute()
        first = not self._samples
        for gid, raw in zip(tracked, replies, strict=True):
            last = int(raw or 0)
            if not first:  # the first sample is the baseline
                self._written += max(0, last - self._seen.get(gid, 0))
            self._seen[gid] = last
        for gid in set(self._seen) - set(active):
            del self._seen[gid]  # ended, and its last entries are counted

    async def sample(self, broker: Broker) -> dict[str, Any]:
        """The figures now, as the console's JSON."""
        await self._count_written(broker)
        now = time.monotonic()
        sent = self.traffic.events_sent
        self._samples.append(_Sample(now, self._written, sent))
        while len(self._samples) > 2 and now - self._samples[1].at >= _WINDOW_SECONDS:
            self._samples.popleft()
        oldest = self._samples[0]
        span = now - oldest.at
        rate_in = (self._written - oldest.written) / span if span > 0 else 0.0
        rate_out = (sent - oldest.sent) / span if span > 0 else 0.0
        families = await consumer_families(broker.redis, broker.log.keyspace, broker.settings)
        consumers: dict[str, dict[str, float]] = {}
        for family in families:
            key = _CONSUMER_FIGURES.get(family.name) or _CONSUMER_FIGURES.get(
                family.name.removesuffix("_total") if family.type == "counter" else ""
            )
            for sample in family.samples:
                if key is None or sample.name.endswith("_created"):
                    continue
                consumers.setdefault(sample.labels["type"], {})[key] = sample.value
        return {
            "time": time.time(),
            "active_generations": len(broker.manager.active),
            "sse_clients": self.traffic.open,
            "hub_readers": broker.hub.cursor_count,
            "entries_in_per_second": round(rate_in, 1),
            "events_out_per_second": round(rate_out, 1),
            "consumers": consumers,
        }
