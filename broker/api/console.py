"""The live console: a web page at ``/`` and the few JSON and SSE routes it needs.

The page is static (``broker/static``: HTML, CSS, JavaScript and a vendored uPlot); it talks
to the same public API as any client (``POST /v1/streams``, the event streams, cancel,
stats), plus:

- ``GET /v1/streams/{id}/sentences/events``: the sentence logger's sentences as SSE, each as
  it is committed, resumable by ``Last-Event-ID``, ending with an ``end`` event;
- ``GET /v1/console/figures``: live figures of the deployment, added up over its broker
  processes, and of each (see :mod:`broker.api.figures`);
- ``GET /v1/console/generations``: the most recent generations of the catalog, with status;
- ``GET /v1/console/config``: the providers and their default models, the simulated
  provider's default pace, the consumer types.

When the app has an access guard (``app.state.guard``), the JSON routes take its ``read``
dependency and the sentences stream its ``events`` one, like the rest of the API; the page
itself and its static files are public (they hold no data).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from broker.api.figures import live_figures
from broker.errors import GenerationNotFound, ProviderConfigError
from broker.events import Event
from broker.keys import is_generation_id
from broker.log import StreamEntry
from broker.providers.base import GenerationRequest
from broker.providers.simulated import DEFAULT_TOKENS_PER_SECOND
from broker.service import Broker
from broker.settings import Settings
from broker.sse import EventStreamResponse, ShieldedNext, parse_resume_id

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
SENTENCES = "sentences"
_MAX_RECENT = 100


def install_console(app: FastAPI, settings: Settings) -> None:
    """Add the console's page, static files and routes to ``app`` (call it last, after any
    access guard is set on ``app.state.guard``)."""
    guard = getattr(app.state, "guard", None)
    read: list[Any] = [Depends(guard.read)] if guard is not None else []
    # Event streams take the guard's stream dependency: a bearer token or a read token for
    # the generation (what a browser's EventSource can send), and a stream slot.
    events: list[Any] = [Depends(guard.events)] if guard is not None else []

    def get_broker(request: Request) -> Broker:
        return cast(Broker, request.app.state.broker)

    @app.get("/", include_in_schema=False)
    async def console_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/v1/console/config", dependencies=read)
    async def console_config(request: Request) -> dict[str, Any]:
        """The providers this server can start generations with (``ready``: its settings
        allow a request; else ``problem`` says what is missing), each with its default
        model, the default provider, the simulated provider's default pace and the consumer
        types this server runs."""
        b = get_broker(request)
        probe = GenerationRequest(messages=[{"role": "user", "content": "?"}])
        providers = []
        for name, provider in b.manager.providers.items():
            problem = None
            try:
                provider.validate(probe)
            except ProviderConfigError as exc:
                problem = str(exc)
            providers.append({"name": name, "model": provider.model_for(probe),
                              "ready": problem is None, "problem": problem})
        return {
            "providers": providers,
            "default_provider": settings.default_provider,
            "simulated": {"tokens_per_second": DEFAULT_TOKENS_PER_SECOND},
            "consumers": settings.consumer_types,
        }

    @app.get("/v1/console/figures", dependencies=read)
    async def console_figures(request: Request) -> dict[str, Any]:
        """Live figures of the deployment (the sum over every broker process that published
        its own in the last few seconds), and of each process: running generations, open
        event streams, hub readers, tokens appended and tokens sent to SSE clients per
        second (over the last few seconds), the fan-out ratio; and per consumer type its
        liveness, workers, lag (entries), pending and backlog (generations) and dead
        letters."""
        return await live_figures(get_broker(request))

    @app.get("/v1/console/generations", dependencies=read)
    async def console_generations(
        request: Request, limit: Annotated[int, Query(ge=1, le=_MAX_RECENT)] = 20,
    ) -> dict[str, Any]:
        """The ``limit`` most recent generations of the catalog, newest first, with their
        status (those whose keys expired are left out)."""
        b = get_broker(request)
        entries = cast(list[StreamEntry], await b.redis.xrevrange(
            b.log.keyspace.catalog, count=limit))
        gids = [fields.get(b"id", b"").decode() for _eid, fields in entries]
        gids = [gid for gid in gids if is_generation_id(gid)]
        metas = await asyncio.gather(*(b.log.meta(gid) for gid in gids))
        return {"generations": [
            {"id": m.id, "status": m.status, "provider": m.provider, "model": m.model,
             "created": m.created, "finished": m.finished, "finish_reason": m.finish_reason,
             "last_event_id": m.last_seq}
            for m in metas if m is not None
        ]}

    @app.get(
        "/v1/streams/{gid}/sentences/events", dependencies=events,
        response_class=Response, response_model=None,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "The sentences."},
            204: {"description": "Every sentence was sent before the resume point."},
            404: {"description": "Unknown generation."},
        },
    )
    async def sentence_events(
        gid: str, request: Request,
        after: Annotated[str | None, Query(max_length=64)] = None,
        last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    ) -> Response:
        """The sentences of ``gid`` as the sentence logger completes them: one ``sentence``
        event each (``id``: its index; ``data``: the record of ``GET .../sentences``), then
        one ``end`` event once the logger has processed the generation's terminal entry.
        ``Last-Event-ID`` (or ``after``) resumes after that sentence.  Holds one Redis
        connection while it waits."""
        if not is_generation_id(gid):
            raise GenerationNotFound(gid)
        try:
            resume = parse_resume_id(last_event_id or after) or 0
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        b = get_broker(request)
        if await b.log.meta(gid) is None:
            raise GenerationNotFound(gid)
        cp = await b.consumer_store.checkpoint(gid, SENTENCES)
        if cp is not None and cp.done and cp.records <= resume:
            return Response(status_code=204)  # EventSource stops reconnecting
        cursor = RecordsCursor(gid, b.records(gid, SENTENCES, after=resume), resume)
        release = contextlib.AsyncExitStack()
        release.push_async_callback(cursor.aclose)
        return EventStreamResponse(
            cursor, release, heartbeat=settings.heartbeat_seconds,
            send_timeout=settings.send_timeout_seconds, shutdown=request.app.state.shutdown,
            metrics=b.metrics,
        )


class RecordsCursor:
    """A consumer type's records as events, in the shape :class:`EventStreamResponse`
    drives: ``sentence`` events numbered by record index, then one ``end`` event."""

    def __init__(self, gid: str, records: AsyncIterator[dict[str, Any]], after: int) -> None:
        self.gid = gid
        self.finished = False
        self._records = ShieldedNext(records)
        self._last = after

    def __aiter__(self) -> RecordsCursor:
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        try:
            record = await self._records.get()
        except (StopAsyncIteration, GenerationNotFound):  # the end, or expired meanwhile
            self.finished = True
            return Event(seq=self._last, type="end", data={"sentences": self._last})
        self._last = int(record.get("index", self._last + 1))
        return Event(seq=self._last, type="sentence", data=record)

    def ready(self, limit: int = 1_000) -> list[Event]:
        return []

    async def aclose(self) -> None:
        await self._records.aclose()
