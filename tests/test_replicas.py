"""Several replicas on one Redis: real ``tokentee serve`` processes (``python -m broker serve``
from this tree), killed, stopped and drained, with clients that move between them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse

from broker.embedded import free_loopback_port
from broker.events import TERMINAL_TYPES
from broker.log import GenerationLog
from broker.providers.base import GenerationRequest
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import delete_prefix, make_settings, running_server

ROOT = Path(__file__).resolve().parent.parent
LEASE = 1.5


class Replica:
    """One ``tokentee serve`` child process.  Its stderr is read by a thread into ``lines``,
    so a test can await a log line."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.name = name
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),  # this tree's broker, not an installed one
            "REDIS_URL": settings.redis_url or "",
            "TOKENTEE_KEY_PREFIX": settings.key_prefix,
            "TOKENTEE_LEASE_SECONDS": str(settings.lease_seconds),
            "TOKENTEE_SHUTDOWN_GRACE_SECONDS": str(settings.shutdown_grace_seconds),
            "TOKENTEE_BLOCK_MS": str(settings.block_ms),
            "TOKENTEE_WATCHDOG": str(settings.watchdog).lower(),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--port", str(self.port),
             "--log-level", "warning", "--no-consumers"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._loop = asyncio.get_running_loop()
        self._logged = asyncio.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._loop.call_soon_threadsafe(self._logged.set)
        self._loop.call_soon_threadsafe(self._logged.set)

    async def logged(self, *parts: str) -> str:
        """Wait for a stderr line that contains every one of ``parts``."""
        while True:
            self._logged.clear()
            for line in self.lines:
                if all(p in line for p in parts):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"{self.name} exited without logging {parts}")
            await self._logged.wait()

    async def ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.url) as http, asyncio.timeout(30):
            # A process start has no event to await from outside: retry the health
            # check, bounded, until it answers.
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{''.join(self.lines)}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.05)

    async def exit_status(self) -> int:
        return await asyncio.to_thread(self.proc.wait, 30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot die of SIGKILL
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stderr:
            self.proc.stderr.close()


@contextlib.asynccontextmanager
async def replicas(settings: Settings, count: int = 2) -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for i in range(count):
            started.append(Replica(settings, "AB"[i]))
        await asyncio.gather(*(r.ready() for r in started))
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture
async def fast(redis_url: str) -> AsyncIterator[Settings]:
    s = make_settings(redis_url, lease_seconds=LEASE, shutdown_grace_seconds=5.0)
    yield s
    await delete_prefix(redis_url, s.key_prefix)


@pytest.fixture
async def client(fast: Settings) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.from_url(fast.redis_url or "", socket_timeout=10)
    yield c
    await c.aclose()


async def start(url: str, **params: object) -> str:
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/streams", json={"prompt": "p", "params": params})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


async def status(url: str, gid: str) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.get(f"/v1/streams/{gid}")
        assert response.status_code == 200
        return dict(response.json())


@dataclass
class Reading:
    """What one SSE client saw, over however many connections."""

    events: list[tuple[int, str, dict[str, object]]] = field(default_factory=list)
    retry_hints: int = 0
    connections: int = 0

    @property
    def last_id(self) -> int:
        return self.events[-1][0] if self.events else 0

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1][1] in TERMINAL_TYPES

    @property
    def text(self) -> str:
        return "".join(str(d["text"]) for _, t, d in self.events if t == "token")


async def read_sse(url: str, gid: str, reading: Reading, *,
                   progressed: asyncio.Event | None = None, after: int = 3) -> None:
    """One connection: events after ``reading.last_id`` (sent as ``Last-Event-ID``) until
    the stream ends, by a terminal event or by the server closing it.  ``progressed`` is
    set once ``after`` events were read on this connection."""
    headers = {"Last-Event-ID": str(reading.last_id)} if reading.last_id else {}
    reading.connections += 1
    seen = 0
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as http, \
            aconnect_sse(http, "GET", f"/v1/streams/{gid}/events", headers=headers) as source:
        source.response.raise_for_status()
        async for sse in source.aiter_sse():
            if sse.retry is not None:
                reading.retry_hints += 1
            if not sse.data:
                continue
            reading.events.append((int(sse.id), sse.event, json.loads(sse.data)))
            seen += 1
            if progressed is not None and seen >= after:
                progressed.set()


async def producers_gone(replica: Replica) -> None:
    """Wait until ``replica`` runs no producer.  Another process's task has no event to
    await from here: ask its health check, bounded, until it says so."""
    async with httpx.AsyncClient(base_url=replica.url) as http, asyncio.timeout(10):
        while True:
            if not (await http.get("/healthz")).json()["producers"]:
                return
            await asyncio.sleep(0.05)


