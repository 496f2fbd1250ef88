"""The openai provider end to end: loopback upstream -> broker -> SSE clients."""

from __future__ import annotations

import asyncio
import json

import httpx
from httpx_sse import aconnect_sse

from broker.service import Broker
from tests.conftest import make_settings, running_server
from tests.test_openai_provider import (
    FULL,
    ROLE,
    Conn,
    FakeUpstream,
    content,
    send_body,
    sse,
)


async def run(script: object, redis_url: str, *, cancel_after: int | None = None) -> tuple[
    list[tuple[str, str, dict[str, object]]], FakeUpstream
]:
    async with FakeUpstream(script) as upstream:  # type: ignore[arg-type]
        settings = make_settings(redis_url, openai_base_url=upstream.base_url,
                                 openai_api_key="sk-test-0000")
        async with (
            Broker.open(settings) as broker,
            running_server(settings, broker) as url,
            httpx.AsyncClient(base_url=url, timeout=20) as http,
        ):
            created = await http.post(
                "/v1/streams",
                json={"prompt": "hi", "provider": "openai", "model": "gpt-x",
                      "params": {"temperature": 0.2}},
            )
            assert created.status_code == 201, created.text
            gid = created.json()["id"]
            events: list[tuple[str, str, dict[str, object]]] = []
            async with aconnect_sse(http, "GET", f"/v1/streams/{gid}/events") as source:
                async for event in source.aiter_sse():
                    if not event.data:
                        continue
                    events.append((event.id, event.event, json.loads(event.data)))
                    if cancel_after is not None and len(events) == cancel_after:
                        assert (await http.post(f"/v1/streams/{gid}/cancel")).status_code == 202
            status = (await http.get(f"/v1/streams/{gid}")).json()
            assert status["model"] == "gpt-x"
            assert status["status"] == events[-1][1]
        return events, upstream


async def test_a_real_chunk_stream_is_relayed(redis_url: str) -> None:
    events, upstream = await run(send_body(sse(*FULL)), redis_url)
    assert events == [
        ("1", "token", {"text": "Hel"}),
        ("2", "token", {"text": "lo"}),
        ("3", "done", {"finish_reason": "stop", "usage": {
            "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}),
    ]
    sent = upstream.received[0].json()
    assert sent["model"] == "gpt-x"
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["temperature"] == 0.2
    assert sent["messages"] == [{"role": "user", "content": "hi"}]


async def test_malformed_upstream_ends_with_error(redis_url: str) -> None:
    events, _ = await run(send_body(sse(ROLE, content("ok"), "{not json")), redis_url)
    assert [e[1] for e in events] == ["token", "error"]
    assert events[-1][2]["code"] == "upstream_protocol"


async def test_cancel_closes_the_upstream_request(redis_url: str) -> None:
    async def endless(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(sse(ROLE, content("one"), content(" two")))
        await conn.wait_peer_close()  # the broker must hang up on us

    events, upstream = await run(endless, redis_url, cancel_after=2)
    assert [e[1] for e in events] == ["token", "token", "cancelled"]
    await asyncio.wait_for(upstream.conns[0].peer_closed.wait(), 5)
