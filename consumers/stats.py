"""Per-generation statistics and the Prometheus totals built from them.

``GenerationStats`` folds one generation's log (tokens, an optional ``gap``, one terminal
entry) into a small state that the analytics consumer checkpoints as JSON after every
batch; its size does not grow with the token count.  ``summary`` is the body of
``GET /v1/streams/{id}/stats``.

Totals across generations live in one Redis hash: a finished generation adds
``totals_increments(stats)`` to it with ``HINCRBYFLOAT`` (exactly once, which is the
caller's business), and ``metric_families`` turns a snapshot of the hash back into
Prometheus metric families.  The hash field names and the ``HISTOGRAMS`` bounds are a
storage format: changing a bound's position changes what stored counts mean.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from broker.errors import TokenteeError
from broker.events import TERMINAL_TYPES

__all__ = [
    "HISTOGRAMS",
    "GenerationStats",
    "GenerationStatsError",
    "LogHistogram",
    "metric_families",
    "totals_increments",
]

_STATE_VERSION = 1


class GenerationStatsError(TokenteeError, ValueError):
    """An event that does not fit the generation's state (a token after the end, a second
    terminal entry, totals of a generation still running), or an unreadable checkpoint."""


# Prometheus bucket upper bounds (``le``, inclusive); index ``len(le)`` is ``+Inf``.
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "ttft_seconds": (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0,
                     30.0, 60.0),
    "duration_seconds": (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                         1800.0, 3600.0),
    "tokens_per_second": (1.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0,
                          500.0, 1000.0),
    "inter_token_gap_seconds": (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
                                0.5, 1.0, 2.5, 5.0, 10.0),
}
_GAP_LE = HISTOGRAMS["inter_token_gap_seconds"]

_METRIC_NAMES: dict[str, tuple[str, str]] = {
    "ttft_seconds": ("tokentee_time_to_first_token_seconds",
                     "Time from generation creation to its first token."),
    "duration_seconds": ("tokentee_generation_duration_seconds",
                         "Time from generation creation to its terminal entry."),
    "tokens_per_second": ("tokentee_tokens_per_second",
                          "Decode rate of a generation between its first and last token."),
    "inter_token_gap_seconds": ("tokentee_inter_token_gap_seconds",
                                "Time between consecutive tokens of a generation."),
}

_LABEL_MAX = 100


def _label(value: str) -> str:
    """A label value safe inside a ``|``-separated hash field name."""
    return value.replace("|", "_")[:_LABEL_MAX]


def _bucket(le: tuple[float, ...], value: float) -> int:
    # Prometheus buckets are ``value <= le``: the first bound at or above the value.
    return bisect_left(le, value)


class LogHistogram:
    """Quantiles of positive durations (seconds) with relative error below 1%.

    Hand-written rather than a library because the state must be a small JSON value that is
    checkpointed after every batch.  ``ddsketch`` (the obvious candidate) serializes only to
    protobuf (its ``serialization`` extra), so JSON would mean reaching into its private
    stores; this is the same idea (DDSketch's log mapping) in a few lines.

    Bucket ``i`` holds values in ``(G**(i-1), G**i]`` with ``G = 1.02`` and reports
    ``2 * G**i / (G + 1)``, at most ``(G - 1) / (G + 1) < 0.99%`` from any value in it.
    Values are clamped to 1 µs .. 1 h, so at most ~1,100 buckets can ever exist; values below
    1 µs (sub-resolution of float unix timestamps, and the 0 of clamped negative gaps) are
    counted as exactly 0.  Quantiles are nearest-rank and never exceed the exact ``max``.
    """

    GAMMA = 1.02
    _LOG_GAMMA = math.log(GAMMA)
    MIN_VALUE = 1e-6
    MAX_VALUE = 3600.0

    __slots__ = ("buckets", "count", "max", "zeros")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.zeros = 0
        self.count = 0
        self.max: float | None = None

    def add(self, value: float) -> None:
        self.count += 1
        if self.max is None or value > self.max:
            self.max = value
        if value < self.MIN_VALUE:
            self.zeros += 1
            return
        index = math.ceil(math.log(min(value, self.MAX_VALUE)) / self._LOG_GAMMA)
        self.buckets[index] = self.buckets.get(index, 0) + 1

    def percentile(self, p: float) -> float | None:
        """Nearest-rank ``p``-th percentile (0 < p <= 100); None when empty."""
        if self.max is None:
            return None
        rank = max(1, math.ceil(p * self.count / 100))
        seen = self.zeros
        if seen >= rank:
            return 0.0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(2 * self.GAMMA**index / (self.GAMMA + 1), self.max)
        return self.max  # unreachable while counts add up

    def to_state(self) -> dict[str, Any]:
        return {"buckets": {str(i): n for i, n in sorted(self.buckets.items())},
                "zeros": self.zeros, "count": self.count, "max": self.max}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LogHistogram:
        histogram = cls()
        histogram.buckets = {int(i): int(n) for i, n in state["buckets"].items()}
        histogram.zeros = int(state["zeros"])
        histogram.count = int(state["count"])
        histogram.max = None if state["max"] is None else float(state["max"])
        return histogram


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@dataclass(slots=True)
class GenerationStats:
    """Statistics of one generation, fed its log entries in order.  Pure: no I/O.

    Timestamps are unix seconds: ``created`` from the broker, token ``ts`` from the
    producer.  Negative intervals (clock steps) are clamped to 0.  The interval that spans
    a ``gap`` is not counted as an inter-token gap (it covers lost entries).
    """

    created: float
    provider: str
    model: str
    status: str = "running"
    finish_reason: str | None = None
    error_code: str | None = None
    usage: dict[str, Any] | None = None
    end_ts: float | None = None
    tokens: int = 0
    characters: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    skip_next_gap: bool = False
    lost_entries: int = 0
    gaps: LogHistogram = field(default_factory=LogHistogram)
    gap_sum: float = 0.0
    # Exact counts against the fixed Prometheus bounds, so the aggregate is exact.
    gap_buckets: list[int] = field(default_factory=lambda: [0] * (len(_GAP_LE) + 1))

    @classmethod
    def begin(cls, *, created: float, provider: str, model: str) -> GenerationStats:
        return cls(created=created, provider=provider, model=model)

    def _check_running(self, what: str) -> None:
        if self.status != "running":
            raise GenerationStatsError(f"{what} after the generation ended ({self.status})")

    def on_token(self, ts: float, text: str) -> None:
        """Count a token appended at producer time ``ts``.  Raises GenerationStatsError
        after ``on_end``."""
        self._check_running("token")
        self.tokens += 1
        self.characters += len(text)
        if self.first_ts is None:
            self.first_ts = ts
        if self.last_ts is not None and not self.skip_next_gap:
            gap = max(0.0, ts - self.last_ts)
            self.gaps.add(gap)
            self.gap_sum += gap
            self.gap_buckets[_bucket(_GAP_LE, gap)] += 1
        self.skip_next_gap = False
        self.last_ts = ts

    def on_gap(self, first_missing: int, last_missing: int) -> None:
        """Record that entries ``first_missing..last_missing`` (inclusive) were lost."""
        self._check_running("gap")
        if last_missing < first_missing:
            raise GenerationStatsError(f"empty gap {first_missing}..{last_missing}")
        self.lost_entries += last_missing - first_missing + 1
        self.skip_next_gap = True

    def on_end(self, kind: str, data: Mapping[str, Any], ts: float) -> None:
        """Record the terminal entry ``kind`` (done, error or cancelled) appended at ``ts``.

        ``finish_reason`` is ``data["finish_reason"]`` for done ("unknown" if absent) and
        the kind otherwise; ``usage`` is kept when it is a dict.  Raises
        GenerationStatsError on an unknown kind or a second terminal entry.
        """
        self._check_running(kind)
        if kind not in TERMINAL_TYPES:
            raise GenerationStatsError(f"not a terminal entry type: {kind!r}")
        self.status = kind
        self.end_ts = ts
        if kind == "done":
            reason = data.get("finish_reason")
            self.finish_reason = "unknown" if reason is None else str(reason)
        else:
            self.finish_reason = kind
        if kind == "error" and data.get("code") is not None:
            self.error_code = str(data["code"])
        usage = data.get("usage")
        self.usage = dict(usage) if isinstance(usage, dict) else None

    # -- derived values (seconds) ------------------------------------------------------

    @property
    def ttft(self) -> float | None:
        return None if self.first_ts is None else max(0.0, self.first_ts - self.created)

    @property
    def duration(self) -> float | None:
        end = self.end_ts if self.end_ts is not None else self.last_ts
        return None if end is None else max(0.0, end - self.created)

    @property
    def tokens_per_second(self) -> float | None:
        """Decode rate: intervals between the first and last token per second, that is
        ``(tokens - 1) / (last - first)``; None with fewer than 2 tokens or no time span."""
        if self.first_ts is None or self.last_ts is None or self.tokens < 2:
            return None
        span = self.last_ts - self.first_ts
        return (self.tokens - 1) / span if span > 0 else None

    def summary(self) -> dict[str, Any]:
        """The body of ``GET /v1/streams/{id}/stats``; durations in ms, 3 decimals."""
        tps = self.tokens_per_second
        return {
            "status": self.status,
            "provider": self.provider,
            "model": self.model,
            "tokens": self.tokens,
            "characters": self.characters,
            "time_to_first_token_ms": _ms(self.ttft),
            "duration_ms": _ms(self.duration),
            "tokens_per_second": None if tps is None else round(tps, 3),
            "inter_token_gap_ms": {
                "p50": _ms(self.gaps.percentile(50)),
                "p95": _ms(self.gaps.percentile(95)),
                "max": _ms(self.gaps.max),
                "count": self.gaps.count,
            },
            "finish_reason": self.finish_reason,
            "error_code": self.error_code,
            "usage": self.usage,
            "lost_entries": self.lost_entries,
        }

    # -- checkpoint ----------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """A JSON value whose size does not depend on the token count: 2-3 KB for typical
        gap spreads, ~15 KB if gaps fill every log bucket from 1 µs to 1 h (plus usage)."""
        return {
            "v": _STATE_VERSION,
            "created": self.created, "provider": self.provider, "model": self.model,
            "status": self.status, "finish_reason": self.finish_reason,
            "error_code": self.error_code, "usage": self.usage, "end_ts": self.end_ts,
            "tokens": self.tokens, "characters": self.characters,
            "first_ts": self.first_ts, "last_ts": self.last_ts,
            "skip_next_gap": self.skip_next_gap, "lost_entries": self.lost_entries,
            "gaps": self.gaps.to_state(), "gap_sum": self.gap_sum,
            "gap_buckets": list(self.gap_buckets),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> GenerationStats:
        """Rebuild from ``to_state`` output.  Raises GenerationStatsError if unreadable."""
        try:
            if state["v"] != _STATE_VERSION:
                raise GenerationStatsError(f"unknown stats state version {state['v']!r}")
            gap_buckets = [int(n) for n in state["gap_buckets"]]
            if len(gap_buckets) != len(_GAP_LE) + 1:
                raise GenerationStatsError("stats state has other gap bucket bounds")
            return cls(
                created=float(state["created"]), provider=str(state["provider"]),
                model=str(state["model"]), status=str(state["status"]),
                finish_reason=state["finish_reason"], error_code=state["error_code"],
                usage=state["usage"], end_ts=state["end_ts"],
                tokens=int(state["tokens"]), characters=int(state["characters"]),
                first_ts=state["first_ts"], last_ts=state["last_ts"],
                skip_next_gap=bool(state["skip_next_gap"]),
                lost_entries=int(state["lost_entries"]),
                gaps=LogHistogram.from_state(state["gaps"]),
                gap_sum=float(state["gap_sum"]), gap_buckets=gap_buckets,
            )
        except GenerationStatsError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise GenerationStatsError(f"unreadable stats state: {e!r}") from e


# -- Prometheus totals -------------------------------------------------------------------


def totals_increments(stats: GenerationStats) -> dict[str, float]:
    """The ``HINCRBYFLOAT`` increments one finished generation adds to the totals hash.

    Histogram buckets are non-cumulative; fields with nothing to add are left out (except
    the generation, token, character and lost-entry counters, so their series exist).
    Raises GenerationStatsError while the generation is still running.
    """
    if stats.status == "running" or stats.finish_reason is None:
        raise GenerationStatsError("totals of a generation that has not ended")
    provider, model = _label(stats.provider), _label(stats.model)
    out: dict[str, float] = {
        f"generations|{stats.status}|{_label(stats.finish_reason)}|{provider}|{model}": 1,
        f"tokens|{provider}|{model}": stats.tokens,
        f"characters|{provider}|{model}": stats.characters,
        "lost_entries": stats.lost_entries,
    }
    for name, value in (("ttft_seconds", stats.ttft), ("duration_seconds", stats.duration),
                        ("tokens_per_second", stats.tokens_per_second)):
        if value is not None:
            out[f"{name}|bucket|{_bucket(HISTOGRAMS[name], value)}"] = 1
            out[f"{name}|sum"] = value
            out[f"{name}|count"] = 1
    if stats.gaps.count:
        for i, n in enumerate(stats.gap_buckets):
            if n:
                out[f"inter_token_gap_seconds|bucket|{i}"] = n
        out["inter_token_gap_seconds|sum"] = stats.gap_sum
        out["inter_token_gap_seconds|count"] = stats.gaps.count
    for key, value in (stats.usage or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f"usage|{provider}|{model}|{_label(str(key))}"] = value
    return out


def metric_families(totals: Mapping[str, float]) -> list[Metric]:
    """Metric families from a snapshot of the totals hash (values already parsed to float).

    Every family is returned even when empty; fields this version does not know (other
    prefixes, arities or bucket indexes) are ignored.
    """
    generations = CounterMetricFamily(
        "tokentee_generations", "Generations finished, by outcome.",
        labels=["status", "finish_reason", "provider", "model"])
    tokens = CounterMetricFamily("tokentee_tokens", "Tokens received.",
                                 labels=["provider", "model"])
    characters = CounterMetricFamily("tokentee_characters", "Characters of tokens received.",
                                     labels=["provider", "model"])
    lost = CounterMetricFamily("tokentee_lost_entries", "Log entries lost before analysis.")
    usage = CounterMetricFamily("tokentee_usage_tokens",
                                "Numeric usage values reported by the upstream, by key.",
                                labels=["provider", "model", "key"])
    buckets = {name: [0.0] * (len(le) + 1) for name, le in HISTOGRAMS.items()}
    sums = dict.fromkeys(HISTOGRAMS, 0.0)
    lost_total = 0.0
    for name, value in sorted(totals.items()):
        parts = name.split("|")
        match parts:
            case ["generations", status, reason, provider, model]:
                generations.add_metric([status, reason, provider, model], value)
            case ["tokens", provider, model]:
                tokens.add_metric([provider, model], value)
            case ["characters", provider, model]:
                characters.add_metric([provider, model], value)
            case ["lost_entries"]:
                lost_total = value
            case ["usage", provider, model, key]:
                usage.add_metric([provider, model, key], value)
            case [histogram, "bucket", index] if histogram in buckets:
                slot = int(index) if index.isascii() and index.isdigit() else -1
                if 0 <= slot < len(buckets[histogram]):
                    buckets[histogram][slot] = value
            case [histogram, "sum"] if histogram in sums:
                sums[histogram] = value
            case _:  # "<histogram>|count" is implied by the buckets; unknown fields
                pass
    lost.add_metric([], lost_total)
    families: list[Metric] = [generations, tokens, characters, lost, usage]
    for name, le in HISTOGRAMS.items():
        metric, doc = _METRIC_NAMES[name]
        cumulative: list[tuple[str, float]] = []
        running = 0.0
        for bound, count in zip((*[repr(b) for b in le], "+Inf"), buckets[name], strict=True):
            running += count
            cumulative.append((bound, running))
        families.append(HistogramMetricFamily(metric, doc, buckets=cumulative,
                                              sum_value=sums[name]))
    return families
