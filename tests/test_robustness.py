"""Failure paths found in review: odd text, odd entries, Redis errors, racing shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ClusterDownError, TryAgainError

from broker.connections import ClusterUnavailable
from broker.errors import ShuttingDown
from broker.events import Event, Finish, ProviderEvent, TextDelta
from broker.log import AppendResult
from broker.providers import ProviderRegistry, SimulatedProvider
from broker.providers.base import GenerationRequest
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import make_settings

REQUEST = GenerationRequest(messages=[{"role": "user", "content": "hi"}])


class ScriptedProvider(SimulatedProvider):
    """Yields fixed deltas (the simulated provider's validation is reused)."""

    name = "scripted"

    def __init__(self, deltas: list[str]) -> None:
        self.deltas = deltas

    def validate(self, request: GenerationRequest) -> None:
        return None

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        for text in self.deltas:
            yield TextDelta(text)
        yield Finish("stop")


async def run_scripted(settings: Settings, deltas: list[str]) -> tuple[list[Event], str]:
    providers = ProviderRegistry({"scripted": ScriptedProvider(deltas)})
    async with Broker.open(settings, providers=providers) as broker:
        info = await broker.start(REQUEST, "scripted")
        events = [e async for e in broker.events(info.id)]
        return events, (await broker.state(info.id)).text


async def test_surrogates_are_repaired_not_fatal(settings: Settings) -> None:
    # An emoji whose surrogate pair is split across two deltas (JSON escapes decoded per
    # chunk), and a lone surrogate that has no pair at all.
    events, text = await run_scripted(settings, ["a \ud83d", "\ude00 b", " c\udc00d"])
    assert events[-1].type == "done"
    assert text == "a \U0001f600 b c\ufffdd"
    assert "".join(e.text for e in events) == text


async def test_api_accepts_a_lone_surrogate_in_text(settings: Settings) -> None:
    async with Broker.open(settings) as broker:
        request = GenerationRequest(REQUEST.messages, params={"text": "x \ud83d y",
                                                              "tokens_per_second": 0})
        info = await broker.start(request)
        events = [e async for e in broker.events(info.id)]
    assert [e.type for e in events][-1] == "done"
    assert "".join(e.text for e in events) == "x \ufffd y"


async def test_foreign_entries_in_a_log_are_skipped(broker: Broker) -> None:
    info = await broker.start(GenerationRequest(REQUEST.messages,
                                                params={"max_tokens": 3, "tokens_per_second": 0}))
    events = [e async for e in broker.events(info.id)]
    # Somebody appends by hand with an automatic id and bytes that are not UTF-8.
    await broker.redis.xadd(broker.log.keys(info.id).log, {"type": b"\xff\xfe", "x": "y"})
    replay = [e async for e in broker.events(info.id)]
    assert replay == events


async def test_a_subscriber_cancelled_while_loading_does_not_cancel_the_others(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = await broker.start(GenerationRequest(REQUEST.messages,
                                                params={"max_tokens": 5, "tokens_per_second": 0}))
    release = asyncio.Event()
    real_meta = broker.log.meta

    async def slow_meta(gid: str):  # type: ignore[no-untyped-def]
        await release.wait()
        return await real_meta(gid)

    monkeypatch.setattr(broker.log, "meta", slow_meta)

    async def read() -> list[Event]:
        return [e async for e in broker.events(info.id)]

    first = asyncio.create_task(read())  # starts loading the stream
    second = asyncio.create_task(read())  # waits for that load
    await asyncio.sleep(0)  # both are now waiting inside the hub
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    events = await asyncio.wait_for(second, 10)
    assert [e.seq for e in events] == list(range(1, 7))
    assert first.cancelled()


async def test_start_racing_shutdown_leaves_no_producer_behind(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(redis_url, shutdown_grace_seconds=0.0)
    created = asyncio.Event()
    proceed = asyncio.Event()
    async with Broker.open(settings) as broker:
        real_create = broker.log.create

        async def slow_create(gid: str, **kw: object) -> float:
            result = await real_create(gid, **kw)  # type: ignore[arg-type]
            created.set()
            await proceed.wait()
            return result

        monkeypatch.setattr(broker.log, "create", slow_create)
        request = GenerationRequest(REQUEST.messages,
                                    params={"max_tokens": 10_000, "tokens_per_second": 50})
        starting = asyncio.create_task(broker.start(request))
        await created.wait()
        closing = asyncio.create_task(broker.manager.aclose())
        await asyncio.sleep(0)  # aclose has begun: it drains first
        assert broker.draining
        proceed.set()
        with pytest.raises(ShuttingDown):
            await starting
        await closing
        assert broker.manager.active == []
        catalog = await broker.redis.xrange(broker.log.keyspace.catalog)
        gid = catalog[-1][1][b"id"].decode()
        state = await broker.state(gid)
        assert state.meta.status == "error"
        assert state.meta.extra["error_code"] == "shutdown"


@pytest.mark.skipif(bool(os.environ.get("TOKENTEE_TEST_REDIS_URL")),
                    reason="changes server configuration: private test server only")
async def test_reaper_survives_a_redis_error_that_is_not_a_disconnect(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # No watchdog: the hub's reaper must be the one that ends the generation.
    settings = make_settings(redis_url, lease_seconds=0.3, watchdog=False)
    failed = asyncio.Event()

    class Flag(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "reaper check failed" in record.getMessage():
                failed.set()

    handler = Flag()
    logging.getLogger("broker.hub").addHandler(handler)
    async with Broker.open(settings) as broker:
        await broker.log.create("gooming0001", provider="p", model="m", owner="dead",
                                lease_ms=100, ttl_seconds=60)
        reader = asyncio.create_task(
            asyncio.wait_for(_collect(broker, "gooming0001"), 30)
        )
        await broker.redis.config_set("maxmemory", "1")  # every write now fails with OOM
        try:
            await asyncio.wait_for(failed.wait(), 10)
        finally:
            await broker.redis.config_set("maxmemory", "0")
        events = await reader
    logging.getLogger("broker.hub").removeHandler(handler)
    assert [e.type for e in events] == ["error"]
    assert events[0].data["code"] == "producer_lost"


async def _collect(broker: Broker, gid: str) -> list[Event]:
    return [e async for e in broker.events(gid)]


async def test_a_subscriber_cancelled_while_waking_the_hub_leaves_nothing_behind(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = await broker.start(GenerationRequest(
        REQUEST.messages, params={"max_tokens": 100_000, "tokens_per_second": 10}))
    waking = asyncio.Event()

    async def stuck_wake(_stream: object) -> None:
        waking.set()
        await asyncio.Event().wait()  # a wake that never completes

    monkeypatch.setattr(broker.hub, "_wake_reader", stuck_wake)

    async def read() -> None:
        async for _event in broker.events(info.id):
            pass

    reader = asyncio.create_task(read())
    await waking.wait()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert broker.hub.stream_count == 0
    assert broker.hub.cursor_count == 0
    assert broker.hub.idle.is_set()
    await broker.cancel(info.id)


async def test_log_writes_are_retried_through_a_cluster_failover(
    broker: Broker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``CLUSTERDOWN`` (until a replica is promoted), ``TRYAGAIN`` and no reachable node
    while redis-py reloads its slot map are passing states of a failover, like a lost
    connection: the producer retries its writes instead of ending with ``storage_error``."""
    failures: list[Exception] = [
        ClusterDownError("The cluster is down"), TryAgainError("TRYAGAIN"),
        ClusterUnavailable("Redis Cluster cannot be connected"),
    ]
    append, finish = broker.log.append, broker.log.finish

    async def flaky_append(*args: Any, **kwargs: Any) -> AppendResult:
        if failures:
            raise failures.pop(0)
        return await append(*args, **kwargs)

    finish_failures = [ClusterDownError("The cluster is down")]

    async def flaky_finish(*args: Any, **kwargs: Any) -> tuple[int, str]:
        if finish_failures:
            raise finish_failures.pop()
        return await finish(*args, **kwargs)

    monkeypatch.setattr(broker.log, "append", flaky_append)
    monkeypatch.setattr(broker.log, "finish", flaky_finish)
    info = await broker.start(GenerationRequest(
        [{"role": "user", "content": "x"}], params={"max_tokens": 5, "tokens_per_second": 0}))
    events = await _collect(broker, info.id)
    assert [e.type for e in events] == ["token"] * 5 + ["done"]
    assert failures == []
    assert finish_failures == []
