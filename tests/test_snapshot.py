"""Late joiners: the text so far as one snapshot event, then the live tail."""

from __future__ import annotations

import json

import httpx
from httpx_sse import aconnect_sse

from broker.providers.base import GenerationRequest
from broker.service import Broker

TEXT = " ".join(f"w{i}" for i in range(40))


async def read(http: httpx.AsyncClient, gid: str, **params: str) -> list[tuple[str, str, str]]:
    out = []
    async with aconnect_sse(http, "GET", f"/v1/streams/{gid}/events",
                            params={"snapshot": "true", **params}) as source:
        async for message in source.aiter_sse():
            if message.data:
                out.append((message.id, message.event, message.data))
    return out


async def test_snapshot_then_live_tail(http: httpx.AsyncClient, broker: Broker) -> None:
    info = await broker.start(GenerationRequest([{"role": "user", "content": "x"}],
                                                params={"text": TEXT, "tokens_per_second": 80}))
    async with broker.subscribe(info.id) as cursor:  # wait until some text exists
        while (await anext(cursor)).seq < 10:
            pass
    events = await read(http, info.id)
    first_id, kind, data = events[0]
    assert kind == "snapshot"
    snap = json.loads(data)["text"]
    assert int(first_id) >= 10
    rest = [json.loads(d)["text"] for _, k, d in events[1:] if k == "token"]
    assert snap + "".join(rest) == TEXT  # nothing lost, nothing twice
    assert [int(i) for i, _, _ in events[1:]] == list(range(int(first_id) + 1,
                                                            int(first_id) + len(events)))
    assert events[-1][1] == "done"


async def test_snapshot_of_a_finished_generation_and_in_openai_format(
    http: httpx.AsyncClient, broker: Broker,
) -> None:
    info = await broker.start(GenerationRequest([{"role": "user", "content": "x"}],
                                                params={"text": "a b c", "tokens_per_second": 0}))
    await broker.manager.wait(info.id)
    events = await read(http, info.id)
    assert [(i, k) for i, k, _ in events] == [("3", "snapshot"), ("4", "done")]
    assert json.loads(events[0][2]) == {"text": "a b c"}
    chunks = await read(http, info.id, format="openai")
    first = json.loads(chunks[0][2])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a b c"}
    assert chunks[-1][2] == "[DONE]"
    sdk = await read(http, info.id, format="ai-sdk")
    assert [json.loads(d)["type"] for _, _, d in sdk[:3]] == ["start", "text-start",
                                                              "text-delta"]


async def test_python_snapshot(broker: Broker) -> None:
    info = await broker.start(GenerationRequest([{"role": "user", "content": "x"}],
                                                params={"text": "x y", "tokens_per_second": 0}))
    await broker.manager.wait(info.id)
    snap = await broker.snapshot(info.id)
    assert (snap.type, snap.seq, snap.data) == ("snapshot", 2, {"text": "x y"})
    rest = [e.type async for e in broker.events(info.id, after=snap.seq)]
    assert rest == ["done"]
