"""Running the HTTP app under uvicorn, with shutdown wired to open event streams."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from broker.api import create_app
from broker.auth import install_redaction, warn_if_open
from broker.connections import check_reachable, command_client
from broker.service import Broker
from broker.settings import Settings


class TokenteeServer(uvicorn.Server):
    """uvicorn waits for open connections before it shuts the app down, and event streams
    never close on their own.  Setting ``shutdown_event`` first makes them end (each with a
    ``retry`` hint, so clients resume on another instance by ``Last-Event-ID``)."""

    def __init__(self, config: uvicorn.Config, shutdown_event: asyncio.Event) -> None:
        super().__init__(config)
        self.shutdown_event = shutdown_event

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.shutdown_event.set()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, minus re-raising the signal after shutdown: a drained stop on SIGTERM
        or Ctrl+C is a clean exit (status 0), which is what supervisors expect."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def build_server(
    settings: Settings, broker: Broker | None = None, *, log_level: str = "info",
    access_log: bool = True,
) -> TokenteeServer:
    shutdown = asyncio.Event()
    app = create_app(settings, broker=broker, shutdown=shutdown)
    # JSON logs: uvicorn's loggers go through the root handler that configure_logging()
    # installed, instead of uvicorn's own text handlers.
    log_config = None if settings.log_format == "json" else LOGGING_CONFIG
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level, log_config=log_config,
        access_log=access_log, lifespan="on",
        # X-Forwarded-For/-Proto from TOKENTEE_TRUSTED_PROXIES only (uvicorn's default
        # trusts loopback, which would let any local process pose as any client).
        proxy_headers=True, forwarded_allow_ips=settings.trusted_proxy_list,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
    )
    install_redaction(settings)  # after uvicorn.Config, which sets up uvicorn's log handlers
    return TokenteeServer(config, shutdown)


async def serve(settings: Settings, *, log_level: str = "info") -> None:
    """``tokentee serve``: the API until SIGINT/SIGTERM.  Raises :class:`RedisUnavailable`
    before listening if the configured Redis cannot be used (uvicorn would otherwise report
    it as a failed startup with a traceback)."""
    warn_if_open(settings)
    if settings.redis_url is not None:
        client = command_client(settings.redis_url, settings)
        try:
            await check_reachable(client, settings.redis_url)
        finally:
            await client.aclose()
    await build_server(settings, log_level=log_level, access_log=log_level == "debug").serve()
