"""Redis clients, built from the settings in one place.

Two kinds of connection, never mixed:

- the *command* client: a ``BlockingConnectionPool`` shared by producers, request handlers and
  catch-up reads; it waits for a free connection instead of raising "Too many connections";
- *blocking* clients: one dedicated connection each, for the hub's and the control
  listener's ``XREAD BLOCK``.  A blocking read holds its connection for the whole block time,
  so it must not sit in the shared pool.

Every connection gets a socket timeout above the BLOCK time (never ``None``), and RESP2 is
pinned so that reply shapes do not change with the redis-py default (8.x switched to RESP3).
redis-py >= 5 disconnects a connection whose read was cancelled, so a cancelled blocking read
never hands a connection with an unread reply to the next user (CVE-2023-28858 class);
``tests/test_connections.py`` checks that property.

Redis Cluster: a URL ``redis+cluster://host:port`` (``rediss+cluster://`` with TLS), or any
``redis://``/``rediss://`` URL with ``TOKENTEE_REDIS_CLUSTER=true``, names a cluster by one or
more of its nodes.  Both kinds of client are then redis-py's ``RedisCluster``, which keeps a
pool per node, routes each command to the node that owns its key's slot and follows
``MOVED``/``ASK`` and failovers.  It has the same command methods as ``Redis``; it is typed as
``Redis`` here so that the rest of the code is written once.  Every multi-key command the
broker sends stays inside one hash slot (see ``broker/keys.py``), and the hub reads each slot
separately (``broker/hub.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.errors import RedisUnavailable
from broker.settings import Settings


def _common(url: str, settings: Settings, role: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        # Named connections: ``CLIENT LIST`` shows which broker role holds which connection.
        "client_name": f"{settings.key_prefix}:{role}",
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": 10.0,
        "protocol": 2,
        "decode_responses": False,
        "health_check_interval": 30,
    }
    if not url.startswith("unix:"):
        options["socket_keepalive"] = True  # TCP only; unix connections refuse the option
    return options


_STREAM_READS = ("XREAD", "XREADGROUP")
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# The cluster client opens connections per node as needed up to this many per node and then
# raises (it cannot wait for a free one as ``BlockingConnectionPool`` does), so its cap is a
# multiple of the standalone pool's.
_CLUSTER_CONNECTIONS_PER_POOL_SLOT = 8
# Cap per node for the hub (one connection per slot it reads at once) and for the client that
# a broker's channel, catalog and records readers share on a cluster (one per reader).
_MANY_CLUSTER_CONNECTIONS = 16_384


def is_cluster_url(url: str, settings: Settings | None = None) -> bool:
    """Whether ``url`` names a Redis Cluster (its scheme, or ``settings.redis_cluster`` for a
    TCP URL: a unix socket, such as the embedded Redis's, is never a cluster)."""
    scheme = url.partition("://")[0].lower()
    if scheme in CLUSTER_SCHEMES:
        return True
    return scheme in ("redis", "rediss") and settings is not None and settings.redis_cluster


def node_url(url: str) -> str:
    """``url`` with a ``redis+cluster`` scheme turned into the plain one redis-py parses."""
    scheme, sep, rest = url.partition("://")
    return CLUSTER_SCHEMES.get(scheme.lower(), scheme) + sep + rest


class ClusterUnavailable(ClusterError):
    """A cluster failure that redis-py raises outside ``RedisError`` (no node serves a slot
    during a failover, no node could be reached, a connection torn down while in use),
    re-raised as a ``RedisError`` so that every retry loop and error mapping that handles
    Redis failures handles it too."""


# Where a connection that was closed under a command in flight fails with a bare
# AttributeError or TypeError instead of ConnectionError: redis-py's connection code (its
# ``_writer`` is None after a concurrent disconnect; the cluster client disconnects every
# connection of a node when it reloads its slot map in a failover) and asyncio's transport
# (redis-py issue #4287).  redis-py disconnects that connection before the error leaves it.
_CONNECTION_INTERNALS = (
    "/redis/asyncio/connection.py", "/asyncio/streams.py", "/asyncio/selector_events.py",
    "/asyncio/sslproto.py",
)


def _torn_down(exc: AttributeError | TypeError) -> bool:
    """Whether ``exc`` was raised inside a connection's or transport's own code (a connection
    closed while in use), not by a caller's mistake."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(_CONNECTION_INTERNALS)


def _unavailable(exc: RedisClusterException | AttributeError | TypeError
                 ) -> ClusterUnavailable | None:
    """``exc`` as a :class:`ClusterUnavailable`, or None for an error that is not a failure
    of the cluster or of a connection (to be raised as it is)."""
    if isinstance(exc, RedisClusterException):
        return ClusterUnavailable(str(exc))
    if _torn_down(exc):
        return ClusterUnavailable(f"connection closed while in use ({exc})")
    return None


# Failures after which the same write may well succeed: a lost or timed-out connection, and
# a cluster in the middle of a failover (CLUSTERDOWN until the replica is promoted, TRYAGAIN,
# or no node reachable while redis-py reloads its slot map).
TRANSIENT_ERRORS: tuple[type[RedisError], ...] = (
    RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError, ClusterUnavailable,
)


class _Cluster(RedisCluster):
    async def aclose(self) -> None:
        """Close every node's connections, also where redis-py's own ``aclose`` closes
        nothing: after a read failed (a timeout, a node failing over) redis-py marks the
        client for reinitialization and then treats it as never opened, so a broker stopped
        at that moment would leak its blocking connections."""
        await super().aclose()
        manager = self.nodes_manager
        nodes = {id(node): node for node in (*manager.nodes_cache.values(),
                                             *manager.startup_nodes.values())}
        await asyncio.gather(*(node.disconnect() for node in nodes.values()),
                             return_exceptions=True)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if args and args[0] in _STREAM_READS and "target_nodes" not in kwargs:
                node = await self._node_of_streams(args)
                if node is not None:
                    kwargs["target_nodes"] = node
            return await super().execute_command(*args, **kwargs)
        except (RedisClusterException, AttributeError, TypeError) as exc:
            if (unavailable := _unavailable(exc)) is None:
                raise
            raise unavailable from exc

    async def _node_of_streams(self, args: tuple[Any, ...]) -> ClusterNode | None:
        """The node that serves the streams of an ``XREAD``/``XREADGROUP`` (all in one slot).

        redis-py would first ask a node for the command's keys (``COMMAND GETKEYS``: one
        more round trip per blocking read); the keys follow ``STREAMS``, half of the rest.
        ``MOVED`` is still followed; after a connection error the map is reloaded here."""
        for i, arg in enumerate(args):
            if arg in (b"STREAMS", "STREAMS"):  # the first one (group names are lowercase)
                keys = args[i + 1:i + 1 + (len(args) - i - 1) // 2]
                slots = {self.keyslot(key) for key in keys}
                if len(slots) != 1:
                    return None  # let redis-py refuse it as it would
                await self.initialize()  # a no-op unless the map is missing or stale
                return self.nodes_manager.get_node_from_slot(slots.pop())
        return None

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None
                 ) -> ClusterPipeline:
        if shard_hint:
            raise ClusterUnavailable("shard_hint is not supported in cluster mode")
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True
                      ) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except (RedisClusterException, AttributeError, TypeError) as exc:
            if (unavailable := _unavailable(exc)) is None:
                raise
            raise unavailable from exc


def _cluster(url: str, settings: Settings, role: str, per_node: int) -> aioredis.Redis:
    client = _Cluster.from_url(
        node_url(url), max_connections=per_node, **_common(url, settings, role)
    )
    return cast(aioredis.Redis, client)  # same command methods; see the module docstring


def command_client(url: str, settings: Settings) -> aioredis.Redis:
    """The shared client for non-blocking commands (waits for a free pooled connection)."""
    if is_cluster_url(url, settings):
        return _cluster(url, settings, "commands",
                        settings.redis_max_connections * _CLUSTER_CONNECTIONS_PER_POOL_SLOT)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=settings.redis_max_connections, timeout=30,
        **_common(url, settings, "commands"),
    )
    return aioredis.Redis.from_pool(pool)


def blocking_client(url: str, settings: Settings, role: str = "reader", *,
                    many: bool = False) -> aioredis.Redis:
    """A client with exactly one connection, for one long blocking reader.

    On a cluster: a client with at most one connection per node, except for the hub
    (``role="hub"``), which holds one connection per hash slot it reads (``broker/hub.py``),
    and with ``many``, a client shared by concurrent blocking readers, one connection each.
    """
    if is_cluster_url(url, settings):
        many = many or role == "hub"
        return _cluster(url, settings, role, _MANY_CLUSTER_CONNECTIONS if many else 2)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=1, timeout=30, **_common(url, settings, role)
    )
    return aioredis.Redis.from_pool(pool)


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that redis-py swallowed.

    On Python 3.11 ``asyncio.wait_for`` returns the inner result instead of raising when the
    caller is cancelled just as the inner call completes (CPython gh-86296, fixed in 3.12),
    and redis-py sends every command through ``wait_for`` when a socket timeout is set.  A
    task cancelled at that moment would go on as if nothing happened, and a loop that is
    only ever left by cancellation (the hub's reader, a cursor) would never end.  Call this
    after Redis awaits in such loops: the pending cancellation still shows in
    ``Task.cancelling()``.  Not for code that deliberately handles a cancellation and then
    goes on using Redis (a producer writing its ``cancelled`` entry).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pipelined_script(
    client: aioredis.Redis, script: AsyncScript,
    calls: Sequence[tuple[Sequence[str], Sequence[str | int]]],
) -> list[Any]:
    """Run ``script`` once per ``(keys, args)`` of ``calls`` in one pipeline; the replies in
    order.  The first error reply is raised (after the whole pipeline ran).

    A pipeline does not load missing scripts the way a single call does: after a Redis
    restart or ``SCRIPT FLUSH``, the script is loaded and the pipeline sent again (the
    scripts run this way must be safe to repeat).  redis-py's cluster pipeline refuses
    ``EVALSHA``; there each call is an ``EVAL``, which it routes by key.
    """
    cluster = isinstance(client, RedisCluster)
    source = cast(str, script.script)  # registered from a str
    for attempt in range(2):
        async with client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                if cluster:
                    pipe.eval(source, len(keys), *keys, *args)
                else:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
            await client.script_load(source)
            continue
        break
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def clock_ms(time_reply: tuple[bytes | int, bytes | int] | list[bytes | int]) -> int:
    """Redis's clock in ms from a ``TIME`` reply: the one clock that workers and brokers on
    different machines share."""
    return int(time_reply[0]) * 1000 + int(time_reply[1]) // 1000


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def check_reachable(client: aioredis.Redis, url: str) -> None:
    """PING through ``client``; any failure (unreachable, refused credentials, TLS
    verification) becomes :class:`RedisUnavailable`, naming ``url`` without its password."""
    try:
        await client.ping()
    except RedisError as exc:
        raise RedisUnavailable(f"cannot use Redis at {redact_url(url)}: {exc}") from exc
