"""Durable consumers in one process: delivery, exactly-once commits, fencing, dead letters,
backpressure and stall, drain and handover, and the HTTP views of their results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.errors import GenerationNotFound
from broker.events import Event
from broker.providers.base import GenerationRequest
from broker.providers.simulated import tokenize
from broker.service import Broker
from broker.settings import Settings
from consumers.analytics import Analytics
from consumers.runtime import ConsumerType, Generation, Worker
from consumers.segment import SentenceSegmenter
from consumers.sentences import JsonLinesSink, Sentences
from consumers.stats import GenerationStats
from consumers.store import Checkpoint, ConsumerStore, Fenced
from tests.conftest import delete_prefix, make_settings, running_server

TEXT = (
    "Dr. Smith paid $3.50 for v1.2.3 at 9 a.m. today. Was it worth it?! "
    "He said \"yes.\" Then he left.\n\n- one item\n- another item\n"
    "```python\nx = 1. + 2.\nprint(x)\n```\nThe end"
)


def request(text: str = TEXT, rate: float = 0, **params: Any) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": "x"}],
                             params={"text": text, "tokens_per_second": rate, **params})


def prose(tokens: int, rate: float = 0) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": "x"}],
                             params={"max_tokens": tokens, "tokens_per_second": rate})


def kill(worker: Worker) -> None:
    """Stop a worker the way SIGKILL would, as far as Redis can tell: every task gone, no
    drain, no parking, no acknowledgement."""
    tasks = [*worker._takers, *(h.task for h in worker._held.values())]
    if worker._heartbeat_task is not None:
        tasks.append(worker._heartbeat_task)
    for task in tasks:
        task.cancel()
    worker._takers, worker._heartbeat_task = [], None


def expected_sentences(text: str) -> list[str]:
    seg = SentenceSegmenter()
    out = [s for token in tokenize(text) for s in seg.feed(token)]
    return out + seg.flush()


async def until(predicate: Callable[[], Awaitable[bool]], limit: float = 20.0) -> None:
    """Await a condition that lives in Redis, with no event to wait on from here: re-check
    every 20 ms, bounded by ``limit`` seconds."""
    async with asyncio.timeout(limit):
        while not await predicate():  # noqa: ASYNC110 - the condition is in another process
            await asyncio.sleep(0.02)


async def consumed(store: ConsumerStore, gid: str, *types: str) -> None:
    async def done() -> bool:
        for ctype in types:
            cp = await store.checkpoint(gid, ctype)
            if cp is None or not cp.done:
                return False
        return True
    await until(done)


async def acked(broker: Broker, group: str) -> None:
    async def empty() -> bool:
        info = await broker.redis.xpending(broker.log.keyspace.catalog, group)
        return int(info["pending"]) == 0
    await until(empty)


@contextlib.asynccontextmanager
async def consumer_broker(settings: Settings, types: Sequence[ConsumerType]
                          ) -> AsyncIterator[Broker]:
    async with Broker.open(settings, consumers=types) as b:
        yield b


@pytest.fixture
async def fast(redis_url: str) -> AsyncIterator[Settings]:
    s = make_settings(redis_url, claim_idle_seconds=1.0, stall_timeout_seconds=2.0,
                      max_deliveries=3)
    yield s
    await delete_prefix(redis_url, s.key_prefix)


# --- the two shipped types, end to end ------------------------------------------------


async def test_sentences_and_stats_over_http(fast: Settings, tmp_path: Path) -> None:
    sink = tmp_path / "sentences.jsonl"
    types = [Sentences(JsonLinesSink(str(sink))), Analytics()]
    async with consumer_broker(fast, types) as broker, running_server(fast, broker) as url, \
            httpx.AsyncClient(base_url=url) as http:
        gid = (await broker.start(request())).id
        await consumed(broker.consumer_store, gid, "sentences", "analytics")

        body = (await http.get(f"/v1/streams/{gid}/sentences")).json()
        want = expected_sentences(TEXT)
        assert [s["text"] for s in body["sentences"]] == want
        assert want[:2] == ["Dr. Smith paid $3.50 for v1.2.3 at 9 a.m. today.",
                            "Was it worth it?!"]
        assert want[-2:] == ["```python\nx = 1. + 2.\nprint(x)\n```", "The end"]
        assert [s["index"] for s in body["sentences"]] == list(range(1, len(want) + 1))
        assert body["complete"] is True
        assert all(s["generation"] == gid and s["started"] <= s["completed"]
                   for s in body["sentences"])
        later = (await http.get(f"/v1/streams/{gid}/sentences", params={"after": 3})).json()
        assert [s["index"] for s in later["sentences"]] == list(range(4, len(want) + 1))

        lines = [json.loads(line) for line in sink.read_text().splitlines()]
        assert [(r["generation"], r["index"], r["text"]) for r in lines] == [
            (gid, i, t) for i, t in enumerate(want, start=1)
        ]

        stats = (await http.get(f"/v1/streams/{gid}/stats")).json()
        tokens = tokenize(TEXT)
        assert stats["complete"] is True
        assert stats["tokens"] == len(tokens)
        assert stats["characters"] == len(TEXT)
        assert stats["status"] == "done"
        assert stats["finish_reason"] == "stop"
        assert stats["provider"] == "simulated"
        assert stats["model"] == "simulated-1"
        assert stats["inter_token_gap_ms"]["count"] == len(tokens) - 1
        assert stats["time_to_first_token_ms"] >= 0
        assert stats["usage"]["completion_tokens"] == len(tokens)

        await acked(broker, "analytics")  # totals are added before the ack
        metrics = (await http.get("/metrics")).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(metrics)
                   for s in family.samples}
        provider = (("model", "simulated-1"), ("provider", "simulated"))
        assert samples[("tokentee_tokens_total", provider)] == len(tokens)
        assert samples[("tokentee_generations_total", (
            ("finish_reason", "stop"), *provider, ("status", "done")))] == 1
        assert samples[("tokentee_consumer_up", (("type", "sentences"),))] == 1
        assert samples[("tokentee_consumer_workers", (("type", "analytics"),))] == 1
        assert samples[("tokentee_consumer_dead_letters_total", (("type", "analytics"),))] == 0
        assert samples[("tokentee_consumer_backlog_generations", (("type", "analytics"),))] == 0

        assert (await http.get("/v1/streams/gNOSUCHGENERATION/stats")).status_code == 404
        assert (await http.get("/v1/streams/bad{id}/sentences")).status_code == 404


async def test_sentence_is_emitted_before_the_generation_ends(fast: Settings) -> None:
    # About 8 s at 10 tokens a second (cancelled once seen): time enough for the logger.
    text = "First sentence here. Then " + " ".join(["more"] * 80) + "."
    async with consumer_broker(fast, [Sentences()]) as broker:
        gid = (await broker.start(request(text, rate=10))).id

        async def first_out() -> bool:
            return bool(await broker.consumer_store.records(gid, "sentences"))
        await until(first_out)
        meta = await broker.log.meta(gid)
        assert meta is not None
        assert meta.status == "running"
        assert meta.last_seq < len(tokenize(text))
        records = await broker.consumer_store.records(gid, "sentences")
        assert [r["text"] for r in records] == ["First sentence here."]
        await broker.cancel(gid)


async def test_stats_before_the_analytics_consumer_reached_it(settings: Settings) -> None:
    async with Broker.open(settings) as broker, running_server(settings, broker) as url, \
            httpx.AsyncClient(base_url=url) as http:
        gid = (await broker.start(request())).id
        stats = (await http.get(f"/v1/streams/{gid}/stats")).json()
        assert stats["complete"] is False
        assert stats["processed_seq"] == 0
        assert stats["tokens"] == 0
        sentences = (await http.get(f"/v1/streams/{gid}/sentences")).json()
        assert sentences == {"id": gid, "consumer": "sentences", "processed_seq": 0,
                             "complete": False, "sentences": []}


# --- a consumer type of one's own ----------------------------------------------------------


class Words(ConsumerType):
    """The kind of type a user writes: count words, emit the total at the end."""

    name = "words"

    def __init__(self, fail: Callable[[Event], bool] | None = None) -> None:
        self.fail = fail or (lambda event: False)
        self.calls: list[int] = []
        self.delivered: list[int] = []

    def start(self, gen: Generation) -> None:
        gen.state["words"] = 0

    def token(self, gen: Generation, event: Event) -> None:
        self.calls.append(event.seq)
        if self.fail(event):
            raise RuntimeError(f"poison at {event.seq}")
        gen.state["words"] += len(event.text.split())
        gen.emit({"seq": event.seq})

    def end(self, gen: Generation, event: Event) -> None:
        gen.emit({"words": gen.state["words"], "status": event.type})

    def deliver(self, gen: Generation, records: list[dict[str, Any]]) -> None:
        self.delivered += [r["index"] for r in records]


async def test_every_type_sees_every_generation_once(fast: Settings) -> None:
    words = Words()
    async with consumer_broker(fast, [words, Analytics()]) as broker:
        gids = [(await broker.start(request(f"gen {i} has five words", rate=0))).id
                for i in range(5)]
        for gid in gids:
            await consumed(broker.consumer_store, gid, "words", "analytics")
            records = await broker.consumer_store.records(gid, "words")
            assert records[-1] == {"words": 5, "status": "done", "generation": gid,
                                   "index": 6}
            assert [r.get("seq") for r in records[:-1]] == [1, 2, 3, 4, 5]
        await acked(broker, "analytics")
        totals = await broker.consumer_store.totals("analytics")
        assert totals["tokens|simulated|simulated-1"] == 25
        assert totals["generations|done|stop|simulated|simulated-1"] == 5


async def test_transient_handler_failure_is_retried_from_the_checkpoint(
    fast: Settings,
) -> None:
    attempts = {"n": 0}

    def flaky(event: Event) -> bool:
        if event.seq == 3 and attempts["n"] < 2:
            attempts["n"] += 1
            return True
        return False

    words = Words(flaky)
    async with consumer_broker(fast, [words]) as broker:
        gid = (await broker.start(request("one two three four five"))).id
        await consumed(broker.consumer_store, gid, "words")
        records = await broker.consumer_store.records(gid, "words")
        assert [r.get("seq") for r in records] == [1, 2, 3, 4, 5, None]
        assert records[-1]["words"] == 5
        assert await broker.redis.xlen(broker.log.keyspace.dead_letters("words")) == 0
        assert words.delivered == [1, 2, 3, 4, 5, 6]  # the retries repeated nothing


async def test_poison_entry_goes_to_the_dead_letter_stream(
    fast: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    words = Words(lambda event: event.seq == 3)
    async with consumer_broker(fast, [words]) as broker, \
            running_server(fast, broker) as url, httpx.AsyncClient(base_url=url) as http:
        gid = (await broker.start(request("one two three four five"))).id
        await consumed(broker.consumer_store, gid, "words")
        records = await broker.consumer_store.records(gid, "words")
        # The rest kept flowing: every entry but the poison one, then the end.
        assert [r.get("seq") for r in records] == [1, 2, 4, 5, None]
        assert records[-1]["words"] == 4
        assert words.calls.count(3) == fast.max_deliveries
        dlq = await broker.redis.xrange(broker.log.keyspace.dead_letters("words"))
        assert len(dlq) == 1
        fields = {k.decode(): v.decode() for k, v in dlq[0][1].items()}
        assert fields["generation"] == gid
        assert fields["seq"] == "3"
        assert fields["attempts"] == str(fast.max_deliveries)
        assert fields["entry_type"] == "token"
        assert json.loads(fields["entry_data"]) == {"text": " three"}
        assert "poison at 3" in fields["error"]
        assert "moved to the dead-letter stream" in caplog.text
        metrics = (await http.get("/metrics")).text
        assert 'tokentee_consumer_dead_letters_total{type="words"} 1.0' in metrics


# --- exactly once: fencing and redelivery ---------------------------------------------------


async def test_commit_is_fenced_and_idempotent(settings: Settings, broker: Broker) -> None:
    store = broker.consumer_store
    gid = (await broker.start(request("a b c"))).id
    first = await store.take(gid, "t", "w1")
    assert first is not None
    assert first.seq == 0
    count, _ = await store.commit(gid, "t", "w1", expected=0, seq=2, state='{"n":2}',
                                  sunk=0, done=False, records=['{"x":1}'])
    assert count == 1
    # A second worker takes over: the first one's next commit is refused.
    second = await store.take(gid, "t", "w2")
    assert second is not None
    assert (second.seq, second.state, second.records) == (2, {"n": 2}, 1)
    with pytest.raises(Fenced):
        await store.commit(gid, "t", "w1", expected=2, seq=3, state='{"n":3}', sunk=1,
                           done=True, records=['{"x":2}'])
    # A commit from a stale position is refused too (no double effects).
    with pytest.raises(Fenced):
        await store.commit(gid, "t", "w2", expected=0, seq=3, state="{}", sunk=1, done=True,
                           records=['{"x":2}'])
    count, _ = await store.commit(gid, "t", "w2", expected=2, seq=3, state='{"n":3}',
                                  sunk=1, done=True, records=['{"x":2}'])
    assert count == 2
    assert await store.records(gid, "t") == [{"x": 1}, {"x": 2}]


async def test_totals_are_added_once_per_generation(broker: Broker) -> None:
    store = broker.consumer_store
    assert await store.add_once("analytics", "gA", {"tokens|p|m": 3}) is True
    assert await store.add_once("analytics", "gA", {"tokens|p|m": 3}) is False
    assert await store.add_once("analytics", "gB", {"tokens|p|m": 4}) is True
    assert (await store.totals("analytics"))["tokens|p|m"] == 7


class Blocking(ConsumerType):
    """Stops at one entry until released: a slow or stuck consumer."""

    name = "slow"

    def __init__(self, stop_at: int) -> None:
        self.stop_at = stop_at
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.tokens = 0

    async def token(self, gen: Generation, event: Event) -> None:
        if event.seq == self.stop_at:
            self.reached.set()
            await self.release.wait()
        self.tokens += 1
        gen.state["n"] = gen.state.get("n", 0) + 1


async def finished_by_another_worker(settings: Settings, gid: str
                                     ) -> tuple[Checkpoint, Blocking]:
    """A fresh worker of type ``slow`` takes ``gid`` over and finishes it."""
    other = Blocking(stop_at=-1)
    async with consumer_broker(settings, [other]) as second:
        await consumed(second.consumer_store, gid, "slow")
        cp = await second.consumer_store.checkpoint(gid, "slow")
    assert cp is not None
    return cp, other


async def test_takeover_after_a_worker_stops_continues_from_the_checkpoint(
    fast: Settings,
) -> None:
    """A worker that stops without draining (its tasks die): another worker takes the
    generation over after claim_idle, from the checkpoint, and the result is exact."""
    settings = fast.model_copy(update={"max_lag": 0})
    stuck = Blocking(stop_at=5)
    text = " ".join(f"w{i}" for i in range(40))
    async with Broker.open(settings) as broker, contextlib.AsyncExitStack() as stack:
        # The first worker, in a broker of its own, dies mid-generation.
        first = await stack.enter_async_context(Broker.open(settings, consumers=[stuck]))
        stack.callback(stuck.release.set)  # runs first: lets the dead task's handler go
        gid = (await broker.start(request(text))).id
        await stuck.reached.wait()
        kill(first.workers[0])
        before = await broker.consumer_store.checkpoint(gid, "slow")
        assert before is not None
        assert before.seq < 5
        # A second worker of the same type takes it over once it is idle long enough.
        cp, other = await finished_by_another_worker(settings, gid)
        assert cp.state["n"] == 40
        assert other.tokens == 40 - before.seq  # it went on from the checkpoint


# --- backpressure ------------------------------------------------------------------------


async def test_slow_consumer_holds_the_producer_within_max_lag(fast: Settings) -> None:
    settings = fast.model_copy(update={"max_lag": 20, "stall_timeout_seconds": 30.0})
    slow = Blocking(stop_at=5)
    async with consumer_broker(settings, [slow]) as broker:
        # 200 tokens/s: the worker takes the generation within its first window (a type
        # holds a generation back from the moment one of its workers has taken it).
        gid = (await broker.start(prose(300, rate=200))).id
        await slow.reached.wait()

        async def held() -> bool:
            return bool(await broker.redis.hexists(broker.log.keys(gid).meta, "hold"))
        await until(held)
        meta = await broker.log.meta(gid)
        cp = await broker.consumer_store.checkpoint(gid, "slow")
        assert meta is not None
        assert meta.status == "running"
        # The consumer is stuck before entry 5; the producer is at most max_lag beyond it.
        assert cp is not None
        assert cp.seq < 5
        # The first window (before any worker had taken it) ends at 1 + 20.
        assert meta.last_seq <= max(cp.seq + 20, 21)
        assert broker.gate is not None
        assert broker.gate.holds >= 1
        slow.release.set()
        await consumed(broker.consumer_store, gid, "slow")
        meta = await broker.log.meta(gid)
        assert meta is not None
        assert meta.status == "done"
        assert meta.last_seq == 301
        assert slow.tokens == 300


async def test_stalled_consumer_type_stops_holding_producers_back(
    fast: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    settings = fast.model_copy(update={"max_lag": 10, "stall_timeout_seconds": 3.0,
                                       "claim_idle_seconds": 60.0})
    # A type whose only worker took the generation and then vanished (killed).
    store_broker = Broker.open(settings)
    async with store_broker as broker:
        store = broker.consumer_store
        await store.heartbeat("ghost", "w-dead", {}, 60_000)
        assert broker.gate is not None
        await broker.gate.refresh()
        gid = (await broker.start(prose(100, rate=200))).id
        await store.take(gid, "ghost", "w-dead")

        async def held() -> bool:
            return bool(await broker.redis.hexists(broker.log.keys(gid).meta, "hold"))
        await until(held)
        async for _ in broker.events(gid):
            pass  # completes: the ghost stops counting after the stall timeout
        meta = await broker.log.meta(gid)
        assert meta is not None
        assert meta.status == "done"
        assert meta.last_seq == 101
        assert broker.gate.live == ()
        assert broker.gate.stalled == ("ghost",)
        assert "'ghost' has had no live worker" in caplog.text
        async with running_server(settings, broker) as url, \
                httpx.AsyncClient(base_url=url) as http:
            metrics = (await http.get("/metrics")).text
        assert 'tokentee_consumer_up{type="ghost"} 0.0' in metrics

    # The type returns later and catches up from the log.
    class Ghost(Words):
        name = "ghost"

    late = Ghost()
    async with consumer_broker(settings, [late]) as broker:
        await consumed(broker.consumer_store, gid, "ghost")
        records = await broker.consumer_store.records(gid, "ghost")
        assert len(records) == 101


async def test_sse_readers_never_hold_the_producer(fast: Settings) -> None:
    settings = fast.model_copy(update={"max_lag": 10})
    async with consumer_broker(settings, [Words()]) as broker, \
            broker.subscribe((await broker.start(prose(2_000))).id) as cursor:
        gid = cursor.gid
        # The reader takes nothing while the producer writes all 2,000 tokens; only the
        # consumer type paces it.
        await broker.manager.wait(gid)
        meta = await broker.log.meta(gid)
        assert meta is not None
        assert meta.status == "done"
        assert cursor.last == 0


# --- drain ----------------------------------------------------------------------------------


async def test_drain_checkpoints_and_hands_over_at_once(fast: Settings) -> None:
    settings = fast.model_copy(update={"max_lag": 0, "shutdown_grace_seconds": 0.2,
                                       "claim_idle_seconds": 1.0})
    stuck = Blocking(stop_at=5)
    text = " ".join(f"w{i}" for i in range(30))
    async with Broker.open(settings) as broker:
        async with consumer_broker(settings, [stuck]) as first:
            gid = (await broker.start(request(text))).id
            await stuck.reached.wait()
            worker = first.workers[0]
        # Drained: the task was stopped after the grace period, its entry parked.
        assert worker._held == {}
        pending = await broker.redis.xpending_range(
            broker.log.keyspace.catalog, "slow", min="-", max="+", count=10)
        assert [p["consumer"] for p in pending] == [b"parked"]
        assert int(pending[0]["time_since_delivered"]) >= 10_000
        cp, _ = await finished_by_another_worker(settings, gid)
        assert cp.state["n"] == 30
        stuck.release.set()


def test_consumer_type_names_are_checked() -> None:
    class Bad(ConsumerType):
        name = "Bad Name"

    with pytest.raises(ValueError, match="must match"):
        Worker(Bad(), Settings(), redis=None, group_redis=None,  # type: ignore[arg-type]
               log=None, hub=None)  # type: ignore[arg-type]


def test_stats_state_survives_json() -> None:
    stats = GenerationStats.begin(created=1.0, provider="p", model="m")
    stats.on_token(1.5, "hi")
    again = GenerationStats.from_state(json.loads(json.dumps(stats.to_state())))
    assert again.summary() == stats.summary()


# --- failure paths found in review -----------------------------------------------------------


async def test_generation_survives_its_catalog_entry_being_trimmed(fast: Settings) -> None:
    """``XADD ... MAXLEN ~ catalog_maxlen`` can trim the catalog entry of a generation in
    progress (Redis 7 then drops it from the pending list on the next touch): the checkpoint
    still names this worker, so it keeps the generation."""
    settings = fast.model_copy(update={"max_lag": 0})
    words = Words()
    text = " ".join(f"w{i}" for i in range(30))
    async with consumer_broker(settings, [words]) as broker:
        gid = (await broker.start(request(text, rate=15))).id

        async def started() -> bool:
            cp = await broker.consumer_store.checkpoint(gid, "words")
            return cp is not None and cp.seq > 0
        await until(started)
        await broker.redis.xtrim(broker.log.keyspace.catalog, maxlen=0)
        await consumed(broker.consumer_store, gid, "words")
        records = await broker.consumer_store.records(gid, "words")
        assert [r.get("seq") for r in records[:-1]] == list(range(1, 31))


async def test_takeover_scan_survives_trimmed_pending_entries(
    fast: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    settings = fast.model_copy(update={"max_lag": 0})
    text = " ".join(f"w{i}" for i in range(20))
    async with Broker.open(settings) as broker, contextlib.AsyncExitStack() as stack:
        gids = []
        for trim in (True, False):  # two orphans; the first one's catalog entry trimmed
            stuck = Blocking(stop_at=3)
            first = await stack.enter_async_context(Broker.open(settings, consumers=[stuck]))
            stack.callback(stuck.release.set)
            gids.append((await broker.start(request(text))).id)
            await stuck.reached.wait()
            kill(first.workers[0])
            if trim:
                await broker.redis.xtrim(broker.log.keyspace.catalog, maxlen=0)
        async with consumer_broker(settings, [Blocking(stop_at=-1)]) as second:
            await consumed(second.consumer_store, gids[1], "slow")  # the other is taken over
            assert "trimmed before their takeover" in caplog.text
            assert not second.workers[0].failed.is_set()


class BadState(ConsumerType):
    """Puts a value JSON cannot hold into its state at entry 2."""

    name = "badstate"

    def token(self, gen: Generation, event: Event) -> None:
        gen.state["n"] = gen.state.get("n", 0) + 1
        if event.seq == 2:
            gen.state["when"] = {1, 2}


async def test_a_state_that_cannot_be_saved_is_dead_lettered_too(fast: Settings) -> None:
    settings = fast.model_copy(update={"max_lag": 5})
    async with consumer_broker(settings, [BadState()]) as broker:
        gid = (await broker.start(prose(20))).id
        await consumed(broker.consumer_store, gid, "badstate")
        dlq = await broker.redis.xrange(broker.log.keyspace.dead_letters("badstate"))
        assert [fields[b"seq"] for _id, fields in dlq] == [b"2"]
        assert b"not JSON serializable" in dlq[0][1][b"error"]
        cp = await broker.consumer_store.checkpoint(gid, "badstate")
        assert cp is not None
        assert cp.state == {"n": 19}  # every token but the dead-lettered one


async def test_a_retry_never_takes_back_a_generation_taken_over_meanwhile(
    fast: Settings,
) -> None:
    settings = fast.model_copy(update={"max_lag": 0, "max_deliveries": 10,
                                       "claim_idle_seconds": 30.0})
    took_over = asyncio.Event()

    def fail_until_taken_over(event: Event) -> bool:
        return event.seq == 3 and not took_over.is_set()

    words = Words(fail_until_taken_over)
    async with consumer_broker(settings, [words]) as broker:
        store, catalog = broker.consumer_store, broker.log.keyspace.catalog
        gid = (await broker.start(request("one two three four five"))).id

        async def failed_once() -> bool:
            return words.calls.count(3) >= 1
        await until(failed_once)
        # Worker B takes the generation over while A backs off before its retry.
        [entry] = await broker.redis.xpending_range(catalog, "words", "-", "+", 10)
        await broker.redis.xclaim(catalog, "words", "B", 0, [entry["message_id"]],
                                  justid=True)
        await store.take(gid, "words", "B")
        took_over.set()
        calls = len(words.calls)

        async def a_let_go() -> bool:
            return not broker.workers[0]._held
        await until(a_let_go)
        owner = await broker.redis.hget(broker.log.keyspace.checkpoint(gid, "words"), "owner")
        assert owner == b"B"
        assert len(words.calls) == calls  # A did not process anything after the takeover


@pytest.mark.skipif(bool(os.environ.get("TOKENTEE_TEST_REDIS_URL")),
                    reason="turns the server into a replica for a moment: only on the"
                    " suite's own private redis-server")
async def test_catalog_reads_survive_a_readonly_server(
    fast: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    """READONLY (a failover) or any other error reply from XREADGROUP: the read loop backs
    off and retries instead of dying while the heartbeat keeps the type live."""
    words = Words()
    async with consumer_broker(fast, [words]) as broker:
        admin = broker.redis
        await admin.execute_command("REPLICAOF", "127.0.0.1", "1")  # a server that is not
        try:
            async def refused() -> bool:
                return "catalog read failed" in caplog.text
            await until(refused)
        finally:
            await admin.execute_command("REPLICAOF", "NO", "ONE")
        gid = (await broker.start(request("still consumed"))).id
        await consumed(broker.consumer_store, gid, "words")
        assert not broker.workers[0].failed.is_set()


async def test_types_with_busy_workers_never_hold_each_other(fast: Settings) -> None:
    """Two types, one slot per worker: a replacement worker of type A busy with G2 cannot
    take G1 back; G2's producer must then not be held by type B, whose only worker is busy
    with G1 (held by A).  A type holds a generation only once one of its workers has
    taken it, so G2 runs through, A's worker frees up and takes G1 over."""
    settings = fast.model_copy(update={"max_lag": 20, "consumer_concurrency": 1,
                                       "stall_timeout_seconds": 30.0})
    stuck = Blocking(stop_at=5)
    async with Broker.open(settings) as producer, contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(Broker.open(settings, consumers=[Words()]))
        first = await stack.enter_async_context(Broker.open(settings, consumers=[stuck]))
        stack.callback(stuck.release.set)
        assert producer.gate is not None
        await producer.gate.refresh()
        g1 = (await producer.start(prose(300, rate=500))).id
        await stuck.reached.wait()
        kill(first.workers[0])
        await stack.enter_async_context(Broker.open(settings, consumers=[Blocking(-1)]))
        g2 = (await producer.start(prose(300, rate=500))).id
        async for _ in producer.events(g2):
            pass
        async for _ in producer.events(g1):
            pass
        for gid in (g1, g2):
            await consumed(producer.consumer_store, gid, "slow", "words")


