"""Running consumer workers as processes: ``tokentee consume TYPE [--workers N]``.

One worker process is a :class:`~consumers.runtime.Worker` with its own Redis clients and
hub, running until SIGTERM or SIGINT, then draining (exit status 0).  With ``--workers N`` a
small supervisor starts N such processes, passes SIGTERM/SIGINT on to them, restarts one
that dies while the supervisor is not stopping, and exits when all have drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import subprocess
import sys
import time

from broker.connections import blocking_client, check_reachable, command_client
from broker.errors import ConsumerConfigError
from broker.hub import Hub
from broker.log import GenerationLog
from broker.settings import Settings
from consumers.analytics import Analytics
from consumers.runtime import ConsumerType, running_workers
from consumers.sentences import Sentences

logger = logging.getLogger(__name__)


def load_consumer_type(spec: str, settings: Settings) -> ConsumerType:
    """``sentences``, ``analytics``, or ``package.module:ClassName`` for your own type (a
    :class:`ConsumerType` subclass constructible without arguments)."""
    if spec == "sentences":
        return Sentences.from_settings(settings)
    if spec == "analytics":
        return Analytics()
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConsumerConfigError(
            f"unknown consumer type {spec!r}: use sentences, analytics or module:Class"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConsumerConfigError(f"cannot load consumer type {spec!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, ConsumerType)):
        raise ConsumerConfigError(f"{spec!r} is not a ConsumerType subclass")
    return cls()


async def run_worker(settings: Settings, ctype: ConsumerType,
                     stop: asyncio.Event | None = None) -> int:
    """One worker of ``ctype`` until ``stop`` is set (default: SIGTERM or SIGINT), then drain.
    Returns the exit status: 0, or 1 if the worker failed (a bug, logged) and should be
    restarted."""
    url = settings.redis_url
    if url is None:
        raise ConsumerConfigError(
            "a consumer worker needs the broker's Redis: set REDIS_URL (or TOKENTEE_REDIS_URL)"
        )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    redis = command_client(url, settings)
    hub_redis = blocking_client(url, settings, "hub")
    try:
        await check_reachable(redis, url)
        log = GenerationLog.for_settings(redis, settings)
        async with Hub(log, hub_redis, settings, reap=False) as hub, running_workers(
            [ctype], settings, redis_url=url, redis=redis, log=log, hub=hub,
        ) as (worker,):
            waits = [asyncio.create_task(stop.wait()), asyncio.create_task(worker.failed.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
            logger.info("consumer %s: stopping (draining for up to %.0f s)", ctype.name,
                        settings.shutdown_grace_seconds)
        return 1 if worker.failed.is_set() else 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await hub_redis.aclose()
        await redis.aclose()


def supervise(spec: str, workers: int, settings: Settings, log_level: str = "info") -> int:
    """Run ``workers`` worker processes of ``spec``; returns the exit status.

    A child that exits while the supervisor is not stopping is restarted after a delay that
    doubles with each quick failure (1 s up to 60 s, reset once a child ran for a minute), so
    an unreachable Redis is not hammered.  SIGTERM/SIGINT are passed on to the children;
    the status is 0 if they all drained cleanly (a child that the forwarded signal ended
    before it could handle it counts as clean), else the first failure's (128 + signal for
    a child killed by another signal).
    """
    load_consumer_type(spec, settings).close()  # fail here, once, on a bad spec or sink
    if settings.redis_url is None:
        raise ConsumerConfigError(
            "a consumer worker needs the broker's Redis: set REDIS_URL (or TOKENTEE_REDIS_URL)"
        )
    command = [sys.executable, "-m", "broker", "consume", spec, "--workers", "1",
               "--log-level", log_level, "--log-format", settings.log_format]
    forwarded: set[int] = set()

    def stop(signum: int, _frame: object) -> None:
        forwarded.add(signum)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    # The children inherit the environment, so they see the same settings.
    children = [subprocess.Popen(command) for _ in range(workers)]
    started = {child.pid: time.monotonic() for child in children}
    delay, restart_at = 0.5, 0.0  # the first quick failure waits 1 s
    waiting = 0  # children to start at restart_at
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        while children or (waiting and not forwarded):
            for child in list(children):
                code = child.poll()
                if code is None:
                    continue
                children.remove(child)
                if forwarded:
                    if code != 0 and -code not in forwarded:
                        status = status or (128 - code if code < 0 else code)
                    continue
                ran = time.monotonic() - started.pop(child.pid, 0.0)
                delay = 1.0 if ran > 60 else min(delay * 2, 60.0)
                logger.error("consumer %s worker (pid %d) exited with %d; restarting in"
                             " %.0f s", spec, child.pid, code, delay)
                waiting += 1
                restart_at = time.monotonic() + delay
            if waiting and not forwarded and time.monotonic() >= restart_at:
                for _ in range(waiting):
                    child = subprocess.Popen(command)
                    children.append(child)
                    started[child.pid] = time.monotonic()
                waiting = 0
            time.sleep(0.2)  # a supervisor of a handful of children: waitpid polling is fine
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
