"""Operations: the settings' environment names, /healthz and /readyz, the broker's own
metrics, and JSON logs that carry the generation id."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.embedded import EmbeddedRedisProcess, free_loopback_port
from broker.events import Event
from broker.logs import GenerationFilter, generation_context, json_formatter
from broker.providers.base import GenerationRequest
from broker.service import Broker
from broker.settings import Settings
from consumers.runtime import ConsumerType, Generation
from tests.conftest import delete_prefix, make_settings, running_server

README = (Path(__file__).parent.parent / "README.md").read_text()


# --- settings and their environment variables ------------------------------------------

# A value for each non-numeric field that differs from its default, as (raw, parsed).
_STRING_VALUES: dict[str, tuple[str, object]] = {
    "redis_url": ("redis://example:1/0", "redis://example:1/0"),
    "key_prefix": ("envtest", "envtest"),
    "default_provider": ("openai", "openai"),
    "consumers": ("analytics", "analytics"),
    "sentences_sink": ("off", "off"),
    "host": ("0.0.0.0", "0.0.0.0"),
    "public_url": ("http://proxy:8080", "http://proxy:8080"),
    "log_format": ("json", "json"),
    "openai_base_url": ("http://upstream:9000/v1", "http://upstream:9000/v1"),
    "openai_model": ("model-x", "model-x"),
    "anthropic_base_url": ("http://upstream:9001", "http://upstream:9001"),
    "anthropic_model": ("model-y", "model-y"),
    "openai_api_key": ("sk-env", "sk-env"),
    "anthropic_api_key": ("sk-ant-env", "sk-ant-env"),
}


def _value_for(field: str) -> tuple[str, object]:
    """A raw environment value for ``field`` and what it parses to (``_ANY``: a field this
    test has no value for, which must merely change or be refused)."""
    default = Settings.model_fields[field].default
    if field in _STRING_VALUES:
        return _STRING_VALUES[field]
    if isinstance(default, bool):
        return str(not default).lower(), not default
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        return str(default + 0.5), default + 0.5
    return "tt-env-check", _ANY


_ANY = object()


def _read(field: str) -> tuple[object, list[Any]]:
    """The field's value from the environment, or the validation errors."""
    try:
        return getattr(Settings(), field), []
    except ValidationError as exc:
        return None, list(exc.errors())


def test_every_env_name_sets_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    by_field = Settings.env_names_by_field()
    assert list(by_field) == list(Settings.model_fields)
    names = Settings.env_names()
    assert len(names) == len(set(names))
    assert all(n.startswith("TOKENTEE_") for n in (env[0] for env in by_field.values()))
    for name in names:
        monkeypatch.delenv(name, raising=False)
    for field, env in by_field.items():
        raw, parsed = _value_for(field)
        for name in env:
            with monkeypatch.context() as m:
                m.setenv(name, raw)
                value, errors = _read(field)
            if errors:
                # Refused: the variable was read (everything else is at its default).
                assert parsed is _ANY, f"{name}: {errors}"
                assert len(errors) == 1
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if parsed is _ANY:
                assert value != Settings.model_fields[field].default, f"{name} ignored"
            else:
                assert value == parsed, f"{name} did not set {field}"


