"""Channels: one iterator follows every generation of a conversation, and resumes."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from broker.channels import ChannelPosition
from broker.errors import InvalidResumePoint
from broker.events import Event
from broker.providers.base import GenerationRequest
from broker.service import Broker


def request(text: str, rate: float = 200) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": "x"}],
                             params={"text": text, "tokens_per_second": rate})


async def test_parallel_generations_of_a_channel_in_one_iterator(broker: Broker) -> None:
    texts = {"a": "alpha beta gamma delta", "b": "one two three", "c": "x y"}
    follower = broker.channel("run-1")
    first = asyncio.ensure_future(anext(follower))  # following before anything starts
    await asyncio.sleep(0)
    ids = {name: (await broker.start(request(t), channel="run-1")).id
           for name, t in texts.items()}
    await broker.start(request("elsewhere"), channel="run-2")  # another channel
    got: dict[str, list[str]] = defaultdict(list)
    ended: set[str] = set()
    item = await first
    while True:
        if item.event.type == "token":
            got[item.generation].append(item.event.text)
        if item.event.terminal:
            ended.add(item.generation)
        if ended == set(ids.values()):
            break
        item = await anext(follower)
    await follower.aclose()
    assert {gid: "".join(parts) for gid, parts in got.items()} == {
        ids[name]: text for name, text in texts.items()}


async def test_resume_from_a_position_loses_and_repeats_nothing(broker: Broker) -> None:
    ids = [(await broker.start(request(t, rate=100), channel="conv"))
           .id for t in ("a b c d e f", "g h i j k")]
    seen: list[tuple[str, int]] = []
    position = None
    follower = broker.channel("conv")
    async for item in follower:
        seen.append((item.generation, item.event.seq))
        if len(seen) == 4:
            position = item.position
            break
    await follower.aclose()
    assert position is not None
    ChannelPosition.parse(position)  # round-trips
    third = (await broker.start(request("l m", rate=100), channel="conv")).id
    ended: set[str] = set()
    async for item in broker.channel("conv", after=position):
        seen.append((item.generation, item.event.seq))
        if item.event.terminal:
            ended.add(item.generation)
        if ended == {*ids, third}:
            break
    for gid, last in ((ids[0], 7), (ids[1], 6), (third, 3)):
        assert sorted(seq for g, seq in seen if g == gid) == list(range(1, last + 1))


@pytest.mark.parametrize("bad", ["", "nonsense", "1-0~g!!.3", "1-0~gAAAAAAAAAAAA.x"])
def test_malformed_positions_are_refused(bad: str) -> None:
    with pytest.raises(InvalidResumePoint):
        ChannelPosition.parse(bad)


async def test_bad_channel_names_are_refused(broker: Broker) -> None:
    with pytest.raises(ValueError, match="channel name"):
        await broker.start(request("x"), channel="no spaces")


async def test_one_sse_connection_follows_a_channel_and_resumes(redis_url: str) -> None:
    import json

    import httpx
    from httpx_sse import aconnect_sse

    from tests.conftest import make_settings, running_server

    # A short heartbeat: the response's heartbeat timeouts must not lose channel events.
    settings = make_settings(redis_url, heartbeat_seconds=0.01)
    async with Broker.open(settings) as broker, running_server(settings, broker) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as http:
        body = {"prompt": "p", "channel": "conv-7",
                "params": {"text": "a b c d e f g h", "tokens_per_second": 40}}
        gids = [(await http.post("/v1/streams", json=body)).json()["id"] for _ in range(2)]
        seen: list[tuple[str, int, str]] = []
        last_id = None
        async with aconnect_sse(http, "GET", "/v1/channels/conv-7/events") as source:
            async for message in source.aiter_sse():
                if message.data:
                    data = json.loads(message.data)
                    seen.append((data["generation"], 0, message.event))
                    last_id = message.id
                    if len(seen) == 5:
                        break
        ended: set[str] = set()
        async with aconnect_sse(http, "GET", "/v1/channels/conv-7/events",
                                headers={"Last-Event-ID": last_id or ""}) as source:
            async for message in source.aiter_sse():
                if message.data:
                    data = json.loads(message.data)
                    seen.append((data["generation"], 0, message.event))
                    if message.event == "done":
                        ended.add(data["generation"])
                    if ended == set(gids):
                        break
        for gid in gids:
            kinds = [kind for g, _, kind in seen if g == gid]
            assert kinds == ["token"] * 8 + ["done"]  # nothing lost or repeated
        assert (await http.get("/v1/channels/conv-7/events",
                               headers={"Last-Event-ID": "garbage"})).status_code == 400
        assert (await http.get("/v1/channels/bad%20name/events")).status_code == 404


async def test_a_failed_log_read_does_not_drop_a_generation(
    broker: Broker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    a = (await broker.start(request("a1 a2 a3 a4", rate=50), channel="c1")).id
    real = broker.log.read
    failed: list[int] = []

    async def flaky(gid: str, after: int, count: int) -> list[Event]:
        if gid == a and not failed:
            failed.append(1)
            raise RedisConnectionError("blip")
        return await real(gid, after, count)

    monkeypatch.setattr(broker.log, "read", flaky)
    b = (await broker.start(request("b1 b2", rate=50), channel="c1")).id
    seen: dict[str, list[str]] = {a: [], b: []}
    async for item in broker.channel("c1"):
        seen[item.generation].append(item.event.type)
        if all(kinds and kinds[-1] == "done" for kinds in seen.values()):
            break
    assert failed == [1]
    assert seen == {a: ["token"] * 4 + ["done"], b: ["token"] * 2 + ["done"]}


async def test_positions_never_name_more_generations_than_they_may(
    broker: Broker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import broker.channels as channels

    monkeypatch.setattr(channels, "_MAX_LIVE", 2)
    gids = [(await broker.start(request("p q r", rate=50), channel="big")).id
            for _ in range(5)]
    done: set[str] = set()
    async for item in broker.channel("big"):
        assert len(ChannelPosition.parse(item.position).live) <= 2
        if item.event.terminal:
            done.add(item.generation)
        if done == set(gids):
            break
