"""The FastAPI application: create, inspect, follow and cancel generations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.api.console import install_console
from broker.api.schemas import (
    CancelAccepted,
    ChatCompletionRequest,
    CreateStream,
    ReadToken,
    Sentence,
    StreamCreated,
    StreamSentences,
    StreamStats,
    StreamStatus,
)
from broker.api.security import install_security
from broker.auth import channel_scope, generation_scope
from broker.channels import ChannelCursor, ChannelPosition, follow_channel
from broker.errors import (
    GenerationNotFound,
    IdempotencyConflict,
    InvalidResumePoint,
    ProviderConfigError,
    ShuttingDown,
    UnknownProvider,
)
from broker.events import Event
from broker.formats import NATIVE, AISDKParts, Encoder, OpenAIChunks, completion
from broker.keys import is_channel, is_generation_id
from broker.limits import prompt_chars
from broker.log import GenerationMeta
from broker.providers.base import GenerationRequest
from broker.readiness import readiness
from broker.service import Broker
from broker.settings import Settings
from broker.sse import EventStreamResponse, parse_resume_id
from consumers.metrics import render as render_metrics
from consumers.process import load_consumer_type
from consumers.stats import GenerationStats
from consumers.store import Checkpoint

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings, *, broker: Broker | None = None, shutdown: asyncio.Event | None = None
) -> FastAPI:
    """The HTTP app.  Without ``broker`` it opens its own for its lifespan.

    ``shutdown`` is set when the server begins to shut down; open event streams then end
    (with a ``retry`` hint) so that shutdown is not held up by them.  ``tokentee serve`` wires
    it to uvicorn's exit.
    """
    shutdown_event = shutdown or asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if broker is not None:
            app.state.broker = broker
            async with guard.started(broker):
                yield
            return
        types = [load_consumer_type(name, settings) for name in settings.consumer_types]
        async with Broker.open(settings, consumers=types) as own:
            app.state.broker = own
            # The server's shutdown (SIGTERM) drains the broker at once, while uvicorn still
            # waits for open requests: new generations get 503 from then on.
            drainer = asyncio.create_task(_drain_on(shutdown_event, own), name="tokentee-drain-on")
            try:
                async with guard.started(own):
                    yield
            finally:
                shutdown_event.set()
                drainer.cancel()
                await asyncio.gather(drainer, return_exceptions=True)

    app = FastAPI(
        title="tokentee",
        summary="Read an LLM stream once; fan it out through Redis Streams.",
        lifespan=lifespan,
        # With tokens configured, every route but health checks and the console page needs
        # one; FastAPI's docs routes cannot take a dependency, so they are left out.
        openapi_url=None if settings.bearer_tokens else "/openapi.json",
    )
    app.state.shutdown = shutdown_event
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    guard = install_security(app, settings)  # app.state.guard: .read, .write, .events
    read, write, events = Depends(guard.read), Depends(guard.write), Depends(guard.events)

    def get_broker(request: Request) -> Broker:
        b: Broker = request.app.state.broker
        return b

    @app.exception_handler(GenerationNotFound)
    async def _not_found(request: Request, exc: GenerationNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ShuttingDown)
    async def _draining(request: Request, exc: ShuttingDown) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
        request.app.state.broker.metrics.redis_error("api")
        logger.error("redis error while serving %s: %s", request.url.path, exc)
        return JSONResponse({"detail": "storage unavailable"}, status_code=503)

    def check_id(gid: str) -> None:
        if not is_generation_id(gid):
            raise GenerationNotFound(gid)

    def check_prompt(messages: list[dict[str, Any]]) -> None:
        size = prompt_chars(messages)
        if size > settings.max_prompt_chars:
            raise HTTPException(413, f"the prompt is {size} characters; this server takes at"
                                f" most {settings.max_prompt_chars} (TOKENTEE_MAX_PROMPT_CHARS)")

    def base_url(request: Request) -> str:
        if settings.public_url:
            return settings.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")

    @app.post("/v1/streams", status_code=201, response_model=StreamCreated,
              dependencies=[write],
              responses={200: {"description": "An Idempotency-Key's earlier generation."}})
    async def create_stream(
        body: CreateStream, request: Request, response: Response,
        idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
    ) -> StreamCreated:
        """Start a generation.  With ``Idempotency-Key``, a repeat of the same request gets
        the same generation (200, ``Idempotent-Replayed: true``) instead of a second upstream
        call; the same key with a different request gets 422."""
        b = get_broker(request)
        check_prompt(body.message_dicts())
        gen_request = GenerationRequest(
            messages=body.message_dicts(), model=body.model, params=body.params
        )
        try:
            info = await b.start(gen_request, body.provider, idempotency_key=idempotency_key,
                                 channel=body.channel,
                                 cancel_unread_after=body.cancel_unread_after)
        except UnknownProvider as exc:
            raise _unprocessable("provider", str(exc)) from exc
        except ProviderConfigError as exc:
            raise _unprocessable("params", str(exc)) from exc
        except IdempotencyConflict as exc:
            raise HTTPException(422, [{"loc": ["header", "idempotency-key"], "msg": str(exc),
                                       "type": "value_error"}]) from exc
        if info.replayed:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
        base = base_url(request)
        token = guard.read_token(generation_scope(info.id))
        return StreamCreated(
            id=info.id,
            events_url=f"{base}/v1/streams/{info.id}/events",
            status_url=f"{base}/v1/streams/{info.id}",
            provider=info.provider,
            model=info.model,
            created=info.created,
            read_token=token["token"],
            read_token_expires_in=token["expires_in"],
        )

    @app.post("/v1/streams/{gid}/read-token", response_model=ReadToken, dependencies=[read])
    async def stream_read_token(gid: str, request: Request) -> ReadToken:
        """A read token for a browser: opens this generation's event stream (and no other)
        as ``?token=`` for ``expires_in`` seconds."""
        check_id(gid)
        if await get_broker(request).log.meta(gid) is None:
            raise GenerationNotFound(gid)
        return ReadToken(**guard.read_token(generation_scope(gid)),
                         events_url=f"{base_url(request)}/v1/streams/{gid}/events")

    @app.post("/v1/channels/{name}/read-token", response_model=ReadToken,
              dependencies=[read])
    async def channel_read_token(name: str, request: Request) -> ReadToken:
        """A read token for a browser: opens this channel's event stream as ``?token=``."""
        if not is_channel(name):
            raise HTTPException(404, f"not a channel name: {name!r}")
        return ReadToken(**guard.read_token(channel_scope(name)),
                         events_url=f"{base_url(request)}/v1/channels/{name}/events")

    @app.get("/v1/streams/{gid}", response_model=StreamStatus, dependencies=[read])
    async def get_stream(gid: str, request: Request) -> StreamStatus:
        state = await get_broker(request).state(gid)
        meta = state.meta
        usage = meta.extra.get("usage")
        return StreamStatus(
            id=gid,
            status=meta.status,  # type: ignore[arg-type]
            text=state.text,
            provider=meta.provider,
            model=meta.model,
            created=meta.created,
            finished=meta.finished,
            finish_reason=meta.finish_reason,
            last_event_id=meta.last_seq,
            usage=json.loads(usage) if usage else None,
            error_code=meta.extra.get("error_code"),
            cancel_reason=meta.cancel_reason if meta.status == "cancelled" else None,
        )

    @app.get(
        "/v1/streams/{gid}/events",
        response_class=Response,
        response_model=None,
        dependencies=[events],
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "The event stream."},
            204: {"description": "The resume point is the terminal event: nothing follows."},
            400: {"description": "Malformed or impossible resume id."},
            401: {"description": "No valid bearer token or read token."},
            404: {"description": "Unknown generation."},
            429: {"description": "The client has too many open event streams."},
        },
    )
    async def stream_events(
        gid: str,
        request: Request,
        after: Annotated[str | None, Query(max_length=64)] = None,
        last_event_id: Annotated[str | None, Header(max_length=64)] = None,
        format: Annotated[Literal["native", "openai", "ai-sdk"], Query()] = "native",
        snapshot: bool = False,
        include_usage: bool = False,
    ) -> Response:
        """Every event after the resume point.  ``Last-Event-ID`` (what a reconnecting
        EventSource sends) wins over ``after``.  ``format=openai`` sends OpenAI
        ``chat.completion.chunk`` objects instead of tokentee's events, ``format=ai-sdk``
        the Vercel AI SDK UI message stream.  ``snapshot=true`` (without a resume point)
        starts with the text so far as one ``snapshot`` event, then the live tail."""
        check_id(gid)  # before the resume id: an unknown stream is 404 whatever the header
        try:
            resume = parse_resume_id(last_event_id or after) or 0
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        b = get_broker(request)
        encoder: Encoder = NATIVE
        if format == "openai":
            meta = (await b.state(gid)).meta
            encoder = OpenAIChunks(gid, meta.model, meta.created, include_usage=include_usage)
        elif format == "ai-sdk":
            encoder = AISDKParts(gid, resume)
        lead = None
        if snapshot and not resume:
            lead = await b.snapshot(gid)
            resume = lead.seq
        return await relay(b, gid, resume, request, encoder, lead=lead)

    async def relay(b: Broker, gid: str, resume: int, request: Request, encoder: Encoder,
                    headers: list[tuple[bytes, bytes]] | None = None,
                    lead: Event | None = None) -> Response:
        release = contextlib.AsyncExitStack()
        try:
            cursor = await release.enter_async_context(b.subscribe(gid, resume))
        except InvalidResumePoint as exc:
            await release.aclose()
            raise HTTPException(400, str(exc)) from exc
        except BaseException:
            await release.aclose()
            raise
        if cursor.finished:
            # Resuming after the terminal event: 204 tells EventSource to stop reconnecting.
            await release.aclose()
            return Response(status_code=204)
        return EventStreamResponse(
            cursor, release, heartbeat=settings.heartbeat_seconds,
            send_timeout=settings.send_timeout_seconds, shutdown=request.app.state.shutdown,
            encoder=encoder, headers=headers, lead=lead, metrics=b.metrics,
        )

    @app.get("/v1/channels/{name}/events", response_class=Response, response_model=None,
             dependencies=[events])
    async def channel_events(
        name: str, request: Request,
        after: Annotated[str | None, Query(max_length=4096)] = None,
        last_event_id: Annotated[str | None, Header(max_length=4096)] = None,
    ) -> Response:
        """Every event of every generation started in channel ``name``, each with its
        ``generation`` in its data, in arrival order, until the client leaves.  The ``id``
        of each event is a channel position: ``Last-Event-ID`` (or ``after``) resumes with
        nothing lost or repeated."""
        if not is_channel(name):
            raise HTTPException(404, f"not a channel name: {name!r}")
        point = last_event_id or after
        try:
            position = ChannelPosition.parse(point) if point else None
        except InvalidResumePoint as exc:
            raise HTTPException(400, str(exc)) from exc
        b = get_broker(request)
        cursor = ChannelCursor(name, follow_channel(b, name, position))
        release = contextlib.AsyncExitStack()
        release.push_async_callback(cursor.aclose)
        return EventStreamResponse(
            cursor, release, heartbeat=settings.heartbeat_seconds,
            send_timeout=settings.send_timeout_seconds, shutdown=request.app.state.shutdown,
            metrics=b.metrics,
        )

    @app.post("/v1/chat/completions", response_model=None, dependencies=[write])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI-compatible: starts a generation through the configured upstream and relays
        it, streaming (``chat.completion.chunk`` SSE) or not (one ``chat.completion``).
        ``X-Stream-Id`` names the generation, so other clients can join it."""
        b = get_broker(request)
        size = prompt_chars(body.message_dicts())
        if size > settings.max_prompt_chars:
            return _openai_error(413, f"the prompt is {size} characters; this server takes at"
                                 f" most {settings.max_prompt_chars}", "messages")
        gen_request = GenerationRequest(
            messages=body.message_dicts(), model=body.model, params=body.params()
        )
        try:
            info = await b.start(gen_request, body.provider)
        except UnknownProvider as exc:
            return _openai_error(400, str(exc), "provider")
        except ProviderConfigError as exc:
            return _openai_error(400, str(exc), None)
        stream_id = [(b"x-stream-id", info.id.encode())]
        encoder = OpenAIChunks(info.id, info.model, info.created, include_usage=bool(
            (body.stream_options or {}).get("include_usage")))
        if body.stream:
            return await relay(b, info.id, 0, request, encoder, stream_id)
        events = [event async for event in b.events(info.id)]
        final = events[-1] if events else None
        if final is None or final.type != "done":
            code = str(final.data.get("code", final.type)) if final else "log_lost"
            message = str(final.data.get("message", "")) if final else "no terminal event"
            return JSONResponse(
                {"error": {"message": message or f"the generation ended with {code}",
                           "type": "upstream_error", "code": code, "param": None}},
                status_code=502, headers={"X-Stream-Id": info.id},
            )
        return JSONResponse(completion(info.id, info.model, info.created, events),
                            headers={"X-Stream-Id": info.id})

    @app.post("/v1/streams/{gid}/cancel", status_code=202, response_model=CancelAccepted,
              dependencies=[write])
    async def cancel_stream(gid: str, request: Request) -> CancelAccepted:
        status = await get_broker(request).cancel(gid)
        return CancelAccepted(id=gid, status=status)

    async def consumer_progress(
        b: Broker, gid: str, ctype: str
    ) -> tuple[GenerationMeta, Checkpoint | None]:
        check_id(gid)
        meta = await b.log.meta(gid)
        if meta is None:
            raise GenerationNotFound(gid)
        return meta, await b.consumer_store.checkpoint(gid, ctype)

    @app.get("/v1/streams/{gid}/sentences", response_model=StreamSentences,
             dependencies=[read])
    async def stream_sentences(
        gid: str, request: Request,
        after: Annotated[int, Query(ge=0, le=2**53)] = 0,
    ) -> StreamSentences:
        """The sentences the sentence logger has completed so far (``after``: skip the first
        ``after``).  Empty, not complete, until the logger reaches the generation."""
        b = get_broker(request)
        _, cp = await consumer_progress(b, gid, "sentences")
        records = await b.consumer_store.records(gid, "sentences", after=after)
        return StreamSentences(
            id=gid, consumer="sentences", processed_seq=cp.seq if cp else 0,
            complete=bool(cp and cp.done),
            sentences=[Sentence.model_validate(r) for r in records],
        )

    @app.get("/v1/streams/{gid}/stats", response_model=StreamStats, dependencies=[read])
    async def stream_stats(gid: str, request: Request) -> StreamStats:
        """The analytics counter's statistics of the generation, live while it runs."""
        b = get_broker(request)
        meta, cp = await consumer_progress(b, gid, "analytics")
        saved = cp.state.get("stats") if cp else None
        stats = GenerationStats.from_state(saved) if saved else GenerationStats.begin(
            created=meta.created, provider=meta.provider, model=meta.model
        )
        return StreamStats(
            id=gid, consumer="analytics", processed_seq=cp.seq if cp else 0,
            complete=bool(cp and cp.done), **stats.summary(),
        )

    @app.get("/metrics", response_class=Response, dependencies=[read])
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: analytics totals, consumer liveness, lag and dead letters."""
        b = get_broker(request)
        body = await render_metrics(b.redis, b.log.keyspace, settings)
        return Response(body + b.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz", responses={503: {"description": "A readiness check failed."}})
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: 200 if every check passes, else 503 naming the checks that failed."""
        checks = await readiness(get_broker(request))
        failed = [name for name, outcome in checks.items() if outcome != "ok"]
        if failed:
            return JSONResponse({"status": "unavailable", "failed": failed, "checks": checks},
                                status_code=503)
        return JSONResponse({"status": "ready", "checks": checks})

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        """Liveness: this process serves HTTP.  No Redis call (that is /readyz)."""
        b = get_broker(request)
        return JSONResponse(
            {
                "status": "ok",
                "producers": len(b.manager.active),
                "hub_streams": b.hub.stream_count,
                "readers": b.hub.cursor_count,
            }
        )

    install_console(app, settings)
    return app


async def _drain_on(shutdown: asyncio.Event, broker: Broker) -> None:
    await shutdown.wait()
    broker.drain()


def _openai_error(status: int, message: str, param: str | None) -> JSONResponse:
    """An error response in OpenAI's shape, so that OpenAI clients report its message."""
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": None}}, status_code=status)


def _unprocessable(field: str, message: str) -> HTTPException:
    return HTTPException(
        422, [{"loc": ["body", field], "msg": message, "type": "value_error"}]
    )


class BodySizeLimit:
    """Refuses request bodies over ``max_bytes`` with 413, chunked ones included.

    Starlette has no such limit, and a JSON body is read whole before validation.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            # Bodiless requests (event streams among them) skip the wrapping entirely.
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _too_large(send)
                return
        seen = 0
        refused = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer 413 now and tell the app the client left, so it stops reading.
                    refused = True
                    await _too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def _too_large(send: Send) -> None:
    body = b'{"detail":"request body too large"}'
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
