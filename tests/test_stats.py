"""Per-generation statistics, their checkpoint, and the Prometheus totals."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from consumers.stats import (
    HISTOGRAMS,
    GenerationStats,
    GenerationStatsError,
    LogHistogram,
    metric_families,
    totals_increments,
)

CREATED = 1_000.0


def _timeline() -> GenerationStats:
    """Tokens at +250, +375, +500, +1000 ms, done at +1250 ms (all binary-exact)."""
    stats = GenerationStats.begin(created=CREATED, provider="openai", model="gpt-x")
    for ts, text in ((1000.25, "Hel"), (1000.375, "lo"), (1000.5, ", "), (1001.0, "world")):
        stats.on_token(ts, text)
    stats.on_end("done", {"finish_reason": "stop",
                          "usage": {"prompt_tokens": 7, "completion_tokens": 4,
                                    "cached": True, "details": {"reasoning_tokens": 1}}},
                 1001.25)
    return stats


def _nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p * len(ordered) / 100)) - 1]


def test_hand_made_timeline_summary() -> None:
    summary = _timeline().summary()
    gaps = summary.pop("inter_token_gap_ms")
    assert summary == {
        "status": "done", "provider": "openai", "model": "gpt-x",
        "tokens": 4, "characters": 12,
        "time_to_first_token_ms": 250.0, "duration_ms": 1250.0,
        "tokens_per_second": 4.0,  # 3 intervals over 0.75 s
        "finish_reason": "stop", "error_code": None,
        "usage": {"prompt_tokens": 7, "completion_tokens": 4, "cached": True,
                  "details": {"reasoning_tokens": 1}},
        "lost_entries": 0,
    }
    assert gaps["count"] == 3
    assert gaps["max"] == 500.0
    assert gaps["p50"] == pytest.approx(125.0, rel=0.01)
    assert gaps["p95"] == pytest.approx(500.0, rel=0.01)


def test_running_generation_summary() -> None:
    stats = GenerationStats.begin(created=CREATED, provider="p", model="m")
    empty = stats.summary()
    assert empty["status"] == "running"
    assert empty["time_to_first_token_ms"] is None
    assert empty["duration_ms"] is None
    assert empty["tokens_per_second"] is None
    assert empty["inter_token_gap_ms"] == {"p50": None, "p95": None, "max": None, "count": 0}
    stats.on_token(1000.5, "a")
    one = stats.summary()
    assert one["time_to_first_token_ms"] == 500.0
    assert one["duration_ms"] == 500.0  # up to the last token while running
    assert one["tokens_per_second"] is None  # needs two tokens
    assert one["finish_reason"] is None


def test_negative_intervals_are_clamped_to_zero() -> None:
    stats = GenerationStats.begin(created=CREATED, provider="p", model="m")
    stats.on_token(999.0, "a")  # producer clock behind the broker's
    stats.on_token(998.5, "b")  # clock stepped back
    summary = stats.summary()
    assert summary["time_to_first_token_ms"] == 0.0
    assert summary["inter_token_gap_ms"] == {"p50": 0.0, "p95": 0.0, "max": 0.0, "count": 1}
    assert summary["tokens_per_second"] is None  # no positive span


def test_error_path() -> None:
    stats = GenerationStats.begin(created=CREATED, provider="p", model="m")
    stats.on_token(1000.1, "x")
    stats.on_end("error", {"code": "upstream_timeout", "message": "boom"}, 1002.0)
    summary = stats.summary()
    assert summary["status"] == "error"
    assert summary["finish_reason"] == "error"
    assert summary["error_code"] == "upstream_timeout"
    assert summary["usage"] is None
    assert summary["duration_ms"] == 2000.0
    increments = totals_increments(stats)
    assert increments["generations|error|error|p|m"] == 1
    assert not any(name.startswith("usage|") for name in increments)


def test_cancelled_without_tokens() -> None:
    stats = GenerationStats.begin(created=CREATED, provider="p", model="m")
    stats.on_end("cancelled", {"reason": "client"}, 1000.5)
    summary = stats.summary()
    assert (summary["status"], summary["finish_reason"], summary["error_code"]) == (
        "cancelled", "cancelled", None)
    assert summary["duration_ms"] == 500.0
    assert summary["time_to_first_token_ms"] is None
    assert totals_increments(stats) == {
        "generations|cancelled|cancelled|p|m": 1, "tokens|p|m": 0, "characters|p|m": 0,
        "lost_entries": 0,
        "duration_seconds|bucket|0": 1, "duration_seconds|sum": 0.5,  # le=0.5 inclusive
        "duration_seconds|count": 1,
    }


def test_done_without_finish_reason_is_unknown() -> None:
    stats = GenerationStats.begin(created=CREATED, provider="p", model="m")
    stats.on_end("done", {"usage": "not a dict"}, 1000.5)
    assert stats.summary()["finish_reason"] == "unknown"
    assert stats.summary()["usage"] is None


def test_gaps_are_counted_and_do_not_make_an_inter_token_gap() -> None:
    stats = GenerationStats.begin(created=CREATED, provider="p", model="m")
    stats.on_token(1000.0, "a")
    stats.on_token(1000.125, "b")
    stats.on_gap(3, 7)
    stats.on_token(1010.0, "c")  # spans the lost entries: no gap recorded
    stats.on_token(1010.25, "d")
    stats.on_gap(10, 10)
    summary = stats.summary()
    assert summary["lost_entries"] == 6
    assert summary["tokens"] == 4
    assert summary["inter_token_gap_ms"]["count"] == 2
    assert summary["inter_token_gap_ms"]["max"] == 250.0
    stats.on_end("done", {"finish_reason": "stop"}, 1010.5)
    assert totals_increments(stats)["lost_entries"] == 6


def test_events_that_do_not_fit_raise() -> None:
    stats = GenerationStats.begin(created=CREATED, provider="p", model="m")
    with pytest.raises(GenerationStatsError):
        totals_increments(stats)  # still running
    with pytest.raises(GenerationStatsError):
        stats.on_end("token", {}, 1000.0)
    with pytest.raises(GenerationStatsError):
        stats.on_gap(5, 4)
    stats.on_end("done", {"finish_reason": "stop"}, 1000.0)
    with pytest.raises(GenerationStatsError):
        stats.on_token(1001.0, "late")
    with pytest.raises(GenerationStatsError):
        stats.on_end("error", {"code": "x"}, 1001.0)


def test_unreadable_state_raises() -> None:
    state = _timeline().to_state()
    with pytest.raises(GenerationStatsError):
        GenerationStats.from_state({**state, "v": 99})
    with pytest.raises(GenerationStatsError):
        GenerationStats.from_state({k: v for k, v in state.items() if k != "tokens"})
    with pytest.raises(GenerationStatsError):
        GenerationStats.from_state({**state, "gap_buckets": [0, 1]})


# -- checkpointing -------------------------------------------------------------------------


def _events(seed: int, n: int) -> Iterator[tuple[str, Any]]:
    rng = random.Random(seed)
    ts = CREATED + rng.uniform(0.1, 2.0)
    for i in range(n):
        if i == n // 3:
            yield "gap", (i + 1, i + 3)
        ts += rng.lognormvariate(math.log(0.03), 0.5) if rng.random() > 0.01 else -0.002
        yield "token", (ts, "x" * rng.randint(1, 8))
    yield "end", ("done", {"finish_reason": "length", "usage": {"completion_tokens": n}},
                  ts + 0.01)


def _apply(stats: GenerationStats, event: tuple[str, Any]) -> None:
    kind, args = event
    if kind == "token":
        stats.on_token(*args)
    elif kind == "gap":
        stats.on_gap(*args)
    else:
        stats.on_end(*args)


@pytest.mark.parametrize("every", [1, 7, 250])
def test_checkpointed_run_ends_identical_to_uninterrupted(every: int) -> None:
    straight = GenerationStats.begin(created=CREATED, provider="p", model="m")
    resumed = GenerationStats.begin(created=CREATED, provider="p", model="m")
    for i, event in enumerate(_events(seed=every, n=1_000)):
        _apply(straight, event)
        _apply(resumed, event)
        if i % every == 0:
            state = resumed.to_state()
            assert json.loads(json.dumps(state)) == state
            resumed = GenerationStats.from_state(json.loads(json.dumps(state)))
    assert resumed.summary() == straight.summary()
    assert totals_increments(resumed) == totals_increments(straight)
    assert resumed.to_state() == straight.to_state()


def test_state_size_does_not_grow_with_tokens() -> None:
    stats = GenerationStats.begin(created=CREATED, provider="p", model="m")
    rng = random.Random(1)
    ts = CREATED
    sizes = {}
    for i in range(1, 100_001):
        ts += rng.lognormvariate(math.log(0.03), 0.4)
        stats.on_token(ts, "tok")
        if i in (1_000, 100_000):
            sizes[i] = len(json.dumps(stats.to_state()))
    assert sizes[100_000] < 4_096
    assert sizes[100_000] < sizes[1_000] + 1_024  # only new histogram buckets, if any
    assert stats.summary()["tokens"] == 100_000


# -- percentile accuracy -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_percentiles_within_one_percent_of_exact_nearest_rank(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, 10, 101, 1_000, 5_000])
    draws: list[Callable[[], float]] = [
        lambda: rng.lognormvariate(math.log(0.03), 1.5),
        lambda: rng.uniform(1e-6, 3_600.0),
        lambda: rng.expovariate(20.0) + 1e-6,
        lambda: 10 ** rng.uniform(-6, math.log10(3_600)),
    ]
    draw = rng.choice(draws)
    values = [draw() for _ in range(n)]
    values += [0.0] * rng.choice([0, 0, n // 10])  # clamped negative gaps
    histogram = LogHistogram()
    for v in values:
        histogram.add(v)
    assert histogram.max == max(values)
    for p in (1, 25, 50, 90, 95, 99, 100):
        exact = _nearest_rank(values, p)
        got = histogram.percentile(p)
        assert got is not None
        assert abs(got - exact) <= 0.01 * exact, (p, exact, got)
    restored = LogHistogram.from_state(json.loads(json.dumps(histogram.to_state())))
    assert restored.percentile(95) == histogram.percentile(95)


def test_histogram_is_sparse_and_clamped() -> None:
    histogram = LogHistogram()
    assert histogram.percentile(50) is None
    for v in (1e-9, 0.0, 0.5, 7_200.0):
        histogram.add(v)
    state = histogram.to_state()
    assert state["zeros"] == 2
    assert len(state["buckets"]) == 2  # 0.5 s and the 1 h top bucket
    assert histogram.percentile(50) == 0.0
    assert histogram.percentile(100) == pytest.approx(3_600.0, rel=0.01)  # saturated
    assert histogram.max == 7_200.0


# -- Prometheus totals ---------------------------------------------------------------------


def test_totals_increments_of_the_timeline() -> None:
    ttft_le = HISTOGRAMS["ttft_seconds"]
    gap_le = HISTOGRAMS["inter_token_gap_seconds"]
    assert (ttft_le.index(0.25), gap_le.index(0.15), gap_le.index(0.5)) == (2, 8, 10)
    assert totals_increments(_timeline()) == {
        "generations|done|stop|openai|gpt-x": 1,
        "tokens|openai|gpt-x": 4,
        "characters|openai|gpt-x": 12,
        "lost_entries": 0,
        "ttft_seconds|bucket|2": 1,  # 0.25 s is in the le=0.25 bucket (inclusive)
        "ttft_seconds|sum": 0.25,
        "ttft_seconds|count": 1,
        "duration_seconds|bucket|2": 1,  # 1.25 s: le=2.5
        "duration_seconds|sum": 1.25,
        "duration_seconds|count": 1,
        "tokens_per_second|bucket|1": 1,  # 4/s: le=5
        "tokens_per_second|sum": 4.0,
        "tokens_per_second|count": 1,
        "inter_token_gap_seconds|bucket|8": 2,  # 0.125 s twice: le=0.15
        "inter_token_gap_seconds|bucket|10": 1,  # 0.5 s: le=0.5 (inclusive)
        "inter_token_gap_seconds|sum": 0.75,
        "inter_token_gap_seconds|count": 3,
        "usage|openai|gpt-x|prompt_tokens": 7,  # numeric only: no bool, no nested dict
        "usage|openai|gpt-x|completion_tokens": 4,
    }


def test_gap_buckets_are_exact_and_overflow_to_inf() -> None:
    stats = GenerationStats.begin(created=CREATED, provider="p", model="m")
    gaps = [0.0, 0.001, 0.0011, 0.2, 12.0, 30.0]
    ts = CREATED
    stats.on_token(ts, "a")
    for gap in gaps:
        ts += gap
        stats.on_token(ts, "a")
    stats.on_end("done", {"finish_reason": "stop"}, ts)
    increments = totals_increments(stats)
    buckets = {int(name.rsplit("|", 1)[1]): n for name, n in increments.items()
               if name.startswith("inter_token_gap_seconds|bucket|")}
    inf = len(HISTOGRAMS["inter_token_gap_seconds"])
    assert buckets == {0: 2, 1: 1, 9: 1, inf: 2}
    assert increments["inter_token_gap_seconds|sum"] == pytest.approx(sum(gaps))


def test_label_values_are_sanitized() -> None:
    stats = GenerationStats.begin(created=CREATED, provider="a|b", model="m" * 150)
    stats.on_end("done", {"finish_reason": "tool|calls", "usage": {"x|y": 2}}, CREATED)
    increments = totals_increments(stats)
    model = "m" * 100
    assert increments[f"generations|done|tool_calls|a_b|{model}"] == 1
    assert increments[f"usage|a_b|{model}|x_y"] == 2
    families = {f.name: f for f in metric_families(increments)}
    [sample] = families["tokentee_usage_tokens"].samples
    assert sample.labels == {"provider": "a_b", "model": model, "key": "x_y"}


class _Snapshot:
    """A collector yielding the families of one totals snapshot."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        yield from metric_families(self.totals)


