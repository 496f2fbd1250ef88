"""Limits with clear errors: body size, prompt size, active generations, open event streams
per client (across replicas), and malformed resume points, over real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from redis.crc import key_slot

from broker.api import create_app
from broker.channels import ChannelPosition
from broker.connections import command_client
from broker.errors import InvalidResumePoint, TooManyStreams
from broker.keys import Keyspace, new_generation_id
from broker.limits import ConnectionSlots, prompt_chars
from broker.service import Broker
from broker.settings import Settings
from broker.sse import parse_resume_id
from tests.conftest import delete_prefix, make_settings, running_server
from tests.redis_cluster import LocalCluster, redis_cluster

__all__ = ["redis_cluster"]  # the fixture, imported for pytest

SLOW = {"max_tokens": 1_000, "tokens_per_second": 2}


@contextlib.asynccontextmanager
async def server(redis_url: str, replicas: int = 1, **overrides: Any
                 ) -> AsyncIterator[tuple[Settings, list[str]]]:
    """``replicas`` brokers with their servers on one Redis and one key prefix."""
    settings = make_settings(redis_url, **overrides)
    try:
        async with contextlib.AsyncExitStack() as stack:
            urls = []
            for _ in range(replicas):
                broker = await stack.enter_async_context(Broker.open(settings))
                urls.append(await stack.enter_async_context(running_server(settings, broker)))
            yield settings, urls
    finally:
        await delete_prefix(redis_url, settings.key_prefix)


async def start(http: httpx.AsyncClient, **params: Any) -> str:
    response = await http.post("/v1/streams", json={"prompt": "p", "params": params})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@contextlib.asynccontextmanager
async def open_stream(http: httpx.AsyncClient, gid: str, **headers: str
                      ) -> AsyncIterator[httpx.Response]:
    """An event stream whose response has begun (so its slot is taken) until the block
    exits."""
    async with http.stream("GET", f"/v1/streams/{gid}/events", headers=headers) as response:
        yield response


async def until_accepted(http: httpx.AsyncClient, gid: str, **headers: str) -> None:
    """A released slot is freed when the server sees the client leave: retry, bounded."""
    async with asyncio.timeout(10):
        while True:
            async with open_stream(http, gid, **headers) as response:
                if response.status_code == 200:
                    return
                assert response.status_code == 429
            await asyncio.sleep(0.05)


# --- request body and prompt size --------------------------------------------------------------


async def test_body_over_the_limit_is_413_json(redis_url: str) -> None:
    async with server(redis_url, max_body_bytes=2_048) as (_, [url]), \
            httpx.AsyncClient(base_url=url) as http:
        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 300
            yield b'"}'

        for content in (chunked(), b'{"prompt": "' + b"x" * 3_000 + b'"}'):
            response = await http.post("/v1/streams", content=content,
                                       headers={"content-type": "application/json"})
            assert response.status_code == 413
            assert response.json() == {"detail": "request body too large"}
        # Just under the limit is fine.
        response = await http.post("/v1/streams", json={"prompt": "x" * 1_900,
                                                        "params": {"max_tokens": 1}})
        assert response.status_code == 201


async def test_prompt_over_the_limit_is_413_with_the_reason(redis_url: str) -> None:
    async with server(redis_url, max_prompt_chars=100) as (_, [url]), \
            httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/streams", json={"prompt": "x" * 101})
        assert response.status_code == 413
        assert "101 characters" in response.json()["detail"]
        assert "TOKENTEE_MAX_PROMPT_CHARS" in response.json()["detail"]
        messages = [{"role": "system", "content": "s" * 60}, {"role": "user", "content": "u" * 41}]
        response = await http.post("/v1/streams", json={"messages": messages})
        assert response.status_code == 413
        response = await http.post("/v1/chat/completions",
                                   json={"model": "m", "messages": messages})
        assert response.status_code == 413
        assert response.json()["error"]["param"] == "messages"
        assert "at most 100" in response.json()["error"]["message"]
        response = await http.post("/v1/streams", json={"prompt": "x" * 100,
                                                        "params": {"max_tokens": 1}})
        assert response.status_code == 201


def test_prompt_chars_counts_structured_content() -> None:
    assert prompt_chars([{"role": "user", "content": "héllo"}]) == 5
    assert prompt_chars([{"role": "user", "content": None}]) == 0
    parts = [{"type": "text", "text": "abc"}]
    assert prompt_chars([{"role": "user", "content": parts}]) == len(
        '[{"type":"text","text":"abc"}]')
    calls = {"role": "assistant", "tool_calls": [{"id": "1"}]}
    assert prompt_chars([calls]) == len('[{"id":"1"}]')


# --- active generations --------------------------------------------------------------------------


async def test_active_generations_over_the_limit_get_503(redis_url: str) -> None:
    async with server(redis_url, max_active_generations=2) as (_, [url]), \
            httpx.AsyncClient(base_url=url) as http:
        first = await start(http, **SLOW)
        await start(http, **SLOW)
        for key in (None, "retry-me"):
            headers = {"Idempotency-Key": key} if key else {}
            response = await http.post("/v1/streams", json={"prompt": "p", "params": SLOW},
                                       headers=headers)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert "limit of 2 generations" in response.json()["detail"]
        response = await http.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
        assert response.status_code == 503
        # A slot frees when a generation ends; the refused key was released, not kept.
        assert (await http.post(f"/v1/streams/{first}/cancel")).status_code == 202
        async with asyncio.timeout(10):  # the producer task ends just after its last entry
            while True:
                status = await http.post("/v1/streams", json={"prompt": "p", "params": SLOW},
                                         headers={"Idempotency-Key": "retry-me"})
                if status.status_code != 503:
                    break
                await asyncio.sleep(0.05)
        assert status.status_code == 201, status.text


# --- open event streams per client ------------------------------------------------------------


async def test_streams_per_bearer_token_across_replicas(redis_url: str) -> None:
    tokens = "tok-one-xxxxxxxxxxxx,tok-two-xxxxxxxxxxxx"
    async with server(redis_url, replicas=2, api_tokens=tokens, max_sse_per_client=2) as (
            _, [url_a, url_b]):
        one = {"Authorization": "Bearer tok-one-xxxxxxxxxxxx"}
        two = {"Authorization": "Bearer tok-two-xxxxxxxxxxxx"}
        async with httpx.AsyncClient(base_url=url_a, timeout=20, headers=one) as a, \
                httpx.AsyncClient(base_url=url_b, timeout=20, headers=one) as b, \
                httpx.AsyncClient(base_url=url_b, timeout=20, headers=two) as other:
            gid = await start(a, **SLOW)
            async with open_stream(a, gid) as first, open_stream(b, gid) as second:
                assert first.status_code == second.status_code == 200
                for client in (a, b):  # the third, on either replica
                    refused = await client.get(f"/v1/streams/{gid}/events")
                    assert refused.status_code == 429
                    assert refused.headers["retry-after"]
                    assert "too many open event streams" in refused.json()["detail"]
                refused = await b.get("/v1/channels/c/events")
                assert refused.status_code == 429
                async with open_stream(other, gid) as theirs:  # another token: its own count
                    assert theirs.status_code == 200
            await until_accepted(a, gid)


async def test_streams_per_address_behind_a_trusted_proxy(redis_url: str) -> None:
    async with server(redis_url, max_sse_per_client=1, trusted_proxies="127.0.0.1") as (
            _, [url]), httpx.AsyncClient(base_url=url, timeout=20) as http:
        gid = await start(http, **SLOW)
        alice = {"X-Forwarded-For": "203.0.113.5"}
        async with open_stream(http, gid, **alice) as first:
            assert first.status_code == 200
            assert (await http.get(f"/v1/streams/{gid}/events", headers=alice)).status_code \
                == 429
            # A client cannot make itself someone else by prepending an address.
            spoof = {"X-Forwarded-For": "198.51.100.1, 203.0.113.5"}
            assert (await http.get(f"/v1/streams/{gid}/events", headers=spoof)).status_code \
                == 429
            async with open_stream(http, gid, **{"X-Forwarded-For": "203.0.113.6"}) as bob:
                assert bob.status_code == 200


async def test_forwarded_for_is_ignored_from_untrusted_peers(redis_url: str) -> None:
    async with server(redis_url, max_sse_per_client=1) as (_, [url]), \
            httpx.AsyncClient(base_url=url, timeout=20) as http:
        gid = await start(http, **SLOW)
        async with open_stream(http, gid, **{"X-Forwarded-For": "203.0.113.5"}) as first:
            assert first.status_code == 200
            response = await http.get(f"/v1/streams/{gid}/events",
                                      headers={"X-Forwarded-For": "203.0.113.6"})
            assert response.status_code == 429


async def test_slots_of_a_crashed_replica_age_out(settings: Settings) -> None:
    client = aioredis.from_url(settings.redis_url or "")
    keyspace = Keyspace(settings.key_prefix)
    crashed = ConnectionSlots(client, keyspace, 2, ttl_ms=300)
    alive = ConnectionSlots(client, keyspace, 2, ttl_ms=300)
    # Two slots taken and never released nor refreshed: the replica died holding them.
    holds = [crashed.hold("t:x"), crashed.hold("t:x")]
    try:
        for hold in holds:
            await hold.__aenter__()
        with pytest.raises(TooManyStreams):
            async with alive.hold("t:x"):
                pass
        key = keyspace.sse_slots("t:x")
        assert await client.zcard(key) == 2
        # A refresh pushes the expiry forward by one TTL (on Redis's clock).
        before = max(score for _, score in await client.zrange(key, 0, -1, withscores=True))
        seconds, micros = await client.time()
        await crashed.refresh()
        after = max(score for _, score in await client.zrange(key, 0, -1, withscores=True))
        assert after >= seconds * 1000 + micros // 1000 + 300 > before - 1
        # Without refreshes, they age out within one TTL and another replica takes a slot.
        async with asyncio.timeout(5):
            while True:
                with contextlib.suppress(TooManyStreams):
                    async with alive.hold("t:x"):
                        assert await client.zcard(key) == 1
                        break
                await asyncio.sleep(0.05)
        assert await client.zcard(key) == 0
        # The refresher adds nothing back for slots that are gone.
        await crashed.refresh()
        assert await client.zcard(key) == 0
    finally:
        for hold in holds:  # not left for the garbage collector to finish
            await hold.__aexit__(None, None, None)
        await client.aclose()


async def test_slots_on_a_cluster(redis_cluster: LocalCluster) -> None:
    """Each client's set is one key, so the scripts work on any master of a cluster."""
    settings = make_settings(redis_cluster.url)
    client = command_client(redis_cluster.url, settings)
    slots = ConnectionSlots(client, Keyspace(settings.key_prefix), 1)
    clients = [f"a:10.0.0.{i}" for i in range(12)]  # their keys spread over the masters
    masters = {redis_cluster.master_of_slot(key_slot(slots.keyspace.sse_slots(c).encode()))
               for c in clients}
    try:
        assert len(masters) > 1
        async with contextlib.AsyncExitStack() as held:
            for name in clients:
                await held.enter_async_context(slots.hold(name))
            assert slots.held() == len(clients)
            await slots.refresh()
            for name in clients:
                with pytest.raises(TooManyStreams):
                    async with slots.hold(name):
                        pass
        assert slots.held() == 0
        for name in clients:
            assert await client.zcard(slots.keyspace.sse_slots(name)) == 0
    finally:
        await client.aclose()


