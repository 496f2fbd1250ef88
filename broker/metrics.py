"""The broker's own Prometheus metrics: one :class:`BrokerMetrics` per :class:`Broker`.

Each broker has its own ``CollectorRegistry`` (never prometheus-client's global one), so
several brokers in one process (tests, an embedding application) count separately.  The
numbers are this process's: in a scaled-out deployment, sum them over the replicas
(``sum(rate(tokentee_tokens_out_total[1m])) / sum(rate(tokentee_tokens_in_total[1m]))`` is
the fan-out of the whole deployment; one replica's ratio also counts generations produced
on other replicas as zero tokens in).

Counters and gauges are plain integers updated by the event loop's thread and read at
scrape time, so an update costs an addition, not a lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["REDIS_OPS", "BrokerMetrics"]

#: The ``op`` label values of ``tokentee_redis_errors_total``: where a Redis call failed.
REDIS_OPS = (
    "api",  # an HTTP request's Redis call (answered 503)
    "hub_read",  # the hub's blocking XREAD
    "hub_wake",  # waking the hub's blocked read for a new stream
    "reaper",  # the hub's check for generations whose producer died
    "presence",  # the hub reporting its readers (cancel_unread_after)
    "unread_check",  # the manager's check for generations nobody reads
    "control_read",  # the manager's read of the control stream (cancels)
    "lease_renew",  # renewing producers' leases
    "log_write",  # a producer's append or finish (each failed attempt)
    "sse",  # an SSE response's read of the log
    "ready",  # GET /readyz's PING
    "figures",  # publishing this process's figures for the console
)

# The hub's XREAD blocks up to block_ms when no entry arrives, so the buckets reach past the
# default 5 s: an idle hub shows up in the top buckets, a busy one in the bottom ones.
_HUB_READ_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0)


class BrokerMetrics(Collector):
    """What one broker process has done.  ``registry`` holds these metrics only;
    :meth:`render` is its Prometheus text, :meth:`snapshot` the same figures as a dict."""

    def __init__(self) -> None:
        self.active_generations = 0  # producers running in this process
        self.sse_clients = 0  # open SSE responses
        self.tokens_in = 0  # ``token`` entries this process's producers appended to the log
        self.tokens_out = 0  # ``token`` events written to SSE clients
        self.unread_cancels = 0  # generations this process cancelled as unread
        self.redis_errors: dict[str, int] = dict.fromkeys(REDIS_OPS, 0)
        self.registry = CollectorRegistry(auto_describe=True)
        self.hub_read_seconds = Histogram(
            "tokentee_hub_read_seconds",
            "Duration of the hub's XREAD calls, including the time they block waiting for"
            " entries (up to TOKENTEE_BLOCK_MS).",
            buckets=_HUB_READ_BUCKETS, registry=self.registry,
        )
        # The read's duration above is mostly BLOCK time on a quiet hub; what a reader waits
        # for is the age of an entry when the hub gets it.
        self.hub_entry_age_seconds = Histogram(
            "tokentee_hub_entry_age_seconds",
            "Age of each log entry when the hub's XREAD returned it: from its ts (the"
            " producer read it from the upstream; the producer's wall clock, so skew between"
            " hosts adds in) to this process reading it.  Entries read by a cursor's catch-up"
            " are not counted.",
            buckets=_HUB_READ_BUCKETS, registry=self.registry,
        )
        self.registry.register(self)

    def redis_error(self, op: str) -> None:
        """Count one failed Redis call at ``op`` (one of :data:`REDIS_OPS`)."""
        self.redis_errors[op] = self.redis_errors.get(op, 0) + 1

    @property
    def fanout_ratio(self) -> float:
        """Token deliveries to SSE clients per token appended (0 before the first token)."""
        return self.tokens_out / self.tokens_in if self.tokens_in else 0.0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("tokentee_active_generations",
                                "Generations whose producer runs in this process.",
                                value=self.active_generations)
        yield GaugeMetricFamily("tokentee_sse_clients", "Open SSE responses.",
                                value=self.sse_clients)
        yield CounterMetricFamily("tokentee_tokens_in", "Token entries this process's"
                                  " producers appended to the log.", value=self.tokens_in)
        yield CounterMetricFamily("tokentee_tokens_out", "Token events this process wrote to"
                                  " SSE clients.", value=self.tokens_out)
        yield CounterMetricFamily("tokentee_unread_cancels", "Generations this process's"
                                  " producers cancelled because nobody read them"
                                  " (cancel_unread_after).", value=self.unread_cancels)
        yield GaugeMetricFamily("tokentee_fanout_ratio", "tokentee_tokens_out_total /"
                                " tokentee_tokens_in_total (0 before the first token).",
                                value=self.fanout_ratio)
        errors = CounterMetricFamily("tokentee_redis_errors", "Failed Redis calls, by where"
                                     " they failed.", labels=["op"])
        for op, count in sorted(self.redis_errors.items()):
            errors.add_metric([op], count)
        yield errors

    def render(self) -> bytes:
        """These metrics in Prometheus text format."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """The current figures as a plain, JSON-ready dict::

            {"active_generations": 1, "sse_clients": 3, "tokens_in": 40, "tokens_out": 120,
             "fanout_ratio": 3.0, "hub_reads": 57, "hub_read_seconds_sum": 12.5,
             "redis_errors": {"api": 0, "hub_read": 0, ...}}
        """
        reads, seconds = 0, 0.0
        for family in self.hub_read_seconds.collect():
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    reads = int(sample.value)
                elif sample.name.endswith("_sum"):
                    seconds = sample.value
        return {
            "active_generations": self.active_generations,
            "sse_clients": self.sse_clients,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "fanout_ratio": self.fanout_ratio,
            "unread_cancels": self.unread_cancels,
            "hub_reads": reads,
            "hub_read_seconds_sum": seconds,
            "redis_errors": dict(self.redis_errors),
        }
