"""Consumer workers as real processes: SIGKILL takeover with exact output, SIGTERM drain and
handover, SIGSTOP backpressure reaching the upstream server, and the ``consume`` command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psutil
import pytest

from broker.providers.base import GenerationRequest
from broker.providers.simulated import tokenize
from broker.service import Broker
from broker.settings import Settings
from consumers.store import ConsumerStore
from tests.conftest import delete_prefix, make_settings
from tests.test_consumers import consumed, expected_sentences, until
from tests.test_openai_provider import ROLE, Conn, FakeUpstream, chunk_json, content, sse
from tests.test_processes import serve_process

pytestmark = pytest.mark.timeout(90)


def worker_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "TOKENTEE_KEY_PREFIX": settings.key_prefix,
        "TOKENTEE_BLOCK_MS": str(settings.block_ms),
        "TOKENTEE_CLAIM_IDLE_SECONDS": str(settings.claim_idle_seconds),
        "TOKENTEE_STALL_TIMEOUT_SECONDS": str(settings.stall_timeout_seconds),
        "TOKENTEE_SHUTDOWN_GRACE_SECONDS": str(settings.shutdown_grace_seconds),
        "TOKENTEE_SENTENCES_SINK": "off",
    }


@contextlib.contextmanager
def workers(settings: Settings, *types: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``tokentee consume TYPE`` child processes, killed at the end if still running."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "broker", "consume", t, "--log-level", "info"],
                         env=worker_env(settings), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
        for t in types
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(10)
            if proc.stderr:
                proc.stderr.close()


async def live_workers(store: ConsumerStore, ctype: str, count: int) -> None:
    async def enough() -> bool:
        raw = await store.redis.hgetall(store.keyspace.consumer_workers(ctype))
        return len(raw) >= count
    await until(enough)


async def owner_pid(store: ConsumerStore, gid: str, ctype: str, min_seq: int) -> int:
    """The pid of the worker that owns ``gid`` for ``ctype`` once it has committed
    ``min_seq`` entries (worker names are ``w-<pid>-<hex>``)."""
    async def progressed() -> bool:
        cp = await store.checkpoint(gid, ctype)
        return cp is not None and cp.seq >= min_seq
    await until(progressed)
    owner = await store.redis.hget(store.keyspace.checkpoint(gid, ctype), "owner")
    return int(owner.decode().split("-")[1])


@pytest.fixture
async def settings(redis_url: str) -> AsyncIterator[Settings]:
    s = make_settings(redis_url, claim_idle_seconds=1.5, stall_timeout_seconds=30.0,
                      shutdown_grace_seconds=0.5)
    yield s
    await delete_prefix(redis_url, s.key_prefix)


def sentences_text(n: int) -> str:
    return " ".join(f"Sentence number {i} is here." for i in range(n))


def request(text: str, rate: float) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": "x"}],
                             params={"text": text, "tokens_per_second": rate})


async def test_sigkill_mid_generation_is_taken_over_with_nothing_lost_or_repeated(
    settings: Settings,
) -> None:
    text = sentences_text(40)
    tokens = tokenize(text)
    with workers(settings, "sentences", "sentences", "analytics", "analytics") as procs:
        async with Broker.open(settings) as broker:
            store = broker.consumer_store
            await live_workers(store, "sentences", 2)
            await live_workers(store, "analytics", 2)
            gid = (await broker.start(request(text, rate=50))).id
            victims = {await owner_pid(store, gid, "sentences", 15),
                       await owner_pid(store, gid, "analytics", 15)}
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            await consumed(store, gid, "sentences", "analytics")

            # Another worker finished each: the owners changed.
            for ctype in ("sentences", "analytics"):
                owner = await store.redis.hget(store.keyspace.checkpoint(gid, ctype), "owner")
                assert int(owner.decode().split("-")[1]) not in victims
            records = await store.records(gid, "sentences")
            assert [r["text"] for r in records] == expected_sentences(text)
            assert [r["index"] for r in records] == list(range(1, len(records) + 1))
            cp = await store.checkpoint(gid, "analytics")
            assert cp is not None
            assert cp.state["stats"]["tokens"] == len(tokens)

            async def totals_in() -> bool:
                return bool(await store.totals("analytics"))
            await until(totals_in)
            totals = await store.totals("analytics")
            assert totals["tokens|simulated|simulated-1"] == len(tokens)
            assert totals["characters|simulated|simulated-1"] == len(text)
            assert totals["generations|done|stop|simulated|simulated-1"] == 1
        killed = [p for p in procs if p.pid in victims]
        assert [p.wait(5) for p in killed] == [-signal.SIGKILL] * len(killed)


async def test_sigterm_drains_exits_zero_and_hands_the_generation_over(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"claim_idle_seconds": 4.0})
    text = sentences_text(30)
    with workers(settings, "sentences", "sentences") as procs:
        async with Broker.open(settings) as broker:
            store = broker.consumer_store
            await live_workers(store, "sentences", 2)
            gid = (await broker.start(request(text, rate=30))).id
            pid = await owner_pid(store, gid, "sentences", 10)
            proc = next(p for p in procs if p.pid == pid)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 20) == 0
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            assert "handed 1 unfinished generations over" in stderr
            await consumed(store, gid, "sentences")
            records = await store.records(gid, "sentences")
            assert [r["text"] for r in records] == expected_sentences(text)
            other = await store.redis.hget(store.keyspace.checkpoint(gid, "sentences"),
                                           "owner")
            assert int(other.decode().split("-")[1]) != pid


class Flood:
    """An OpenAI-compatible upstream that writes big chunks as fast as the client takes
    them, and counts what it has written: a stalled count is TCP backpressure.  After the
    first ``first`` chunks it waits for ``go``."""

    def __init__(self, chunks: int, size: int, first: int = 5) -> None:
        self.chunks = chunks
        self.size = size
        self.first = first
        self.go = asyncio.Event()
        self.written = 0
        self.tokens = [f"{i:06d}" + "x" * (size - 6) for i in range(chunks)]

    async def __call__(self, conn: Conn) -> None:
        await conn.head()
        await conn.chunk(sse(ROLE))
        for i, token in enumerate(self.tokens):
            if i == self.first:
                await self.go.wait()
            await conn.chunk(sse(content(token)))
            self.written += 1
        await conn.chunk(sse(chunk_json(finish="stop")) + b"data: [DONE]\n\n")
        await conn.end()


async def stalled(flood: Flood, quiet: float = 1.5) -> None:
    """Wait until the upstream's write count has not moved for ``quiet`` seconds."""
    while True:
        before = flood.written
        await asyncio.sleep(quiet)
        if flood.written == before:
            return


