"""``tokentee bench``: fan-out under load, measured from outside the hot path.

G generations of T tokens at TPS tokens/s each (simulated provider); R readers on each,
subscribed right after their generation is created.  Readers use the Python API in this
process (``via="api"``), or real SSE connections to a ``tokentee serve`` child process
(``via="sse"``).  Latency is a reader's receive time minus the producer's timestamp of the
entry, read back from the log with XRANGE after the run (SSE data carries no timestamp), so
both modes measure the same thing against the same wall clock (this machine's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs here (types-psutil)
import redis.asyncio as aioredis
from httpx_sse import SSEError, aconnect_sse
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from broker.connections import is_cluster_url, node_url
from broker.embedded import _parent_death_preexec, embedded_redis, free_loopback_port
from broker.errors import TokenteeError
from broker.events import TERMINAL_TYPES
from broker.keys import Keyspace, seq_of
from broker.providers.base import GenerationRequest
from broker.service import Broker
from broker.settings import Settings
from consumers.analytics import Analytics
from consumers.runtime import ConsumerType
from consumers.sentences import Sentences

logger = logging.getLogger(__name__)

_READY_SECONDS = 30.0
_STOP_SECONDS = 15.0
_KINDS = TERMINAL_TYPES | {"token", "gap"}
# What one reader or one generation start may fail with: it then counts as missing
# deliveries instead of ending the bench.
_FAILURES = (RedisError, TokenteeError, httpx.HTTPError, SSEError, ValueError, LookupError)


class BenchError(TokenteeError, RuntimeError):
    """The bench could not set up (the server process did not come up)."""


@dataclass
class _Reader:
    gid: str
    got: list[tuple[int, str, float]] = field(default_factory=list)  # seq, type, recv time
    error: str | None = None


@dataclass
class _Run:
    generations: int
    readers: int
    tokens: int
    rate: float
    probe: aioredis.Redis  # the bench's one Redis connection
    consumers: bool = False  # run the sentence logger and the analytics counter too
    results: list[_Reader] = field(default_factory=list)
    gids: list[str] = field(default_factory=list)
    timed_out: bool = False
    wall: float = 0.0
    clients: list[int] = field(default_factory=list)  # connected_clients, every 100 ms
    redis: list[dict[str, Any]] = field(default_factory=list)  # INFO at start and end


Create = Callable[[], Awaitable[tuple[str, str]]]  # -> (generation id, what readers follow)
Follow = Callable[[str, _Reader], Awaitable[None]]


async def run_bench(
    settings: Settings, *, generations: int, readers: int, tokens: int, rate: float, via: str,
    consumers: bool = False,
) -> bool:
    """Run the benchmark, print one JSON object on stdout, and return True if every reader
    got every entry (T tokens and the terminal one) exactly once and in order.

    A failing reader counts as missing deliveries.  Reading is cut off after
    ``3 * tokens / rate + 30`` seconds (``timed_out``).  The run uses a fresh key prefix and
    deletes its keys at the end.  Setup failure (no server) is logged and returns False.

    With ``consumers``, the broker also runs one sentence-logger and one analytics worker
    (backpressure on), and the report says when they had processed every generation.
    """
    if via not in ("api", "sse"):
        raise ValueError("via must be 'api' or 'sse'")
    limit = (tokens / rate if rate > 0 else 0.0) * 3 + 30
    keyspace = Keyspace(f"{settings.key_prefix[:40]}-bench-{secrets.token_hex(4)}")
    settings = settings.model_copy(update={"key_prefix": keyspace.prefix})
    async with contextlib.AsyncExitStack() as stack:
        url = settings.redis_url
        if url is None:
            url = await stack.enter_async_context(embedded_redis())
        probe = _probe(url, settings)
        stack.push_async_callback(probe.aclose)
        run = _Run(generations, readers, tokens, rate, probe, consumers)
        # Connected before the broker starts: this probe, and other clients of a shared Redis.
        outsiders = int((await _info(probe, "clients"))["connected_clients"])
        try:
            mode = _via_api if via == "api" else _via_sse
            process = await mode(settings, url, run, limit)
        except BenchError as exc:
            logger.error("bench setup failed: %s", exc)
            return False
        stamps = await _read_back(probe, keyspace, run.gids)
    report = _report(run, stamps, outsiders, process, via)
    print(json.dumps(report, indent=2))
    return bool(report["ok"])


def _probe(url: str, settings: Settings) -> aioredis.Redis:
    """The bench's own client: one connection, or one per node of a cluster."""
    if is_cluster_url(url, settings):
        return cast(aioredis.Redis, RedisCluster.from_url(
            node_url(url), decode_responses=True, socket_timeout=10, protocol=2))
    return aioredis.Redis.from_url(
        url, decode_responses=True, single_connection_client=True, socket_timeout=10,
        protocol=2,
    )


