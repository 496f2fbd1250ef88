"""``GET /readyz``: readiness, for a load balancer.

It runs :data:`READINESS_CHECKS`; a load balancer sends traffic only to a replica that
passes all of them.  (``/healthz``, liveness, answers from the process alone, so an
orchestrator restarts a process only when it is wedged, never because Redis is down.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from broker.service import Broker

#: A readiness check: ``None`` if the broker passes it, else why it does not.
ReadinessCheck = Callable[[Broker], Awaitable[str | None]]


async def redis_reachable(broker: Broker) -> str | None:
    """Redis answers ``PING`` within ``ready_timeout_seconds``."""
    timeout = broker.settings.ready_timeout_seconds
    try:
        async with asyncio.timeout(timeout):
            await broker.redis.ping()
    except TimeoutError:
        broker.metrics.redis_error("ready")
        return f"redis did not answer PING within {timeout:g} s"
    except RedisError as exc:
        broker.metrics.redis_error("ready")
        return f"redis: {exc}"
    return None


async def hub_running(broker: Broker) -> str | None:
    """The hub's reader and reaper tasks run (without them no reader gets new events)."""
    return None if broker.hub.running else "the hub's reader is not running"


async def not_draining(broker: Broker) -> str | None:
    """The broker is not draining for shutdown (``Broker.draining``, where the broker has
    that flag): a draining replica takes no new work, so it leaves the load balancer."""
    return "draining for shutdown" if getattr(broker, "draining", False) else None


#: Run in order by ``GET /readyz``; append ``(name, check)`` to add one.
READINESS_CHECKS: list[tuple[str, ReadinessCheck]] = [
    ("redis", redis_reachable),
    ("hub", hub_running),
    ("draining", not_draining),
]


async def readiness(broker: Broker) -> dict[str, str]:
    """Each check's outcome by name: ``"ok"`` or why it failed."""
    return {name: (await check(broker)) or "ok" for name, check in READINESS_CHECKS}


def add_readiness_route(app: FastAPI) -> None:
    """Register ``GET /readyz`` on ``app`` (whose ``state.broker`` is the broker)."""

    @app.get("/readyz", responses={503: {"description": "A readiness check failed."}})
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: 200 if every check passes, else 503 naming the checks that failed."""
        checks = await readiness(request.app.state.broker)
        failed = [name for name, outcome in checks.items() if outcome != "ok"]
        if failed:
            return JSONResponse({"status": "unavailable", "failed": failed, "checks": checks},
                                status_code=503)
        return JSONResponse({"status": "ready", "checks": checks})