async def test_foreign_catalog_entries_do_not_stop_a_worker(fast: Settings) -> None:
    words = Words()
    async with consumer_broker(fast, [words]) as broker:
        catalog = broker.log.keyspace.catalog
        await broker.redis.xadd(catalog, {"id": b"\xff\xfe not utf-8"})
        await broker.redis.xadd(catalog, {"other": "field"})
        gid = (await broker.start(request("still consumed"))).id
        await consumed(broker.consumer_store, gid, "words")
        assert not broker.workers[0].failed.is_set()
        await acked(broker, "words")  # the foreign entries were acknowledged (the generation's
        # own entry is acknowledged just after its last commit, hence awaited, not asserted)


async def test_records_ends_or_refuses_cleanly(fast: Settings) -> None:
    async with consumer_broker(fast, [Words()]) as broker:
        gid = (await broker.start(request("a b c"))).id
        got = [r async for r in broker.records(gid, "words")]
        assert [r.get("seq") for r in got] == [1, 2, 3, None]
        with pytest.raises(ValueError, match="after"):
            await anext(broker.records(gid, "words", after=-1))
        with pytest.raises(GenerationNotFound):
            await anext(broker.records("gNOSUCHGENERATION", "words"))
        # A type nobody runs: the iterator waits, and ends with GenerationNotFound when
        # the generation expires.
        follower = broker.records(gid, "nobody")
        waiting = asyncio.ensure_future(anext(follower))
        await broker.redis.delete(*broker.log.keys(gid).all())
        with pytest.raises(GenerationNotFound):
            await waiting
        await follower.aclose()


