"""Real broker processes: crash (SIGKILL), graceful stop (SIGTERM), cancel across processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from broker.embedded import free_loopback_port
from broker.events import Event
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import make_settings


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str


@contextlib.asynccontextmanager
async def serve_process(settings: Settings, *args: str) -> AsyncIterator[ServerProcess]:
    """``tokentee serve [args]`` as a child process on the test Redis, with the test's key
    prefix."""
    port = free_loopback_port()
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "TOKENTEE_KEY_PREFIX": settings.key_prefix,
        "TOKENTEE_LEASE_SECONDS": str(settings.lease_seconds),
        "TOKENTEE_SHUTDOWN_GRACE_SECONDS": str(settings.shutdown_grace_seconds),
        "TOKENTEE_BLOCK_MS": str(settings.block_ms),
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness is awaited below
        [sys.executable, "-m", "broker", "serve", "--port", str(port), "--log-level",
         "warning", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            # A process start has no event to await from outside: retry the health check,
            # bounded, until it answers.
            async with asyncio.timeout(20):
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "")
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get("/healthz")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)
        yield ServerProcess(proc, url)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def fast_settings(redis_url: str) -> Settings:
    return make_settings(redis_url, lease_seconds=1.0, shutdown_grace_seconds=0.5)


async def start(url: str, **params: object) -> str:
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/streams", json={"prompt": "p", "params": params})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


@pytest.mark.timeout(60)
async def test_killed_producer_process_ends_the_generation_for_readers(
    fast_settings: Settings,
) -> None:
    async with serve_process(fast_settings) as server, Broker.open(fast_settings) as reader:
        gid = await start(server.url, max_tokens=100_000, tokens_per_second=50)
        events: list[Event] = []
        async for event in reader.events(gid):
            events.append(event)
            if event.seq == 5:
                server.proc.send_signal(signal.SIGKILL)
        # Nothing hangs: the reader's hub notices the lost lease and ends the generation.
        assert events[-1].type == "error"
        assert events[-1].data["code"] == "producer_lost"
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        state = await reader.state(gid)
        assert state.meta.status == "error"


@pytest.mark.timeout(60)
async def test_sigterm_drains_and_exits_cleanly(fast_settings: Settings) -> None:
    async with serve_process(fast_settings) as server, Broker.open(fast_settings) as reader:
        short = await start(server.url, max_tokens=5, tokens_per_second=50)
        endless = await start(server.url, max_tokens=100_000, tokens_per_second=50)
        async with reader.subscribe(endless) as cursor:
            await anext(cursor)
            server.proc.send_signal(signal.SIGTERM)
            rest = [e async for e in cursor]
        assert rest[-1].type == "error"
        assert rest[-1].data["code"] == "shutdown"
        assert await asyncio.to_thread(server.proc.wait, 30) == 0
        # The short one finished within the grace period.
        assert (await reader.state(short)).meta.status == "done"


@pytest.mark.timeout(60)
async def test_cancel_posted_to_another_process(fast_settings: Settings) -> None:
    async with serve_process(fast_settings) as a, serve_process(fast_settings) as b:
        gid = await start(a.url, max_tokens=100_000, tokens_per_second=50)
        async with httpx.AsyncClient(base_url=b.url) as http:
            # Both processes serve the same generation: B reads it from the log.
            async with http.stream("GET", f"/v1/streams/{gid}/events") as response:
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if b"id: 3\n" in body and b"cancel" not in body:
                        accepted = await http.post(f"/v1/streams/{gid}/cancel")
                        assert accepted.status_code == 202
                        body += b"<cancel sent>"
            assert b"event: cancelled" in body
            assert (await http.get(f"/v1/streams/{gid}")).json()["status"] == "cancelled"