async def _info(probe: aioredis.Redis, section: str) -> dict[str, Any]:
    """``INFO section``; on a cluster the masters' numbers added up (the counters, and the
    calls of each command), with the first master's version."""
    if not isinstance(probe, RedisCluster):
        return await probe.info(section)
    per_node = cast(dict[str, dict[str, Any]],
                    await probe.info(section, target_nodes=RedisCluster.PRIMARIES))
    total: dict[str, Any] = {}
    for info in per_node.values():
        for key, value in info.items():
            if isinstance(value, dict) and "calls" in value:
                total.setdefault(key, {"calls": 0})["calls"] += int(value["calls"])
            elif isinstance(value, int | float) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
            else:
                total.setdefault(key, value)
    return total


async def _via_api(settings: Settings, url: str, run: _Run, limit: float) -> dict[str, Any]:
    types: list[ConsumerType] = [Sentences(), Analytics()] if run.consumers else []
    async with Broker.open(settings, redis_url=url, consumers=types) as broker:
        params = {"max_tokens": run.tokens, "tokens_per_second": run.rate}

        async def create() -> tuple[str, str]:
            request = GenerationRequest([{"role": "user", "content": "bench"}], params=params)
            info = await broker.start(request, "simulated")
            return info.id, info.id

        async def follow(gid: str, reader: _Reader) -> None:
            async for event in broker.events(gid):
                reader.got.append((event.seq, event.type, time.time()))

        me = psutil.Process()
        cpu, reads = _cpu(me), broker.hub.reads
        await _drive(run, create, follow, limit)
        measured = {"process": "the bench's own: readers, producers and hub share it",
                    "cpu_seconds": round(_cpu(me) - cpu, 3),
                    "rss_mb": round(me.memory_info().rss / 2**20, 1),
                    "hub_xread_calls": broker.hub.reads - reads}
        if run.consumers:  # before the consumers stop with the broker
            measured["consumers"] = await _consumer_report(settings, run, limit)
            measured["consumers"]["producer_holds"] = broker.gate.holds if broker.gate else 0
        # Cancel from a second broker (another process, as far as Redis can tell).
        async with Broker.open(settings, redis_url=url) as other:
            endless = GenerationRequest(
                [{"role": "user", "content": "bench"}],
                params={"max_tokens": 1_000_000, "tokens_per_second": 20},
            )

            async def start() -> str:
                return (await broker.start(endless, "simulated")).id

            async def cancel(gid: str) -> None:
                await other.cancel(gid)

            measured["cancel_ms"] = await _cancel_latency(run, settings, start, cancel)
        return measured


