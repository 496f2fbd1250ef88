"""Readiness: whether this process should get traffic (``GET /readyz``).

:func:`readiness` runs :data:`READINESS_CHECKS`; a load balancer sends traffic only to a
replica that passes all of them.  (Liveness, ``GET /healthz``, answers from the process
alone, so an orchestrator restarts a process only when it is wedged, never because Redis is
down.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from broker.service import Broker

__all__ = ["READINESS_CHECKS", "ReadinessCheck", "readiness"]

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
    """The broker is not draining for shutdown (``Broker.draining``): a draining replica
    takes no new work, so it leaves the load balancer."""
    return "draining for shutdown" if broker.draining else None


#: Run in order by ``GET /readyz``; append ``(name, check)`` to add one.
READINESS_CHECKS: list[tuple[str, ReadinessCheck]] = [
    ("redis", redis_reachable),
    ("hub", hub_running),
    ("draining", not_draining),
]


async def readiness(broker: Broker) -> dict[str, str]:
    """Each check's outcome by name: ``"ok"`` or why it failed."""
    return {name: (await check(broker)) or "ok" for name, check in READINESS_CHECKS}
