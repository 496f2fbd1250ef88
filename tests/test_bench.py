"""``tokentee bench`` end to end: the command as a user runs it, against the test Redis."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from typing import Any

import pytest
import redis

from tests.conftest import RUN_PREFIX

GENERATIONS, READERS, TOKENS = 2, 3, 20


def run_bench(redis_url: str, prefix: str, via: str, *extra: str
              ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {**os.environ, "REDIS_URL": redis_url, "TOKENTEE_KEY_PREFIX": prefix}
    env.pop("TOKENTEE_REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "broker", "bench", "--generations", str(GENERATIONS),
         "--readers", str(READERS), "--tokens", str(TOKENS), "--rate", "200", "--via", via, *extra],
        env=env, capture_output=True, text=True, timeout=50, check=False,
    )
    try:
        report = json.loads(done.stdout)  # the whole of stdout is one JSON object
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not one JSON object:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done, report


@pytest.mark.parametrize("via", ["api", "sse"])
def test_bench_reports_complete_ordered_delivery(redis_url: str, via: str) -> None:
    prefix = f"{RUN_PREFIX}-{secrets.token_hex(4)}"  # the session cleans up by RUN_PREFIX
    done, report = run_bench(redis_url, prefix, via)

    assert done.returncode == 0, done.stderr
    assert report["ok"] is True
    assert report["via"] == via
    assert report["timed_out"] is False
    assert report["params"] == {"generations": GENERATIONS, "readers": READERS,
                                "tokens": TOKENS, "rate": 200.0}
    assert isinstance(report["python"], str)
    assert isinstance(report["redis_version"], str)
    assert isinstance(report["wall_seconds"], float)
    assert isinstance(report["tokens_per_second_delivered"], float)

    deliveries = report["deliveries"]
    expected = GENERATIONS * READERS * (TOKENS + 1)
    assert deliveries["expected"] == expected
    assert deliveries["received"] == expected
    assert deliveries["all_arrived"] is True
    assert deliveries["in_order"] is True
    assert deliveries["by_type"] == {"token": GENERATIONS * READERS * TOKENS,
                                     "done": GENERATIONS * READERS}
    assert deliveries["readers_failed"] == 0
    assert deliveries["errors"] == {}

    latency = report["latency_ms"]
    assert latency["samples"] == GENERATIONS * READERS * TOKENS
    for key in ("p50", "p99", "max"):
        assert isinstance(latency[key], float)
    assert latency["p50"] <= latency["p99"] <= latency["max"]

    broker = report["broker"]
    assert isinstance(broker["process"], str)
    assert isinstance(broker["cpu_seconds"], float)
    assert isinstance(broker["rss_mb"], float)
    assert broker["cancel_ms"]["trials"] == 10
    assert 0 <= broker["cancel_ms"]["p50"] <= broker["cancel_ms"]["max"]
    if via == "api":
        assert isinstance(broker["hub_xread_calls"], int)
        assert broker["hub_xread_calls"] > 0

    stats = report["redis"]
    for key in ("clients_outside_broker", "broker_connections_idle", "broker_connections_peak",
                "commands_processed"):
        assert isinstance(stats[key], int), key
    assert stats["clients_outside_broker"] >= 1  # at least the bench's own probe
    assert stats["broker_connections_peak"] >= stats["broker_connections_idle"] > 0
    assert isinstance(stats["cpu_seconds"], float)
    assert stats["commands_processed"] > 0
    assert stats["command_calls"]["evalsha"] > 0  # the producers' appends

    # The run leaves nothing behind under its prefix.
    with redis.Redis.from_url(redis_url) as client:
        assert list(client.scan_iter(match=f"{prefix}*")) == []


@pytest.mark.parametrize("via", ["api", "sse"])
def test_bench_with_consumers_reports_their_completion(redis_url: str, via: str) -> None:
    prefix = f"{RUN_PREFIX}-{secrets.token_hex(4)}"
    done, report = run_bench(redis_url, prefix, via, "--consumers")
    assert done.returncode == 0, done.stderr
    consumers = report["broker"]["consumers"]
    assert consumers["all_processed"] is True
    assert consumers["analytics_tokens"] == GENERATIONS * TOKENS
    assert consumers["analytics_exact"] is True
    assert consumers["sentences_logged"] > 0
