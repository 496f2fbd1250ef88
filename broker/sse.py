"""Server-Sent Events out: framing, resume ids, and the streaming response.

The response is a plain ASGI callable rather than sse-starlette's ``EventSourceResponse``
because the relay's behaviour is the product here: it drives a hub cursor, races end of stream
against client disconnect and server shutdown in one place (see ARCHITECTURE.md), batches the
events a cursor already holds into one write, and must not depend on sse-starlette's
process-global shutdown flag and uvicorn monkey-patch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Generic, Protocol, TypeVar

from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from broker.events import Event
from broker.formats import NATIVE, Encoder
from broker.keys import is_generation_id
from broker.logs import generation_context
from broker.metrics import BrokerMetrics

logger = logging.getLogger(__name__)

SSE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

_RESUME_RE = re.compile(r"[0-9]{1,18}")


def parse_resume_id(value: str | None) -> int | None:
    """The sequence number in a ``Last-Event-ID`` header or ``after`` parameter.

    ``None`` or empty means "from the start".  Anything but 1-18 ASCII digits raises
    ``ValueError`` (the API answers 400); the value is never passed to Redis as given.
    """
    if value is None or value == "":
        return None
    if not _RESUME_RE.fullmatch(value):
        raise ValueError("a resume id must be the decimal id of an event of this stream")
    return int(value)


def encode_event(event: Event) -> bytes:
    """One native SSE frame.  ``data`` is compact JSON on a single line: token text with
    CR/LF can never start a new field or event.

    The hub hands the same :class:`Event` object to every cursor of a stream, so the frame is
    encoded once per process and cached on the event, not once per client.
    """
    return NATIVE.encode(event)


def comment(text: str) -> bytes:
    return f": {text.replace(chr(13), ' ').replace(chr(10), ' ')}\n\n".encode()


_T = TypeVar("_T")


class ShieldedNext(Generic[_T]):
    """The next item of an async iterator, for cursors that :class:`EventStreamResponse`
    drives: a cancelled wait (the response's heartbeat timeout) leaves the read running for
    the next call instead of cancelling the iterator, which a cancelled ``anext`` would
    leave unusable."""

    def __init__(self, source: AsyncIterator[_T]) -> None:
        self._source = source
        self._next: asyncio.Future[_T] | None = None

    async def get(self) -> _T:
        """The next item; raises what the iterator raises (``StopAsyncIteration`` at its
        end)."""
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._source))
        read = self._next
        try:
            item = await asyncio.shield(read)
        except asyncio.CancelledError:
            # Our wait was cancelled: the read, or the item it has already produced, stays
            # for the next call (clearing it here would drop that item).
            if read.cancelled():
                self._next = None
            raise
        except BaseException:
            self._next = None
            raise
        self._next = None
        return item

    async def aclose(self) -> None:
        """Cancel a read in flight and close the iterator."""
        if self._next is not None:
            self._next.cancel()
            await asyncio.gather(self._next, return_exceptions=True)
            self._next = None
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()


class EventSource(Protocol):
    """What the response streams: a hub :class:`Cursor`, or a channel follower."""

    @property
    def gid(self) -> str: ...

    @property
    def finished(self) -> bool: ...

    def __anext__(self) -> Awaitable[Event]:
        """The next event; cancelling the wait loses nothing."""
        ...

    def ready(self, limit: int = 1_000) -> list[Event]: ...


class EventStreamResponse(Response):
    """Streams a cursor to one client as ``text/event-stream``.

    Three things race; the first to finish cancels the others:

    - the stream: events (plus a heartbeat comment after ``heartbeat`` seconds of silence)
      until the terminal event; every send is bounded by ``send_timeout`` so a frozen client
      cannot hold the task;
    - the client's disconnect (``http.disconnect``);
    - the server's shutdown event: the response ends with a ``retry`` hint and the client
      resumes elsewhere by ``Last-Event-ID``.

    ``release`` (the cursor's subscription) is closed in every case, so a client that goes
    away frees everything it held at once.
    """

    def __init__(
        self, cursor: EventSource, release: contextlib.AsyncExitStack, *, heartbeat: float,
        send_timeout: float, shutdown: asyncio.Event, encoder: Encoder = NATIVE,
        headers: list[tuple[bytes, bytes]] | None = None, lead: Event | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.encoder = encoder
        self.lead = lead  # sent before the cursor's events (a snapshot)
        self.extra_headers = [*encoder.headers, *(headers or [])]
        self.cursor = cursor
        self.release = release
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.shutdown = shutdown
        self.metrics = metrics or BrokerMetrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gid = self.cursor.gid
        with contextlib.ExitStack() as scoped:
            if is_generation_id(gid):  # not a channel's: that follows many generations
                scoped.enter_context(generation_context(gid))
            self.metrics.sse_clients += 1
            try:
                await self._respond(receive, send)
            finally:
                self.metrics.sse_clients -= 1

    async def _respond(self, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": SSE_HEADERS + self.extra_headers})
            # A comment right away: proxies and Starlette-style middlewares hold the headers
            # back until the first body chunk, and the client learns it is connected.
            first = comment("tokentee stream") + self.encoder.preamble()
            if self.lead is not None:
                first += self.encoder.encode(self.lead)
            await self._send(send, first)
            stream = asyncio.create_task(self._stream(send), name="sse-stream")
            disconnect = asyncio.create_task(_wait_disconnect(receive), name="sse-disconnect")
            shutdown = asyncio.create_task(self.shutdown.wait(), name="sse-shutdown")
            tasks = {stream, disconnect, shutdown}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if stream in done and not stream.cancelled() and stream.exception() is not None:
                raise stream.exception()  # type: ignore[misc]
            if disconnect in done:
                return
            if shutdown in done and stream not in done:
                await self._send(send, b": server shutting down\nretry: 1000\n\n")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, OSError) as exc:
            # A client that stopped reading (send timeout) or vanished mid-write.
            logger.info("SSE client of %s dropped: %r", self.cursor.gid, exc)
        except RedisError as exc:
            self.metrics.redis_error("sse")
            # End without the closing chunk: the client sees a broken stream and resumes.
            logger.warning("SSE stream of %s aborted, Redis failed: %s", self.cursor.gid, exc)
        finally:
            await self.release.aclose()

    async def _send(self, send: Send, body: bytes) -> None:
        async with asyncio.timeout(self.send_timeout):
            await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _stream(self, send: Send) -> None:
        cursor = self.cursor
        while True:
            try:
                async with asyncio.timeout(self.heartbeat):
                    event = await anext(cursor)
            except TimeoutError:
                await self._send(send, comment("keep-alive"))
                continue
            except StopAsyncIteration:
                return
            # Whatever else the cursor already holds goes out in the same write.
            encode = self.encoder.encode
            events = [event, *cursor.ready()]
            await self._send(send, b"".join([encode(e) for e in events]))
            self.metrics.tokens_out += sum(1 for e in events if e.type == "token")
            if cursor.finished:
                return


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