async def _via_sse(settings: Settings, url: str, run: _Run, limit: float) -> dict[str, Any]:
    port = free_loopback_port()  # if taken meanwhile, _wait_ready reports the exit
    env = {**os.environ, "REDIS_URL": url, "TOKENTEE_REDIS_URL": url,
           "TOKENTEE_KEY_PREFIX": settings.key_prefix, "TOKENTEE_HOST": "127.0.0.1",
           "TOKENTEE_CONSUMERS": "sentences,analytics" if run.consumers else "",
           "TOKENTEE_SENTENCES_SINK": "off",
           # Its own loopback server, every reader from this one process: no auth, no
           # per-client or per-process caps to measure around.
           "TOKENTEE_API_TOKENS": "", "TOKENTEE_MAX_SSE_PER_CLIENT": "0",
           "TOKENTEE_MAX_ACTIVE_GENERATIONS": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", "--port", str(port), "--log-level", "warning",
        env=env, stdout=asyncio.subprocess.DEVNULL,  # uvicorn's access log; stdout is ours
        preexec_fn=_parent_death_preexec(),  # SIGTERM if the bench is killed: no orphan
    )
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(30.0, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        ) as client:
            await _wait_ready(client, proc)
            body = {"prompt": "bench",
                    "params": {"max_tokens": run.tokens, "tokens_per_second": run.rate}}

            async def create() -> tuple[str, str]:
                response = await client.post("/v1/streams", json=body)
                response.raise_for_status()
                created = response.json()
                return str(created["id"]), str(created["events_url"])

            async def follow(events_url: str, reader: _Reader) -> None:
                async with aconnect_sse(client, "GET", events_url) as source:
                    source.response.raise_for_status()
                    async for sse in source.aiter_sse():
                        now = time.time()
                        if sse.event in _KINDS:  # not the shutdown frame's bare retry
                            reader.got.append((int(sse.id), sse.event, now))
                        if sse.event in TERMINAL_TYPES:
                            return
                reader.error = "stream ended before the terminal event"

            child, me = psutil.Process(proc.pid), psutil.Process()
            cpu, readers_cpu = _cpu(child), _cpu(me)
            await _drive(run, create, follow, limit)
            measured: dict[str, Any] = {
                "process": "a separate `tokentee serve` (readers are in the bench)",
                "cpu_seconds": round(_cpu(child) - cpu, 3),
                "rss_mb": round(child.memory_info().rss / 2**20, 1),
                # The SSE clients' own cost: on a small machine they compete with the
                # server for CPU, which shows in the latency.
                "bench_readers_cpu_seconds": round(_cpu(me) - readers_cpu, 3)}
            if run.consumers:  # before the server (and its consumers) stops
                measured["consumers"] = await _consumer_report(settings, run, limit)

            async def start() -> str:
                response = await client.post("/v1/streams", json={
                    "prompt": "bench",
                    "params": {"max_tokens": 1_000_000, "tokens_per_second": 20}})
                response.raise_for_status()
                return str(response.json()["id"])

            async def cancel(gid: str) -> None:
                (await client.post(f"/v1/streams/{gid}/cancel")).raise_for_status()

            measured["cancel_ms"] = await _cancel_latency(run, settings, start, cancel)
            return measured
    finally:
        await _stop(proc)


async def _cancel_latency(
    run: _Run, settings: Settings, start: Callable[[], Awaitable[str]],
    cancel: Callable[[str], Awaitable[None]], trials: int = 10,
) -> dict[str, Any]:
    """From the cancel request to the producer's ``cancelled`` entry (its own timestamp),
    for generations that are streaming when the cancel arrives."""
    keyspace = Keyspace(settings.key_prefix)
    samples: list[float] = []
    for _ in range(trials):
        gid = await start()
        run.gids.append(gid)  # read back and deleted with the rest
        log = keyspace.generation(gid).log
        await run.probe.xread({log: "0-0"}, block=5_000)  # it has started streaming
        requested = time.time()
        await cancel(gid)
        last, ended = "0-0", None
        while ended is None:
            reply = cast(list[tuple[str, list[tuple[str, dict[str, str]]]]],
                         await run.probe.xread({log: last}, block=5_000))
            if not reply:
                raise BenchError(f"generation {gid} was not cancelled within 5 s")
            for entry_id, fields in reply[0][1]:
                last = entry_id
                if fields["type"] == "cancelled":
                    ended = float(fields["ts"]) / 1000
        samples.append((ended - requested) * 1000)
    samples.sort()
    return {"p50": _percentile(samples, 0.5), "max": _percentile(samples, 1.0),
            "trials": trials}


