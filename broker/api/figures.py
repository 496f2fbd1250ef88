"""Live figures of one broker process for the console: what runs, who reads, how fast.

The counts are the broker's own metrics (:meth:`broker.metrics.BrokerMetrics.snapshot`, the
figures ``/metrics`` exports as ``tokentee_*``); the rates are taken here, over the samples
of the last few seconds, so that several pages polling at once do not make them jitter.
Consumer figures (liveness, lag, backlog) come from Redis through
:func:`consumers.metrics.consumer_families`, as in ``/metrics``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    tokens_in: int
    tokens_out: int


class LiveFigures:
    """Samples one broker process (see the module docstring)."""

    def __init__(self) -> None:
        self._samples: deque[_Sample] = deque()

    def _rates(self, tokens_in: int, tokens_out: int) -> tuple[float, float]:
        now = time.monotonic()
        self._samples.append(_Sample(now, tokens_in, tokens_out))
        while len(self._samples) > 2 and now - self._samples[1].at >= _WINDOW_SECONDS:
            self._samples.popleft()
        oldest = self._samples[0]
        span = now - oldest.at
        if span <= 0:
            return 0.0, 0.0
        return (tokens_in - oldest.tokens_in) / span, (tokens_out - oldest.tokens_out) / span

    async def sample(self, broker: Broker) -> dict[str, Any]:
        """The figures now, as the console's JSON."""
        counts = broker.metrics.snapshot()
        rate_in, rate_out = self._rates(counts["tokens_in"], counts["tokens_out"])
        families = await consumer_families(broker.redis, broker.log.keyspace, broker.settings)
        consumers: dict[str, dict[str, float]] = {}
        for family in families:
            key = _CONSUMER_FIGURES.get(family.name)
            for sample in family.samples:
                if key is None or sample.name.endswith("_created"):
                    continue
                consumers.setdefault(sample.labels["type"], {})[key] = sample.value
        return {
            "time": time.time(),
            "active_generations": counts["active_generations"],
            "sse_clients": counts["sse_clients"],
            "hub_readers": broker.hub.cursor_count,
            "tokens_in_per_second": round(rate_in, 1),
            "tokens_out_per_second": round(rate_out, 1),
            "fanout_ratio": round(counts["fanout_ratio"], 2),
            "consumers": consumers,
        }