async def log_events(client: aioredis.Redis, log: GenerationLog, gid: str
                     ) -> list[tuple[int, str, dict[str, object]]]:
    """The generation's log up to its terminal entry, read with blocking XREADs on the key
    itself, outside any broker (so no broker's hub has a reader for it)."""
    key, last = log.keys(gid).log, "0-0"
    out: list[tuple[int, str, dict[str, object]]] = []
    while not out or out[-1][1] not in TERMINAL_TYPES:
        reply = await client.xread({key: last}, block=1_000, count=100)
        for _key, entries in reply or []:
            for eid, fields in entries:
                last = eid.decode()
                out.append((int(last.split("-")[1]), fields[b"type"].decode(),
                            json.loads(fields[b"data"])))
    return out


def check_contiguous(events: list[tuple[int, str, dict[str, object]]]) -> None:
    assert [seq for seq, _, _ in events] == list(range(1, len(events) + 1))
    assert sum(1 for _, t, _ in events if t in TERMINAL_TYPES) == 1


# --- any replica serves any generation ---------------------------------------------------


@pytest.mark.timeout(90)
async def test_created_on_a_read_and_cancelled_through_b(fast: Settings) -> None:
    async with replicas(fast) as (a, b):
        # A short one read whole on B is the text A's producer wrote.
        short = await start(a.url, max_tokens=30, tokens_per_second=200)
        whole = Reading()
        await read_sse(b.url, short, whole)
        check_contiguous(whole.events)
        assert whole.events[-1][1] == "done"
        assert whole.text == (await status(a.url, short))["text"]
        # A long one: read on B, cancelled through B, and the producer on A stops.
        gid = await start(a.url, max_tokens=100_000, tokens_per_second=50)
        reading = Reading()
        progressed = asyncio.Event()
        reader = asyncio.create_task(read_sse(b.url, gid, reading, progressed=progressed))
        try:
            async with asyncio.timeout(20):
                await progressed.wait()
                async with httpx.AsyncClient(base_url=b.url) as http:
                    accepted = await http.post(f"/v1/streams/{gid}/cancel")
                assert accepted.status_code == 202
                assert accepted.json()["status"] == "running"  # the producer is on A
                await reader
        finally:
            reader.cancel()
        check_contiguous(reading.events)
        assert reading.events[-1][1:] == ("cancelled", {"reason": "requested"})
        assert (await status(a.url, gid))["status"] == "cancelled"
        await producers_gone(a)


# --- producer death ------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_killing_the_owner_ends_its_generations_with_producer_lost_within_the_lease(
    fast: Settings, client: aioredis.Redis,
) -> None:
    log = GenerationLog.for_settings(client, fast)
    async with replicas(fast) as (a, b):
        read = await start(a.url, max_tokens=100_000, tokens_per_second=50)
        unread = await start(a.url, max_tokens=100_000, tokens_per_second=50)
        reading = Reading()
        progressed = asyncio.Event()
        reader = asyncio.create_task(read_sse(b.url, read, reading, progressed=progressed))
        quiet = asyncio.create_task(log_events(client, log, unread))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(30):
                await progressed.wait()
                a.proc.send_signal(signal.SIGKILL)
                killed = loop.time()
                await reader
                read_ended = loop.time() - killed
                unread_events = await quiet
                unread_ended = loop.time() - killed
        finally:
            reader.cancel()
            quiet.cancel()
        # B's SSE client got the terminal entry: no reader hangs.
        check_contiguous(reading.events)
        assert reading.events[-1][1] == "error"
        assert reading.events[-1][2]["code"] == "producer_lost"
        # So did the generation nobody read through any broker.
        check_contiguous(unread_events)
        assert unread_events[-1][2]["code"] == "producer_lost"
        # Within the lease timeout of the kill (plus scheduling slack on a busy machine),
        # where a reader's hub alone would take one to two leases.
        assert read_ended < LEASE + 1.5
        assert unread_ended < LEASE + 1.5
        assert (await status(b.url, unread))["status"] == "error"


@pytest.mark.timeout(90)
async def test_a_stale_producer_cannot_append_after_losing_its_lease(
    fast: Settings, client: aioredis.Redis,
) -> None:
    log = GenerationLog.for_settings(client, fast)
    async with replicas(fast) as (a, b):
        gid = await start(a.url, max_tokens=100_000, tokens_per_second=50)
        reading = Reading()
        progressed = asyncio.Event()
        reader = asyncio.create_task(read_sse(b.url, gid, reading, progressed=progressed))
        try:
            async with asyncio.timeout(30):
                await progressed.wait()
                # A hangs (a stopped VM, a blocked event loop) for longer than its lease.
                a.proc.send_signal(signal.SIGSTOP)
                await reader  # B's watchdog ends the generation meanwhile
                ended = await client.xrange(log.keys(gid).log)
                a.proc.send_signal(signal.SIGCONT)
                # A wakes up, tries to go on, is refused, and stops its producer.
                await a.logged(gid, "producer stops")
        finally:
            reader.cancel()
        assert reading.events[-1][1] == "error"
        assert reading.events[-1][2]["code"] == "producer_lost"
        # Nothing was appended after the terminal entry, and the lease was not taken back.
        assert await client.xrange(log.keys(gid).log) == ended
        meta = await log.meta(gid)
        assert meta is not None
        assert meta.last_seq == reading.events[-1][0]
        assert not await client.exists(log.keys(gid).lease)
        await producers_gone(a)
        # A itself is fine: it takes new work and stops cleanly.
        fresh = await start(a.url, max_tokens=5, tokens_per_second=0)
        assert await log_events(client, log, fresh)
        a.proc.send_signal(signal.SIGTERM)
        assert await a.exit_status() == 0