def _sum_into(totals: dict[str, float], increments: dict[str, float]) -> None:
    for name, value in increments.items():  # what HINCRBYFLOAT does
        totals[name] = totals.get(name, 0.0) + value


def test_metric_families_render_and_parse() -> None:
    first = _timeline()
    second = GenerationStats.begin(created=CREATED, provider="openai", model="gpt-x")
    second.on_token(1002.0, "a")  # ttft 2 s
    second.on_token(1002.0, "b")  # 0 s gap
    second.on_gap(3, 4)
    second.on_end("error", {"code": "rate_limited", "message": "slow down"}, 1003.0)
    totals: dict[str, float] = {}
    _sum_into(totals, totals_increments(first))
    _sum_into(totals, totals_increments(second))
    # Forward compatibility: fields this version does not know are ignored.
    totals |= {"future|thing": 3.0, "ttft_seconds|bucket|999": 5.0, "ttft_seconds|bucket|x": 1.0,
               "tokens|too|many|parts": 1.0}

    registry = CollectorRegistry()
    registry.register(_Snapshot(totals))
    text = generate_latest(registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    pm = (("model", "gpt-x"), ("provider", "openai"))

    def outcome(status: str, reason: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((*pm, ("status", status), ("finish_reason", reason))))

    assert samples[("tokentee_generations_total", outcome("done", "stop"))] == 1
    assert samples[("tokentee_generations_total", outcome("error", "error"))] == 1
    assert samples[("tokentee_tokens_total", pm)] == 6
    assert samples[("tokentee_characters_total", pm)] == 14
    assert samples[("tokentee_lost_entries_total", ())] == 2
    usage = "tokentee_usage_tokens_total"
    assert samples[(usage, (("key", "completion_tokens"), *pm))] == 4
    assert samples[(usage, (("key", "prompt_tokens"), *pm))] == 7

    def buckets(metric: str) -> dict[str, float]:
        return {dict(labels)["le"]: value for (name, labels), value in samples.items()
                if name == f"{metric}_bucket"}

    ttft = buckets("tokentee_time_to_first_token_seconds")
    assert len(ttft) == len(HISTOGRAMS["ttft_seconds"]) + 1
    assert (ttft["0.1"], ttft["0.25"], ttft["1.5"], ttft["2.0"], ttft["+Inf"]) == (0, 1, 1, 2, 2)
    assert samples[("tokentee_time_to_first_token_seconds_sum", ())] == 2.25
    assert samples[("tokentee_time_to_first_token_seconds_count", ())] == 2

    duration = buckets("tokentee_generation_duration_seconds")
    assert (duration["1.0"], duration["2.5"], duration["5.0"]) == (0, 1, 2)
    assert samples[("tokentee_generation_duration_seconds_sum", ())] == 4.25

    tps = buckets("tokentee_tokens_per_second")  # the second has no span: not observed
    assert (tps["1.0"], tps["5.0"], tps["+Inf"]) == (0, 1, 1)

    gap = buckets("tokentee_inter_token_gap_seconds")
    assert (gap["0.001"], gap["0.1"], gap["0.15"], gap["0.5"], gap["+Inf"]) == (1, 1, 3, 4, 4)
    assert samples[("tokentee_inter_token_gap_seconds_sum", ())] == 0.75
    assert samples[("tokentee_inter_token_gap_seconds_count", ())] == 4


def test_metric_families_of_an_empty_hash() -> None:
    families = {family.name: family for family in metric_families({})}
    assert set(families) == {
        "tokentee_generations", "tokentee_tokens", "tokentee_characters",
        "tokentee_lost_entries", "tokentee_usage_tokens",
        "tokentee_time_to_first_token_seconds", "tokentee_generation_duration_seconds",
        "tokentee_tokens_per_second", "tokentee_inter_token_gap_seconds",
    }
    assert families["tokentee_generations"].samples == []
    inf = [s for s in families["tokentee_inter_token_gap_seconds"].samples
           if s.labels.get("le") == "+Inf"]
    assert [s.value for s in inf] == [0.0]