def test_serve_help_lists_every_env_name() -> None:
    done = subprocess.run([sys.executable, "-m", "broker", "serve", "--help"],
                          env={**os.environ, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=30, check=True)
    for name in Settings.env_names():
        assert re.search(rf"\b{name}\b", done.stdout), f"{name} missing from serve --help"


def test_readme_configuration_table_names_every_env_name() -> None:
    for field, env in Settings.env_names_by_field().items():
        row = re.search(rf"^\| `{field}` \| (.*?) \|", README, flags=re.M)
        assert row is not None, f"README has no row for {field}"
        assert re.findall(r"`([A-Z0-9_]+)`", row.group(1)) == env, field


# --- /healthz and /readyz ----------------------------------------------------------------


async def test_readyz_reports_a_draining_broker(
    broker: Broker, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready",
                            "checks": {"redis": "ok", "hub": "ok", "draining": "ok"}}
    if isinstance(getattr(type(broker), "draining", None), property):
        broker.drain()  # type: ignore[attr-defined]
    else:  # a Broker without graceful drain: the flag alone
        monkeypatch.setattr(broker, "draining", True, raising=False)
    draining = await http.get("/readyz")
    assert draining.status_code == 503
    assert draining.json()["failed"] == ["draining"]
    assert draining.json()["checks"]["draining"] == "draining for shutdown"
    assert (await http.get("/healthz")).status_code == 200


async def test_readyz_reports_a_dead_hub(broker: Broker, http: httpx.AsyncClient) -> None:
    # The hub's reader dies: readers would get nothing new, so the replica is not ready,
    # while it is still alive.
    tasks = list(broker.hub._tasks)
    tasks[0].cancel()
    await asyncio.gather(*tasks[:1], return_exceptions=True)
    no_hub = await http.get("/readyz")
    assert no_hub.status_code == 503
    assert no_hub.json()["failed"] == ["hub"]
    assert no_hub.json()["checks"]["hub"] == "the hub's reader is not running"
    assert (await http.get("/healthz")).status_code == 200


@contextlib.asynccontextmanager
async def private_redis_server(**overrides: object) -> AsyncIterator[
        tuple[EmbeddedRedisProcess, Broker, str]]:
    """A broker and its HTTP server on a redis-server of their own, which the test may
    pause or stop."""
    server = EmbeddedRedisProcess()
    url = server.start()
    try:
        settings = make_settings(url, **overrides)
        async with Broker.open(settings) as b, running_server(settings, b) as base:
            yield server, b, base
    finally:
        server.stop()


async def test_readyz_times_out_on_a_redis_that_does_not_answer() -> None:
    async with private_redis_server(ready_timeout_seconds=0.2) as (server, b, base), \
            httpx.AsyncClient(base_url=base) as http:
        assert server.url is not None
        pauser = aioredis.from_url(server.url)
        try:
            await pauser.execute_command("CLIENT", "PAUSE", "5000", "ALL")
            started = asyncio.get_running_loop().time()
            ready = await http.get("/readyz")
            elapsed = asyncio.get_running_loop().time() - started
            alive = await http.get("/healthz")  # no Redis call: answers while paused
        finally:
            await pauser.aclose()
        assert ready.status_code == 503
        assert ready.json()["failed"] == ["redis"]
        assert ready.json()["checks"]["redis"] == "redis did not answer PING within 0.2 s"
        assert elapsed < 3.0  # the check's own timeout, not the pause, ended the wait
        assert alive.status_code == 200
        assert b.metrics.snapshot()["redis_errors"]["ready"] == 1


async def test_healthz_stays_up_when_redis_is_gone() -> None:
    async with private_redis_server() as (server, _b, base), \
            httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/readyz")).status_code == 200
        server.stop()
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "unavailable"
        assert ready.json()["failed"] == ["redis"]
        assert ready.json()["checks"]["redis"].startswith("redis: ")
        alive = await http.get("/healthz")
        assert alive.status_code == 200
        assert alive.json()["status"] == "ok"


# --- metrics -------------------------------------------------------------------------------


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_generations_clients_and_tokens(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    assert broker.metrics.snapshot()["tokens_in"] == 0
    created = await http.post("/v1/streams", json={
        "prompt": "p", "params": {"max_tokens": 100_000, "tokens_per_second": 100}})
    gid = created.json()["id"]
    seen: list[int] = []
    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(
                aconnect_sse(http, "GET", f"/v1/streams/{gid}/events"))
            for _ in range(3)
        ]
        iterators = [s.aiter_sse() for s in streams]
        for events in iterators:  # each client is connected and has had a token
            async for sse in events:
                if sse.event == "token":
                    break
        live = broker.metrics.snapshot()
        assert live["sse_clients"] == 3
        assert live["active_generations"] == 1
        assert (await http.post(f"/v1/streams/{gid}/cancel")).status_code == 202
        for events in iterators:
            tokens = 1
            async for sse in events:
                if sse.event == "token":
                    tokens += 1
                elif sse.event == "cancelled":
                    break
            seen.append(tokens)
    await broker.manager.wait(gid)
    # The last response releases its cursor (the hub goes idle) and then, with no await in
    # between, leaves the SSE client count.
    await broker.hub.idle.wait()
    tokens_in = seen[0]
    assert seen == [tokens_in] * 3
    assert tokens_in > 1
    snap = broker.metrics.snapshot()
    assert snap["active_generations"] == 0
    assert snap["tokens_in"] == tokens_in
    assert snap["tokens_out"] == 3 * tokens_in
    assert snap["fanout_ratio"] == 3.0
    assert snap["hub_reads"] >= 1
    assert snap["redis_errors"] == dict.fromkeys(snap["redis_errors"], 0)
    json.dumps(snap)  # plain data, for the console

    response = await http.get("/metrics")
    assert response.status_code == 200
    values = scrape(response.text)
    assert values[("tokentee_tokens_in_total", ())] == tokens_in
    assert values[("tokentee_tokens_out_total", ())] == 3 * tokens_in
    assert values[("tokentee_fanout_ratio", ())] == 3.0
    assert values[("tokentee_sse_clients", ())] == 0
    assert values[("tokentee_active_generations", ())] == 0
    assert values[("tokentee_hub_read_seconds_count", ())] >= 1
    # Entries the hub read live (those before the first client came by catch-up).
    assert 1 <= values[("tokentee_hub_entry_age_seconds_count", ())] <= tokens_in + 1
    assert values[("tokentee_redis_errors_total", (("op", "api"),))] == 0
    # What /metrics exposed before stays: consumer metrics and the process's own.
    assert "tokentee_consumer_up" in response.text or "tokentee_generations_total" in (
        response.text)
    assert "process_cpu_seconds_total" in response.text or "python_info" in response.text


async def test_hub_entry_age_is_measured_from_the_producers_timestamp(broker: Broker) -> None:
    gid = "gentryage0001"
    log = broker.log
    await log.create(gid, provider="p", model="m", owner="x", lease_ms=60_000, ttl_seconds=60)
    age = broker.metrics.hub_entry_age_seconds
    before = {s.name: s.value for s in age.collect()[0].samples if not s.labels}
    async with broker.subscribe(gid) as cursor:
        # Appended after the subscription, so the hub's XREAD reads them (the cursor has
        # nothing to catch up on); stamped a minute ago, as by a producer that far behind.
        stamp = time.time() - 60
        await log.append(gid, "x", 60_000, [(1, "token", {"text": "a"}, stamp, "a"),
                                            (2, "token", {"text": "b"}, stamp, "b")])
        assert [(await anext(cursor)).seq for _ in range(2)] == [1, 2]
    after = {s.name: s.value for s in age.collect()[0].samples if not s.labels}
    key = "tokentee_hub_entry_age_seconds"
    assert after[key + "_count"] - before[key + "_count"] == 2
    assert after[key + "_sum"] - before[key + "_sum"] >= 120


async def test_two_brokers_count_separately(settings: Settings, broker: Broker) -> None:
    async with Broker.open(settings) as other:
        info = await broker.start(GenerationRequest(
            messages=[{"role": "user", "content": "x"}],
            params={"text": "one two three", "tokens_per_second": 0}))
        await broker.manager.wait(info.id)
        assert broker.metrics.tokens_in == 3
        assert other.metrics.tokens_in == 0
        assert b"tokentee_tokens_in_total 3.0" in broker.metrics.render()
        assert b"tokentee_tokens_in_total 0.0" in other.metrics.render()


async def test_redis_errors_are_counted_by_op(broker: Broker, http: httpx.AsyncClient) -> None:
    """An API request whose Redis call fails is answered 503 and counted as ``api``."""
    real = broker.log.meta

    async def failing(gid: str) -> Any:
        raise RedisConnectionError("injected")

    broker.log.meta = failing  # type: ignore[method-assign]
    try:
        response = await http.get("/v1/streams/" + "a" * 22)
    finally:
        broker.log.meta = real  # type: ignore[method-assign]
    assert response.status_code == 503
    assert broker.metrics.snapshot()["redis_errors"]["api"] == 1


# --- logs --------------------------------------------------------------------------------


async def test_json_logs_carry_the_generation_id(redis_url: str) -> None:
    settings = make_settings(redis_url)
    port = free_loopback_port()
    env = {**os.environ, "REDIS_URL": redis_url, "TOKENTEE_KEY_PREFIX": settings.key_prefix}
    env.pop("TOKENTEE_LOG_FORMAT", None)
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness is awaited below
        [sys.executable, "-m", "broker", "serve", "--port", str(port), "--log-format", "json",
         "--no-consumers"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(20):
                while True:  # a process start has no event to await from outside
                    assert proc.poll() is None, "tokentee serve exited"
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get("/readyz")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)
            created = await http.post("/v1/streams", json={
                "prompt": "p", "params": {"text": "a b c", "tokens_per_second": 0}})
            gid = created.json()["id"]
            async with aconnect_sse(http, "GET", f"/v1/streams/{gid}/events") as source:
                async for sse in source.aiter_sse():
                    if sse.event == "done":
                        break
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        await delete_prefix(redis_url, settings.key_prefix)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # all JSON
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    ours = [line for line in lines if line.get("generation_id") == gid]
    assert any("ended: done" in line["message"] for line in ours), stderr
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)


