"""Discovering generations through the catalog."""

from __future__ import annotations

import asyncio
import contextlib

from broker.providers.base import GenerationRequest
from broker.service import Broker
from consumers import Announcement


async def test_follower_waits_for_new_generations_and_resumes_by_position(
    broker: Broker,
) -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "x"}],
                                params={"max_tokens": 1, "tokens_per_second": 0})
    before = await broker.start(request)
    async with contextlib.aclosing(broker.generations(after="0")) as catalog:
        mark = await anext(catalog)
    assert mark.id == before.id
    seen: list[Announcement] = []

    async def follow() -> None:
        async for announcement in broker.generations(after=mark.entry_id):
            seen.append(announcement)
            if len(seen) == 5:
                return

    follower = asyncio.create_task(follow())
    created = [await broker.start(request) for _ in range(5)]
    await asyncio.wait_for(follower, 10)
    assert [a.id for a in seen] == [c.id for c in created]
    assert all(a.provider == "simulated" and a.model == "simulated-1" for a in seen)
    for a in seen:  # every announced generation exists
        assert (await broker.state(a.id)).meta.id == a.id


async def test_follower_can_replay_from_the_start(broker: Broker) -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "x"}],
                                params={"max_tokens": 1, "tokens_per_second": 0})
    created = [await broker.start(request) for _ in range(3)]
    seen: list[str] = []
    async for announcement in broker.generations(after="0"):
        seen.append(announcement.id)
        if len(seen) == 3:
            break
    assert seen == [c.id for c in created]
