"""Single flight: ``Idempotency-Key`` returns the same generation instead of a second call."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.providers.base import GenerationRequest
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import running_server

BODY = {"prompt": "hi", "params": {"max_tokens": 5, "tokens_per_second": 50}}


async def catalog_size(broker: Broker) -> int:
    return int(await broker.redis.xlen(broker.log.keyspace.catalog))


async def test_same_key_same_generation_one_upstream_call(
    http: httpx.AsyncClient, broker: Broker,
) -> None:
    first = await http.post("/v1/streams", json=BODY, headers={"Idempotency-Key": "k-1"})
    again = await http.post("/v1/streams", json=BODY, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert await catalog_size(broker) == 1  # one generation, one upstream call
    other = await http.post("/v1/streams", json=BODY, headers={"Idempotency-Key": "k-2"})
    assert other.status_code == 201
    assert other.json()["id"] != first.json()["id"]
    plain = await http.post("/v1/streams", json=BODY)
    assert plain.status_code == 201
    assert await catalog_size(broker) == 3


async def test_concurrent_requests_with_one_key_start_one_generation(
    settings: Settings, broker: Broker,
) -> None:
    async with running_server(settings, broker) as url, Broker.open(settings) as other, \
            running_server(settings, other) as url2, httpx.AsyncClient() as http:
        responses = await asyncio.gather(*(
            http.post(f"{base}/v1/streams", json=BODY, headers={"Idempotency-Key": "same"})
            for base in [url, url2] * 5
        ))
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
        assert await catalog_size(broker) == 1


async def test_same_key_different_request_is_refused(http: httpx.AsyncClient) -> None:
    assert (await http.post("/v1/streams", json=BODY,
                            headers={"Idempotency-Key": "k"})).status_code == 201
    changed = {**BODY, "prompt": "something else"}
    refused = await http.post("/v1/streams", json=changed, headers={"Idempotency-Key": "k"})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
    too_long = await http.post("/v1/streams", json=BODY, headers={"Idempotency-Key": "x" * 256})
    assert too_long.status_code == 422


async def test_a_key_whose_generation_is_gone_starts_a_new_one(broker: Broker) -> None:
    request = GenerationRequest([{"role": "user", "content": "hi"}],
                                params={"max_tokens": 2, "tokens_per_second": 0})
    first = await broker.start(request, idempotency_key="old")
    await broker.manager.wait(first.id)
    # Its retention ended (keys expired) long after the reservation was made.
    await broker.redis.delete(*broker.log.keys(first.id).all())
    key = broker.log.keyspace.idempotency("old")
    stale = json.loads(await broker.redis.get(key))
    stale["created"] -= 3600
    await broker.redis.set(key, json.dumps(stale))
    second = await broker.start(request, idempotency_key="old")
    assert second.id != first.id
    assert second.replayed is False
    third = await broker.start(request, idempotency_key="old")
    assert (third.id, third.replayed) == (second.id, True)


async def test_a_failed_start_releases_the_key(
    broker: Broker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = GenerationRequest([{"role": "user", "content": "hi"}], params={"max_tokens": 1})
    create = broker.log.create

    async def failing_create(*args: object, **kwargs: object) -> float:
        raise RedisConnectionError("lost the connection")

    monkeypatch.setattr(broker.log, "create", failing_create)
    with pytest.raises(RedisConnectionError):
        await broker.start(request, idempotency_key="k")
    assert await broker.redis.get(broker.log.keyspace.idempotency("k")) is None
    monkeypatch.setattr(broker.log, "create", create)
    info = await broker.start(request, idempotency_key="k")
    assert info.replayed is False


async def test_a_reservation_vanishing_midway_is_taken_afresh(
    broker: Broker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stale reservation's TTL runs out between reading it and replacing it: the
    request must still hold the key, so a repeat is a replay, not a second call."""
    import time

    from broker.keys import new_generation_id
    from broker.manager import _fingerprint

    request = GenerationRequest([{"role": "user", "content": "x"}],
                                params={"text": "hi", "tokens_per_second": 0})
    key = broker.log.keyspace.idempotency("order-1")
    old_id = new_generation_id()
    await broker.redis.set(key, json.dumps({
        "id": old_id, "provider": "simulated", "model": "simulated-1",
        "created": time.time() - 100, "request": _fingerprint("simulated", request, None)}))
    real_meta = broker.log.meta

    async def meta(gid: str) -> Any:
        if gid == old_id:
            await broker.redis.delete(key)
        return await real_meta(gid)

    monkeypatch.setattr(broker.log, "meta", meta)
    first = await broker.start(request, idempotency_key="order-1")
    second = await broker.start(request, idempotency_key="order-1")
    assert (second.id, second.replayed) == (first.id, True)
