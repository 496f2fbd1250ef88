"""Authentication, CORS and limits as FastAPI pieces: ``app.state.guard``.

Every route but ``/healthz``, ``/readyz`` and the console's page and static files declares one
of the guard's dependencies (``tests/test_security.py`` enumerates the app's routes to keep it
so for routes added later):

- ``Depends(guard.read)`` / ``Depends(guard.write)``: a valid ``Authorization: Bearer``
  token (when tokens are configured).
- ``Depends(guard.events)``: for event-stream routes only.  A bearer token, or a read token
  (``?token=``) for the generation in the path (``{gid}``) or the channel (``{name}``); it
  also holds one of the client's event-stream slots until the response ends.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from broker.auth import (
    Authenticator,
    AuthError,
    ClientAddresses,
    channel_scope,
    generation_scope,
)
from broker.errors import AtCapacity, TooManyStreams
from broker.limits import ConnectionSlots, retry_after
from broker.service import Broker
from broker.settings import Settings

# Request parameters that name a position in a stream: a malformed one is a 400, whatever
# the route, so that no unvalidated value reaches Redis and clients see one error for it.
_RESUME_LOCATIONS = {("query", "after"), ("header", "last-event-id")}


class Guard:
    """The app's authentication and per-client limits (one per app, ``app.state.guard``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = Authenticator(settings)
        self.addresses = ClientAddresses(settings.trusted_proxy_list)
        self.slots: ConnectionSlots | None = None

    @contextlib.asynccontextmanager
    async def started(self, broker: Broker) -> AsyncIterator[None]:
        """Count event streams in ``broker``'s Redis while the block runs (the app's
        lifespan)."""
        self.slots = ConnectionSlots(broker.redis, broker.log.keyspace,
                                     self.settings.max_sse_per_client)
        try:
            async with self.slots.running():
                yield
        finally:
            self.slots = None

    def address(self, request: Request) -> str:
        peer = request.client.host if request.client else None
        return self.addresses.client(peer, request.headers.get("x-forwarded-for"))

    def _bearer(self, request: Request) -> str | None:
        """The client id of the request's valid bearer token; ``None`` when auth is off."""
        if not self.auth.enabled:
            return None
        client = self.auth.bearer(request.headers.get("authorization"))
        if client is None:
            raise AuthError(401, "this API needs 'Authorization: Bearer <token>'")
        return client

    async def read(self, request: Request) -> None:
        """Dependency: a valid bearer token (reading any generation's state or products)."""
        self._bearer(request)

    async def write(self, request: Request) -> None:
        """Dependency: a valid bearer token (starting or cancelling generations)."""
        self._bearer(request)

    async def events(self, request: Request) -> AsyncIterator[None]:
        """Dependency of event-stream routes: a bearer token or a read token for the path's
        generation or channel; then one of the client's stream slots for as long as the
        response streams.  Raises ``AuthError`` (401/403) or ``TooManyStreams`` (429)."""
        client = self._stream_client(request)
        if self.slots is None:
            yield
            return
        async with self.slots.hold(client):
            yield

    def _stream_client(self, request: Request) -> str:
        if self.auth.enabled and "authorization" not in request.headers:
            token = request.query_params.get("token")
            if token is None:
                raise AuthError(401, "this stream needs 'Authorization: Bearer <token>' or a"
                                " read token (?token=)")
            self.auth.check_read_token(token, self._scope(request))
            return "a:" + self.address(request)
        return self._bearer(request) or "a:" + self.address(request)

    @staticmethod
    def _scope(request: Request) -> str:
        params = request.path_params
        if "gid" in params:
            return generation_scope(str(params["gid"]))
        if "name" in params:
            return channel_scope(str(params["name"]))
        raise AuthError(401, "read tokens are not accepted here")

    def read_token(self, scope: str) -> dict[str, Any]:
        return {"token": self.auth.mint(scope), "expires_in": self.auth.ttl}


def install_security(app: FastAPI, settings: Settings) -> Guard:
    """Put a :class:`Guard` on ``app.state.guard``, its error responses, the 400 for
    malformed resume points, and CORS from ``TOKENTEE_CORS_ORIGINS`` (outermost, so that
    error responses carry CORS headers too and the browser can read them)."""
    guard = Guard(settings)
    app.state.guard = guard

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(TooManyStreams)
    async def _too_many(request: Request, exc: TooManyStreams) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429,
                            headers={"Retry-After": retry_after(5)})

    @app.exception_handler(AtCapacity)
    async def _full(request: Request, exc: AtCapacity) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503,
                            headers={"Retry-After": retry_after(1)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        for error in exc.errors():
            if tuple(error.get("loc", ())[:2]) in _RESUME_LOCATIONS:
                return JSONResponse(
                    {"detail": "a resume point (Last-Event-ID or after) must be an id this"
                     " stream sent"}, status_code=400)
        # The 422 repeats the rejected input, which JSON cannot hold when it is Infinity or
        # NaN (Python's JSON reader accepts both): without this, a 500.
        return await request_validation_exception_handler(
            request, RequestValidationError(_finite(exc.errors()), body=exc.body))

    origins = settings.cors_origin_list
    if origins:
        # No credentials (cookies): the API authenticates by header and query token, so an
        # allowed origin is echoed only when it is on the list, never reflected at large.
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_credentials=False,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key"],
            expose_headers=["X-Stream-Id", "Idempotent-Replayed", "Retry-After"],
            max_age=600,
        )
    return guard


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (in lists, tuples, dicts) as its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