# --- malformed resume points ---------------------------------------------------------------------

BAD_IDS = ["abc", "-1", "1-2", "0x10", "1e3", "1 ", " 1", "1" * 19, "²", "١٢", "a" * 100,
           "1;2", "$", "+", "0-1"]


async def test_malformed_resume_points_are_400_everywhere(http: httpx.AsyncClient) -> None:
    gid = await start(http, max_tokens=2, tokens_per_second=500)
    for bad in BAD_IDS:
        for fmt in ("native", "openai", "ai-sdk"):
            path = f"/v1/streams/{gid}/events"
            by_query = await http.get(path, params={"after": bad, "format": fmt})
            assert by_query.status_code == 400, (bad, fmt, by_query.text)
            assert "detail" in by_query.json()
            if bad.isascii() and bad == bad.strip():  # h11 sends no padded header values
                by_header = await http.get(path, params={"format": fmt},
                                           headers={"Last-Event-ID": bad})
                assert by_header.status_code == 400, (bad, fmt)
    channel_bad = [*(b for b in BAD_IDS if b not in ("1-2", "0-1")),  # those two are valid
                   "0-0~x.1", "1", "0-0~", "0-0~" + "~".join(f"{new_generation_id()}.1"
                                                          for _ in range(65)),
                   "99999999999999999999-0", "0-0~" + new_generation_id() + ".²",
                   "0-0~" + new_generation_id() + ".1" + "0" * 18, "x" * 5_000]
    for bad in channel_bad:
        response = await http.get("/v1/channels/c1/events", params={"after": bad})
        assert response.status_code == 400, (bad[:40], response.text)
        if bad.isascii() and bad == bad.strip():
            response = await http.get("/v1/channels/c1/events", headers={"Last-Event-ID": bad})
            assert response.status_code == 400, bad[:40]
    for bad in ("abc", "-1", "1.5"):
        response = await http.get(f"/v1/streams/{gid}/sentences", params={"after": bad})
        assert response.status_code == 400, bad