async def test_sentences_after_is_bounded(fast: Settings) -> None:
    async with consumer_broker(fast, []) as broker, running_server(fast, broker) as url, \
            httpx.AsyncClient(base_url=url) as http:
        gid = (await broker.start(request("a b"))).id
        response = await http.get(f"/v1/streams/{gid}/sentences", params={"after": 10**30})
        assert response.status_code == 400  # a malformed `after` is 400 on every route


async def test_totals_skip_values_redis_cannot_add(broker: Broker) -> None:
    store = broker.consumer_store
    assert await store.add_once("analytics", "gX", {"a": 1.0, "b": float("inf"),
                                                     "c": float("nan")}) is True
    assert await store.totals("analytics") == {"a": 1.0}


async def test_commits_of_one_turn_share_a_pipeline_and_keep_their_own_results(
    broker: Broker, redis_url: str,
) -> None:
    store = ConsumerStore(broker.redis, broker.log.keyspace, 60)
    gids = [(await broker.start(request("a b"))).id for _ in range(6)]
    for gid in gids:
        await store.take(gid, "t", "w")
    await store.take(gids[0], "t", "other")  # this one is no longer ours
    results = await asyncio.gather(*(
        store.commit(gid, "t", "w", expected=0, seq=1, state="{}", sunk=0, done=False,
                     records=['{"n":1}']) for gid in gids
    ), return_exceptions=True)
    assert isinstance(results[0], Fenced)
    assert results[1:] == [(1, False)] * 5
    if not os.environ.get("TOKENTEE_TEST_REDIS_URL"):  # only on the suite's own server
        await broker.redis.script_flush()  # a restarted Redis has no scripts loaded
        again = await asyncio.gather(*(
            store.commit(gid, "t", "w", expected=1, seq=2, state="{}", sunk=0, done=True,
                         records=[]) for gid in gids[1:]
        ))
        assert again == [(1, False)] * 5
    await store.aclose()