async def _drive(run: _Run, create: Create, follow: Follow, limit: float) -> None:
    """Start every generation, its readers right after it is created, and the sampler."""

    async def read(target: str, reader: _Reader) -> None:
        try:
            await follow(target, reader)
        except _FAILURES as exc:
            reader.error = repr(exc)

    async def generation(tg: asyncio.TaskGroup) -> None:
        try:
            gid, target = await create()
        except _FAILURES as exc:
            run.results += [_Reader("", error=f"start: {exc!r}") for _ in range(run.readers)]
            return
        run.gids.append(gid)
        for _ in range(run.readers):
            run.results.append(reader := _Reader(gid))
            tg.create_task(read(target, reader))

    # Everything (CPU, Redis counters, wall time) is measured over this same window.
    run.redis.append(await _info(run.probe, "all"))
    started, stop = time.perf_counter(), asyncio.Event()
    async with asyncio.TaskGroup() as outer:
        outer.create_task(_sample(run, stop))
        try:
            async with asyncio.timeout(limit), asyncio.TaskGroup() as tg:
                for _ in range(run.generations):
                    tg.create_task(generation(tg))
        except TimeoutError:
            run.timed_out = True
        finally:
            run.wall = time.perf_counter() - started
            stop.set()
    run.redis.append(await _info(run.probe, "all"))


async def _sample(run: _Run, stop: asyncio.Event) -> None:
    # Ended by ``stop``, never cancelled: on Python 3.11 redis-py can swallow a cancellation
    # that lands in a command (its asyncio.wait_for around socket writes), and this loop would
    # then run forever.  A connection that lives less than 100 ms may go unseen.
    try:
        while not stop.is_set():
            run.clients.append(int((await _info(run.probe, "clients"))["connected_clients"]))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await stop.wait()
    except RedisError as exc:
        logger.warning("connection sampler stopped: %s", exc)


async def _wait_ready(client: httpx.AsyncClient, proc: asyncio.subprocess.Process) -> None:
    # Until the child has imported, connected to Redis and bound its port, connections are
    # refused and there is nothing to block on: retry, but for _READY_SECONDS at most, and
    # stop as soon as the child exits.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_READY_SECONDS):
            while proc.returncode is None:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
    raise BenchError(f"server not ready after {_READY_SECONDS:.0f}s "
                     f"(exit status: {proc.returncode})")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), _STOP_SECONDS)
    except TimeoutError:
        logger.warning("server still running %.0fs after SIGTERM; killing it", _STOP_SECONDS)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _read_back(
    probe: aioredis.Redis, keyspace: Keyspace, gids: list[str]
) -> dict[tuple[str, int], float]:
    """(gid, seq) -> the producer's timestamp (unix seconds); then delete the run's keys."""
    stamps: dict[tuple[str, int], float] = {}
    for gid in gids:
        keys = keyspace.generation(gid)
        entries = cast(list[tuple[str, dict[str, str]]], await probe.xrange(keys.log))
        for eid, fields in entries:
            stamps[(gid, seq_of(eid))] = float(fields["ts"]) / 1000  # stored in ms
    # Everything under the run's own prefix: logs, consumer checkpoints and outputs, ...
    async for key in probe.scan_iter(match=f"{keyspace.prefix}:*", count=1000):
        await probe.unlink(key)
    return stamps