async def test_sigstopped_consumer_pauses_the_producer_and_the_upstream(
    redis_url: str,
) -> None:
    flood = Flood(chunks=2_000, size=16_384)  # 32 MB: far more than the socket buffers
    async with FakeUpstream(flood) as upstream:
        settings = make_settings(
            redis_url, openai_base_url=upstream.base_url, openai_api_key="sk-test",
            max_lag=50, claim_idle_seconds=4.0, stall_timeout_seconds=60.0,
        )
        try:
            with workers(settings, "analytics") as (proc,):
                async with Broker.open(settings) as broker:
                    store = broker.consumer_store
                    await live_workers(store, "analytics", 1)
                    gate = broker.gate
                    assert gate is not None

                    async def counted() -> bool:
                        return "analytics" in gate.live
                    await until(counted)

                    gid = (await broker.start(GenerationRequest(
                        messages=[{"role": "user", "content": "x"}]), "openai")).id
                    # The worker takes the generation (a type counts for a generation once
                    # it has), then stops; only then does the upstream pour out the rest.
                    await owner_pid(store, gid, "analytics", 1)
                    os.kill(proc.pid, signal.SIGSTOP)
                    flood.go.set()
                    await stalled(flood)
                    # The upstream is stuck mid-body, the log holds at most max_lag entries.
                    assert 0 < flood.written < flood.chunks
                    meta = await broker.log.meta(gid)
                    assert meta is not None
                    assert meta.status == "running"
                    cp = await store.checkpoint(gid, "analytics")
                    assert cp is not None
                    assert meta.last_seq <= cp.seq + 50
                    assert await broker.redis.hget(broker.log.keys(gid).meta, "hold")
                    rss = psutil.Process().memory_info().rss / 2**20
                    print(f"held: upstream wrote {flood.written} of {flood.chunks} chunks of"
                          f" {flood.size} bytes, log at {meta.last_seq} entries, broker RSS"
                          f" {rss:.1f} MB")

                    os.kill(proc.pid, signal.SIGCONT)
                    await consumed(store, gid, "analytics")
                    assert flood.written == flood.chunks
                    state = await broker.state(gid)
                    assert state.meta.status == "done"
                    assert state.text == "".join(flood.tokens)
                    cp = await store.checkpoint(gid, "analytics")
                    assert cp is not None
                    assert cp.state["stats"]["tokens"] == flood.chunks
                    assert cp.state["stats"]["lost_entries"] == 0
        finally:
            await delete_prefix(redis_url, settings.key_prefix)


