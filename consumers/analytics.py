"""The analytics counter: per-generation statistics and exact totals.

Per generation it keeps a :class:`~consumers.stats.GenerationStats` in the checkpointed
state (bounded in size), so ``GET /v1/streams/{id}/stats`` reads it live.  When a generation
ends, its contribution to the totals behind ``/metrics`` is added once
(:meth:`ConsumerStore.add_once`): counts stay exact across redelivery and takeover.
"""

from __future__ import annotations

from typing import cast

from broker.events import Event
from consumers.runtime import ConsumerType, Generation
from consumers.stats import GenerationStats, totals_increments
from consumers.store import ConsumerStore


def stats_of(gen: Generation) -> GenerationStats:
    """The generation's stats object, rebuilt from the checkpointed state once per owner."""
    stats = gen.scratch.get("stats")
    if stats is None:
        saved = gen.state.get("stats")
        stats = GenerationStats.from_state(saved) if saved else GenerationStats.begin(
            created=gen.created, provider=gen.provider, model=gen.model
        )
        gen.scratch["stats"] = stats
    return cast(GenerationStats, stats)


class Analytics(ConsumerType):
    name = "analytics"

    def token(self, gen: Generation, event: Event) -> None:
        stats_of(gen).on_token(event.ts, event.text)

    def gap(self, gen: Generation, event: Event) -> None:
        stats_of(gen).on_gap(int(event.data["first_missing"]), int(event.data["last_missing"]))

    def end(self, gen: Generation, event: Event) -> None:
        stats = stats_of(gen)
        stats.on_end(event.type, event.data, event.ts)
        # The final statistics as the type's one output record, so that a follower of the
        # output stream (Broker.records) gets them the moment they are committed.
        gen.emit({"stats": stats.summary()})

    def checkpoint(self, gen: Generation) -> None:
        gen.state["stats"] = stats_of(gen).to_state()

    async def completed(self, gen: Generation, store: ConsumerStore) -> None:
        stats = stats_of(gen)
        if stats.status != "running":  # not a generation whose terminal entry was skipped
            await store.add_once(self.name, gen.id, totals_increments(stats))