async def _await_consumers(probe: aioredis.Redis, keyspace: Keyspace, gids: list[str],
                           limit: float) -> float | None:
    """Seconds until both consumer types had processed every generation (None: not within
    ``limit``).  Their progress is in Redis, so this re-checks it every 20 ms."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    keys = [keyspace.checkpoint(gid, t) for gid in gids for t in ("sentences", "analytics")]
    while loop.time() - start < limit:
        async with probe.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(key, "done")
            if all(done == "1" for done in cast(list[str | None], await pipe.execute())):
                return round(loop.time() - start, 3)
        await asyncio.sleep(0.02)
    return None


async def _consumer_report(settings: Settings, run: _Run, limit: float) -> dict[str, Any]:
    keyspace, probe = Keyspace(settings.key_prefix), run.probe
    after_readers = await _await_consumers(probe, keyspace, run.gids, limit)
    sentences = counted = 0
    for gid in run.gids:
        sentences += int(await probe.xlen(keyspace.output(gid, "sentences")))
        state = await probe.hget(keyspace.checkpoint(gid, "analytics"), "state")
        counted += int(json.loads(state or "{}").get("stats", {}).get("tokens", 0))
    return {
        "all_processed": after_readers is not None,
        "seconds_after_readers_finished": after_readers,
        "sentences_logged": sentences,
        "analytics_tokens": counted,
        "analytics_exact": counted == run.generations * run.tokens,
    }


def _report(
    run: _Run, stamps: dict[tuple[str, int], float], outsiders: int, process: dict[str, Any],
    via: str,
) -> dict[str, Any]:
    want = list(range(1, run.tokens + 2))
    all_arrived = in_order = True
    latencies: list[float] = []
    kinds: Counter[str] = Counter()
    for reader in run.results:
        seqs = [seq for seq, kind, _ in reader.got if kind != "gap"]  # a gap is no delivery
        all_arrived = all_arrived and sorted(seqs) == want
        in_order = in_order and seqs == list(range(1, len(seqs) + 1))
        kinds.update(kind for _, kind, _ in reader.got)
        latencies += [(t - stamps[(reader.gid, seq)]) * 1000 for seq, kind, t in reader.got
                      if kind == "token" and (reader.gid, seq) in stamps]
    latencies.sort()
    errors = Counter(r.error for r in run.results if r.error is not None)
    before, after = run.redis
    calls = Counter({k[8:]: v["calls"] - before.get(k, {}).get("calls", 0)
                     for k, v in after.items() if k.startswith("cmdstat_")})
    calls["info"] -= len(run.clients) + 1  # the sampler's and the opening INFO

    def delta(*names: str) -> float:
        return sum(float(after[n]) - float(before[n]) for n in names)

    ok = all_arrived and in_order and not run.timed_out
    peak = max(run.clients, default=0)
    return {
        "ok": ok, "via": via,
        "params": {"generations": run.generations, "readers": run.readers,
                   "tokens": run.tokens, "rate": run.rate},
        "python": platform.python_version(), "redis_version": str(after["redis_version"]),
        "wall_seconds": round(run.wall, 3), "timed_out": run.timed_out,
        "deliveries": {
            "expected": run.generations * run.readers * (run.tokens + 1),
            "received": sum(n for kind, n in kinds.items() if kind != "gap"),
            "all_arrived": all_arrived, "in_order": in_order, "by_type": dict(kinds),
            "readers_failed": sum(errors.values()), "errors": dict(errors.most_common(5)),
        },
        "tokens_per_second_delivered": round(kinds["token"] / run.wall, 1) if run.wall else 0.0,
        "latency_ms": {"p50": _percentile(latencies, 0.50), "p99": _percentile(latencies, 0.99),
                       "max": _percentile(latencies, 1.0), "samples": len(latencies)},
        "broker": process,
        "redis": {
            # connected_clients: "outside" were connected before the broker started (the
            # bench's one probe connection, other clients of a shared Redis) and are
            # subtracted; "idle" is the broker's own before any generation started.
            "clients_outside_broker": outsiders,
            "broker_connections_idle": int(before["connected_clients"]) - outsiders,
            "broker_connections_peak": peak - outsiders,
            "connections_opened": int(delta("total_connections_received")),
            # Over the load window, less the bench's own INFO calls.
            "cpu_seconds": round(delta("used_cpu_sys", "used_cpu_user"), 3),
            "commands_processed": int(delta("total_commands_processed")) - len(run.clients) - 1,
            "command_calls": dict(calls.most_common(10)),  # commands run by scripts included
        },
    }


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 2)


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)