def run_cli(*args: str, env: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("REDIS_URL", "TOKENTEE_REDIS_URL")}
    return subprocess.run([sys.executable, "-m", "broker", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=30, check=False)


def test_consume_needs_a_redis_url_and_a_known_type(settings: Settings) -> None:
    no_url = run_cli("consume", "sentences")
    assert no_url.returncode == 2
    assert "needs the broker's Redis: set REDIS_URL" in no_url.stderr
    unknown = run_cli("consume", "nosuch", env={"REDIS_URL": settings.redis_url})
    assert unknown.returncode == 2
    assert "unknown consumer type 'nosuch'" in unknown.stderr
    missing = run_cli("consume", "nosuch_module:Thing", env={"REDIS_URL": settings.redis_url})
    assert missing.returncode == 2
    assert "cannot load consumer type" in missing.stderr
    sink = run_cli("consume", "sentences", env={
        "REDIS_URL": settings.redis_url, "TOKENTEE_SENTENCES_SINK": "/nonexistent/dir/s.jsonl"})
    assert sink.returncode == 2
    assert "sentences sink '/nonexistent/dir/s.jsonl'" in sink.stderr


async def test_supervisor_runs_n_workers_and_drains_them_on_sigterm(settings: Settings) -> None:
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness awaited below
        [sys.executable, "-m", "broker", "consume", "analytics", "--workers", "3"],
        env=worker_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        async with Broker.open(settings) as broker:
            await live_workers(broker.consumer_store, "analytics", 3)
            gid = (await broker.start(request(sentences_text(5), rate=0))).id
            await consumed(broker.consumer_store, gid, "analytics")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("flag", [None, "--no-consumers"])
async def test_serve_runs_both_consumer_types_unless_told_not_to(
    settings: Settings, flag: str | None,
) -> None:
    async with serve_process(settings, *([flag] if flag else [])) as server, \
            httpx.AsyncClient(base_url=server.url) as http:
        created = await http.post("/v1/streams", json={
            "prompt": "p", "params": {"text": "One here. Two here.", "tokens_per_second": 0}})
        gid = created.json()["id"]
        async with Broker.open(settings) as broker:
            if flag is None:
                await consumed(broker.consumer_store, gid, "sentences", "analytics")
                body = (await http.get(f"/v1/streams/{gid}/sentences")).json()
                assert [s["text"] for s in body["sentences"]] == ["One here.", "Two here."]
                assert (await http.get(f"/v1/streams/{gid}/stats")).json()["tokens"] == 4
            else:
                async for _ in broker.events(gid):
                    pass
                types = await broker.redis.hgetall(broker.log.keyspace.consumer_types)
                assert types == {}
                assert (await broker.consumer_store.checkpoint(gid, "sentences")) is None