class _Records(logging.Handler):
    """Root handler with the generation filter, as ``configure_logging`` installs it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addFilter(GenerationFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def about(self, gid: str) -> list[str]:
        return [r.getMessage() for r in self.records if r.generation_id == gid]  # type: ignore[attr-defined]


@pytest.fixture
def log_records() -> Iterator[_Records]:
    handler = _Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


class _LoggingConsumer(ConsumerType):
    name = "logtest"

    def __init__(self) -> None:
        self.ended = asyncio.Event()

    def end(self, gen: Generation, event: Event) -> None:
        logging.getLogger("tests.consumer").info("handled the end of %s", gen.id)
        self.ended.set()


async def test_producer_consumer_and_sse_lines_carry_the_generation_id(
    settings: Settings, log_records: _Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = _LoggingConsumer()
    async with Broker.open(settings, consumers=[consumer]) as b, \
            running_server(settings, b) as base, httpx.AsyncClient(base_url=base) as http:
        info = await b.start(GenerationRequest(
            messages=[{"role": "user", "content": "x"}],
            params={"text": "one two", "tokens_per_second": 0}))
        await b.manager.wait(info.id)
        async with asyncio.timeout(20):
            await consumer.ended.wait()

        async def broken_read(*args: object, **kwargs: object) -> Any:
            raise RedisConnectionError("injected")

        monkeypatch.setattr(b.log, "read", broken_read)
        with contextlib.suppress(httpx.HTTPError):
            async with http.stream("GET", f"/v1/streams/{info.id}/events") as response:
                async for _ in response.aiter_bytes():
                    pass
        await b.hub.idle.wait()  # the SSE response has ended and released its cursor
        assert b.metrics.snapshot()["redis_errors"]["sse"] == 1
    lines = log_records.about(info.id)
    assert any(" ended: done " in line for line in lines)  # the producer's task
    assert f"handled the end of {info.id}" in lines  # the consumer's task
    assert any(line.startswith(f"SSE stream of {info.id} aborted") for line in lines)
    # Lines about no generation carry none.
    assert all(r.generation_id is None for r in log_records.records  # type: ignore[attr-defined]
               if "consumer logtest worker" in r.getMessage())


def test_json_formatter_output() -> None:
    record = logging.LogRecord("broker.x", logging.INFO, __file__, 1, "hello %s", ("you",),
                               None)
    with generation_context("gABC"):
        GenerationFilter().filter(record)
    line = json.loads(json_formatter().format(record))
    assert line["message"] == "hello you"
    assert line["generation_id"] == "gABC"
    assert (line["level"], line["logger"]) == ("INFO", "broker.x")
    outside = logging.LogRecord("broker.x", logging.INFO, __file__, 1, "m", (), None)
    GenerationFilter().filter(outside)
    assert "generation_id" not in json.loads(json_formatter().format(outside))