async def test_every_event_stream_route_refuses_a_malformed_resume_point(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    """Event-stream routes added later are covered too: every route that ends in /events."""
    gid = await start(http, max_tokens=2, tokens_per_second=500)
    paths = [r.path for r in create_app(settings).routes
             if isinstance(r, APIRoute) and r.path.endswith("/events")]
    assert len(paths) >= 2
    for path in paths:
        url = path.replace("{gid}", gid).replace("{name}", "c1")
        for bad in ("abc", "1-", "x" * 70):
            assert (await http.get(url, params={"after": bad})).status_code == 400, (path, bad)
            response = await http.get(url, headers={"Last-Event-ID": bad})
            assert response.status_code == 400, (path, bad)


@given(st.text(max_size=40))
@hsettings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_resume_id_parser_takes_ascii_decimal_ids_only(text: str) -> None:
    try:
        value = parse_resume_id(text)
    except ValueError:
        assert text
        assert not (text.isascii() and text.isdigit() and len(text) <= 18)
        return
    if text == "":
        assert value is None
    else:
        assert text.isascii()
        assert text.isdigit()
        assert value == int(text)
        assert 0 <= value < 10**18


@given(st.one_of(
    st.text(max_size=120),
    st.lists(st.text(alphabet="0123456789-~.gxAZ_²", max_size=30), max_size=5).map("~".join),
))
@hsettings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_channel_position_parser_refuses_or_round_trips(text: str) -> None:
    try:
        position = ChannelPosition.parse(text)
    except InvalidResumePoint:
        return
    # Whatever it accepts is a position it could have made, and safe to give Redis.
    again = ChannelPosition.parse(position.encode())
    assert again == position
    ms, seq = position.announced.split("-")
    assert ms.isascii()
    assert seq.isascii()
    assert int(ms) < 2**64
    assert int(seq) < 2**64
    assert all(0 <= s < 10**18 for s in position.live.values())


@given(st.lists(st.tuples(st.sampled_from([new_generation_id() for _ in range(5)]),
                          st.integers(0, 10**18 - 1)), max_size=10),
       st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_channel_positions_round_trip(live: list[tuple[str, int]], ms: int, seq: int) -> None:
    position = ChannelPosition(f"{ms}-{seq}", dict(live))
    assert ChannelPosition.parse(position.encode()) == position
