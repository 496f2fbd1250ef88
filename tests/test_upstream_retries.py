"""Retries of an upstream call that fails before its first token, and only then."""

from __future__ import annotations

import time
from typing import Any

import pytest

from broker.events import Finish, TextDelta, UpstreamFailure
from broker.providers.retry import retry_after
from tests.test_openai_provider import (
    FULL,
    ROLE,
    Conn,
    collect,
    content,
    provider_for,
    send_body,
    sse,
)

OK = send_body(sse(*FULL))


def scripted(*steps: Any) -> Any:
    """A script per connection: each step is (status, headers) for an error reply, or a
    normal script."""
    calls = {"n": 0}

    async def script(conn: Conn) -> None:
        step = steps[min(calls["n"], len(steps) - 1)]
        calls["n"] += 1
        if isinstance(step, tuple):
            status, extra = step
            await conn.head(status=status, content_type="application/json", chunked=False,
                            extra=extra + 'Content-Length: 2\r\n')
            await conn.raw(b"{}")
            return
        await step(conn)

    return script


async def test_429_with_retry_after_ms_then_success() -> None:
    async with provider_for(scripted((429, "retry-after-ms: 50\r\n"), OK),
                            upstream_retries=2) as (provider, upstream):
        events = await collect(provider)
    assert [e for e in events if isinstance(e, TextDelta)] == [TextDelta("Hel"),
                                                               TextDelta("lo")]
    assert isinstance(events[-1], Finish)
    assert len(upstream.received) == 2


async def test_5xx_is_retried_up_to_the_limit_then_reported() -> None:
    async with provider_for(scripted((503, "")), upstream_retries=2,
                            upstream_retry_base_seconds=0.01) as (provider, upstream):
        events = await collect(provider)
    assert [e.code for e in events if isinstance(e, UpstreamFailure)] == ["upstream_http_503"]
    assert len(upstream.received) == 3


async def test_client_errors_are_not_retried() -> None:
    async with provider_for(scripted((400, "")), upstream_retries=2) as (provider, upstream):
        events = await collect(provider)
    assert [e.code for e in events if isinstance(e, UpstreamFailure)] == ["upstream_http_400"]
    assert len(upstream.received) == 1


async def test_a_retry_after_longer_than_the_cap_is_not_waited_for() -> None:
    async with provider_for(scripted((429, "Retry-After: 3600\r\n")), upstream_retries=2,
                            upstream_retry_max_wait_seconds=5) as (provider, upstream):
        started = time.monotonic()
        events = await collect(provider)
    assert [e.code for e in events if isinstance(e, UpstreamFailure)] == ["upstream_http_429"]
    assert len(upstream.received) == 1
    assert time.monotonic() - started < 5  # it gave up at once instead of waiting an hour


async def test_failure_after_the_first_token_is_not_retried() -> None:
    async def breaks_mid_body(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(sse(ROLE, content("partial")))
        await conn.chunk(b'data: {"error": {"message": "overloaded", "code": "server_error"}}'
                         b"\n\n")
        await conn.end()

    async with provider_for(breaks_mid_body, upstream_retries=2) as (provider, upstream):
        events = await collect(provider)
    assert events[0] == TextDelta("partial")
    assert isinstance(events[-1], UpstreamFailure)
    assert len(upstream.received) == 1


async def test_connection_refused_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    from broker.embedded import free_loopback_port
    from broker.providers.openai import OpenAIProvider
    from tests.test_openai_provider import settings

    port = free_loopback_port()
    provider = OpenAIProvider(settings(f"http://127.0.0.1:{port}/v1", upstream_retries=2,
                                       upstream_retry_base_seconds=0.01))
    try:
        events = await collect(provider)
    finally:
        await provider.aclose()
    assert [e.code for e in events if isinstance(e, UpstreamFailure)] == [
        "upstream_unreachable"]
    assert "upstream_unreachable before the first token; retry 2 of 2" in caplog.text


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after": "7"}, 7.0),
    ({"retry-after": "soon"}, None),
    ({}, None),
])
def test_retry_after_parsing(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(headers) == expected


def test_retry_after_http_date() -> None:
    import email.utils

    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    value = retry_after({"retry-after": when})
    assert value is not None
    assert 25 <= value <= 31


async def test_a_one_byte_drip_cannot_hold_a_generation_forever(redis_url: str) -> None:
    """Each byte resets the read timeout, so only the total deadline ends it."""
    import asyncio

    from broker.providers.base import GenerationRequest
    from broker.service import Broker
    from tests.conftest import make_settings
    from tests.test_openai_provider import FakeUpstream

    async def drip(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(sse(ROLE, content("a")))
        while True:  # a comment line, one byte at a time, forever
            await conn.chunk(b":")
            await asyncio.sleep(0.1)

    async with FakeUpstream(drip) as upstream:
        settings = make_settings(redis_url, openai_base_url=upstream.base_url,
                                 upstream_read_timeout=1.0, max_generation_seconds=1.5,
                                 upstream_retries=0)
        async with Broker.open(settings) as broker:
            info = await broker.start(GenerationRequest([{"role": "user", "content": "x"}]),
                                      "openai")
            events = [e async for e in broker.events(info.id)]
    assert [e.type for e in events] == ["token", "error"]
    assert events[-1].data["code"] == "deadline_exceeded"