# --- graceful shutdown ------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_sigterm_sends_readers_to_the_other_replica_with_nothing_lost(
    fast: Settings,
) -> None:
    async with replicas(fast) as (a, b):
        # Produced on A (the one to stop) and on B, all read through A; long enough to be
        # mid-stream at the SIGTERM, short enough to finish within A's grace period.
        gids = [await start(r.url, max_tokens=120, tokens_per_second=60)
                for r in (a, a, a, b, b)]
        readings = [Reading() for _ in gids]
        progress = [asyncio.Event() for _ in gids]
        first = [asyncio.create_task(read_sse(a.url, gid, reading, progressed=event))
                 for gid, reading, event in zip(gids, readings, progress, strict=True)]
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(event.wait() for event in progress))
                a.proc.send_signal(signal.SIGTERM)
                # A ends every open stream with a retry hint (no terminal event) ...
                await asyncio.gather(*first)
                for reading in readings:
                    assert reading.retry_hints == 1
                    assert not reading.ended
                # ... and each client resumes on B by Last-Event-ID.
                await asyncio.gather(*(read_sse(b.url, gid, reading)
                                       for gid, reading in zip(gids, readings, strict=True)))
                assert await a.exit_status() == 0
        finally:
            for task in first:
                task.cancel()
        for gid, reading in zip(gids, readings, strict=True):
            assert reading.connections == 2
            check_contiguous(reading.events)  # no gap, no duplicate at the seam
            assert reading.events[-1][1] == "done"
            final = await status(b.url, gid)
            assert final["status"] == "done"
            assert reading.text == final["text"]


@pytest.mark.timeout(90)
async def test_sigterm_ends_what_outlasts_the_grace_period_with_a_shutdown_error(
    redis_url: str, client: aioredis.Redis,
) -> None:
    grace = 1.5
    settings = make_settings(redis_url, lease_seconds=LEASE, shutdown_grace_seconds=grace)
    try:
        async with replicas(settings) as (a, b):
            endless = await start(a.url, max_tokens=100_000, tokens_per_second=50)
            short = await start(a.url, max_tokens=20, tokens_per_second=40)  # about 0.5 s
            reading = Reading()
            progressed = asyncio.Event()
            reader = asyncio.create_task(read_sse(b.url, endless, reading,
                                                  progressed=progressed))
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(30):
                    await progressed.wait()
                    a.proc.send_signal(signal.SIGTERM)
                    stopped = loop.time()
                    await reader
                    ended = loop.time() - stopped
                    assert await a.exit_status() == 0
            finally:
                reader.cancel()
            check_contiguous(reading.events)
            assert reading.events[-1][1] == "error"
            assert reading.events[-1][2]["code"] == "shutdown"
            assert grace - 0.2 < ended < grace + 3.0
            assert (await status(b.url, endless))["status"] == "error"
            # What could finish within the grace period did.
            assert (await status(b.url, short))["status"] == "done"
    finally:
        await delete_prefix(redis_url, settings.key_prefix)


async def test_a_draining_broker_refuses_new_generations_with_503(fast: Settings) -> None:
    async with Broker.open(fast) as broker, running_server(fast, broker) as url:
        running = await start(url, max_tokens=10, tokens_per_second=20)  # about 0.5 s
        assert not broker.draining
        broker.drain()
        assert broker.draining
        async with httpx.AsyncClient(base_url=url) as http:
            refused = await http.post("/v1/streams", json={"prompt": "p"})
            assert refused.status_code == 503
            assert "shutting down" in refused.json()["detail"]
            assert refused.headers["retry-after"] == "1"
            chat = await http.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert chat.status_code == 503
            # The load balancer takes it out of rotation.
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["failed"] == ["draining"]
            # What runs goes on, and can still be read and cancelled.
            events = [e async for e in broker.events(running)]
        assert events[-1].type == "done"


async def test_the_grace_period_counts_from_the_drain(redis_url: str) -> None:
    settings = make_settings(redis_url, shutdown_grace_seconds=0.5)
    async with Broker.open(settings) as broker:
        info = await broker.start(GenerationRequest(
            messages=[{"role": "user", "content": "hi"}],
            params={"max_tokens": 100_000, "tokens_per_second": 50}))
        loop = asyncio.get_running_loop()
        drained = loop.time()
        broker.drain()
        broker.drain()  # idempotent: the deadline does not move
        # The broker is still open: the deadline does not wait for it to close (a
        # non-streaming request waiting for its generation gets its answer).
        events = [e async for e in broker.events(info.id)]
        elapsed = loop.time() - drained
        await broker.manager.wait(info.id)
        assert broker.manager.active == []
    assert events[-1].type == "error"
    assert events[-1].data["code"] == "shutdown"
    assert 0.4 < elapsed < 3.0


