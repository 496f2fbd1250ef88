"""The console's broker figures are the deployment's: every broker process publishes its own
to Redis (``broker/figures.py``) and any replica answers with their sum, listing each."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from broker.figures import deployment_totals
from broker.providers.base import GenerationRequest
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import delete_prefix, make_settings, running_server
from tests.test_consumers import until


@pytest.fixture
async def settings(redis_url: str) -> AsyncIterator[Settings]:
    s = make_settings(redis_url)
    yield s
    await delete_prefix(redis_url, s.key_prefix)


def slow() -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": "x"}],
                             params={"max_tokens": 100_000, "tokens_per_second": 50})


async def test_any_replica_answers_with_every_replicas_figures(settings: Settings) -> None:
    async with Broker.open(settings) as a, running_server(settings, a) as url, \
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as http:

        async def figures() -> dict[str, Any]:
            response = await http.get("/v1/console/figures")
            assert response.status_code == 200
            return dict(response.json())

        alone = await figures()
        assert [r["replica"] for r in alone["replicas"]] == [a.manager.owner]
        assert alone["replica"] == a.manager.owner
        assert alone["replicas"][0]["host"] == socket.gethostname()
        async with Broker.open(settings) as b:
            # B runs a generation and reads it; A, which runs nothing, shows it.
            info = await b.start(slow())
            async with b.subscribe(info.id) as cursor:
                async for event in cursor:
                    if event.seq >= 60:
                        break

                async def counted() -> bool:
                    f = await figures()
                    return (len(f["replicas"]) == 2 and f["active_generations"] == 1
                            and f["hub_readers"] == 1 and f["tokens_in_per_second"] > 0)
                await until(counted, 10)
                both = await figures()
            by_replica = {r["replica"]: r for r in both["replicas"]}
            assert set(by_replica) == {a.manager.owner, b.manager.owner}
            assert by_replica[b.manager.owner]["active_generations"] == 1
            assert by_replica[a.manager.owner]["active_generations"] == 0
            assert both["tokens_in_per_second"] == pytest.approx(
                by_replica[b.manager.owner]["tokens_in_per_second"], abs=0.11)
            await b.cancel(info.id)
        # B stopped: gone from the figures at once, not when its entry would lapse.
        after = await figures()
        assert [r["replica"] for r in after["replicas"]] == [a.manager.owner]
        assert after["active_generations"] == 0


async def test_a_replica_that_stopped_publishing_drops_out(settings: Settings) -> None:
    async with Broker.open(settings) as broker:
        key = broker.log.keyspace.figures
        # A process that died a while ago (its entry lapsed: an expiry in the past, on
        # Redis's clock) and something that is not an entry at all.
        await broker.redis.hset(key, mapping={
            "p-dead": "1 " + json.dumps({"replica": "p-dead", "active_generations": 7}),
            "p-garbled": "99999999999999 not json",
        })
        replicas = await broker.figures.replicas()
        assert [r["replica"] for r in replicas] == [broker.manager.owner]
        fields = {f.decode() for f in await broker.redis.hkeys(key)}
        assert "p-dead" not in fields  # the read removed the lapsed entry
        assert broker.manager.owner in fields
        # The hash itself expires a few seconds after the last process published.
        assert 0 < await broker.redis.ttl(key) <= 4


def test_totals_add_up_and_the_fanout_is_the_deployments() -> None:
    replicas = [
        {"active_generations": 2, "sse_clients": 5, "hub_readers": 6, "tokens_in": 100,
         "tokens_out": 500, "tokens_in_per_second": 10.0, "tokens_out_per_second": 50.0},
        {"active_generations": 0, "sse_clients": 3, "hub_readers": 3, "tokens_in": 0,
         "tokens_out": 300, "tokens_in_per_second": 0.0, "tokens_out_per_second": 30.0},
    ]
    totals = deployment_totals(replicas)
    assert totals["active_generations"] == 2
    assert totals["sse_clients"] == 8
    assert totals["tokens_out_per_second"] == 80.0
    # B serves readers of A's generations: tokens out per token in over the deployment.
    assert totals["fanout_ratio"] == 8.0
    assert deployment_totals([])["fanout_ratio"] == 0.0
