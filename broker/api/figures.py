"""Live figures of the whole deployment for the console: what runs, who reads, how fast.

Each broker process publishes its own (:mod:`broker.figures`: the broker's metrics, as
``/metrics`` exports them, with rates over the last few seconds); the figures here are their
sum over every process whose entry is fresh, with each process's own listed too, so that the
page shows the same deployment whichever replica answers its poll.  Consumer figures
(liveness, lag, backlog) come from Redis through :func:`consumers.metrics.consumer_families`,
as in ``/metrics``, and are the deployment's already.
"""

from __future__ import annotations

import time
from typing import Any

from broker.figures import deployment_totals
from broker.service import Broker
from consumers.metrics import consumer_families

_CONSUMER_FIGURES = {
    "tokentee_consumer_up": "up",
    "tokentee_consumer_workers": "workers",
    "tokentee_consumer_active_generations": "generations",
    "tokentee_consumer_lag_entries": "lag",
    "tokentee_consumer_pending_generations": "pending",
    "tokentee_consumer_backlog_generations": "backlog",
    "tokentee_consumer_dead_letters": "dead_letters",
}


async def live_figures(broker: Broker) -> dict[str, Any]:
    """The figures now, as the console's JSON."""
    replicas = await broker.figures.replicas()
    families = await consumer_families(broker.redis, broker.log.keyspace, broker.settings)
    consumers: dict[str, dict[str, float]] = {}
    for family in families:
        key = _CONSUMER_FIGURES.get(family.name)
        for sample in family.samples:
            if key is None or sample.name.endswith("_created"):
                continue
            consumers.setdefault(sample.labels["type"], {})[key] = sample.value
    totals = deployment_totals(replicas)
    return {
        "time": time.time(),
        "active_generations": totals["active_generations"],
        "sse_clients": totals["sse_clients"],
        "hub_readers": totals["hub_readers"],
        "tokens_in_per_second": totals["tokens_in_per_second"],
        "tokens_out_per_second": totals["tokens_out_per_second"],
        "fanout_ratio": totals["fanout_ratio"],
        "replica": broker.figures.replica,
        "replicas": replicas,
        "consumers": consumers,
    }
