"""Channels: following every generation of a conversation or an agent run as one stream.

A generation started with a ``channel`` is announced on that channel's stream
(``<prefix>:chan:<name>``).  A follower reads the announcements with a blocking ``XREAD`` and
subscribes to each generation through the hub, merging their events in arrival order, each
tagged with its generation.

Resuming needs more than one number, because several generations run at once.  A
:class:`ChannelPosition` holds the last announcement taken in and, for every generation
announced up to there that has not ended yet, the last event delivered.  Its text form
(``<announcement id>~<generation>.<seq>~...``) is the SSE ``id`` of every event, so a
reconnecting client resumes with ``Last-Event-ID`` and gets exactly what it missed: the rest
of each unfinished generation, and every generation announced after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from redis.exceptions import RedisError

from broker.connections import raise_if_cancelled
from broker.errors import GenerationNotFound, InvalidResumePoint
from broker.events import Event
from broker.formats import native_frame
from broker.keys import is_generation_id
from broker.log import XReadReply
from broker.logs import set_generation
from broker.sse import ShieldedNext

if TYPE_CHECKING:
    from broker.service import Broker

logger = logging.getLogger(__name__)

_ENTRY_ID_RE = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_SEQ_RE = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() also takes superscripts
_U64_MAX = 2**64 - 1  # both halves of a Redis stream id; Redis refuses larger ones
_MAX_LIVE = 64  # generations a position may name (a token must fit in a header)


@dataclass
class ChannelPosition:
    """Where a channel follower is (see the module docstring)."""

    announced: str = "0-0"
    live: dict[str, int] = field(default_factory=dict)

    def encode(self) -> str:
        return "~".join([self.announced, *(f"{gid}.{seq}" for gid, seq in self.live.items())])

    @classmethod
    def parse(cls, text: str) -> ChannelPosition:
        """Raises ``InvalidResumePoint`` for anything :meth:`encode` does not make."""
        first, *rest = text.split("~")
        if not _ENTRY_ID_RE.fullmatch(first) or len(rest) > _MAX_LIVE or any(
            int(half) > _U64_MAX for half in first.split("-")
        ):
            raise InvalidResumePoint("not a channel position")
        live: dict[str, int] = {}
        for item in rest:
            gid, _, seq = item.rpartition(".")
            if not is_generation_id(gid) or not _SEQ_RE.fullmatch(seq):
                raise InvalidResumePoint("not a channel position")
            live[gid] = int(seq)
        return cls(first, live)


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    """One event of one generation of a channel, and the position right after it."""

    generation: str
    event: Event
    position: str


async def follow_channel(
    broker: Broker, channel: str, position: ChannelPosition | None = None,
) -> AsyncIterator[ChannelEvent]:
    """Every event of every generation of ``channel`` after ``position`` (default: from the
    channel's first generation), forever.  Holds one dedicated Redis connection for the
    announcements; the generations are read through the hub.  Stop by breaking out of the
    loop or cancelling: every task it started is cancelled and awaited."""
    position = position or ChannelPosition()
    key = broker.log.keyspace.channel(channel)
    # Items: ("gen", gid, event) from a generation, ("ann", entry id, gid) an announcement,
    # ("gone", gid, None) a generation that no longer exists.  Bounded: a slow reader
    # holds the pumps back, and they read the log at their own pace later.
    queue: asyncio.Queue[tuple[str, str, Event | str | None]] = asyncio.Queue(256)
    pumps: dict[str, asyncio.Task[None]] = {}
    waiting: deque[tuple[str, str]] = deque()  # announcements not taken in yet

    async def pump(gid: str, after: int) -> None:
        set_generation(gid)  # this task follows gid alone: its log lines say so
        while True:
            try:
                async with broker.subscribe(gid, after) as cursor:
                    async for event in cursor:
                        await queue.put(("gen", gid, event))
                        after = event.seq
                return
            except (GenerationNotFound, InvalidResumePoint):
                await queue.put(("gone", gid, None))
                return
            except RedisError as exc:
                # A failed log read: subscribe again from the last event handed on.
                logger.warning("channel %s: reading %s failed (%s); retrying", channel,
                               gid, exc)
                await asyncio.sleep(0.5)

    async def announcements(last: str) -> None:
        async with broker.reader_client("channel") as client:
            while True:
                raise_if_cancelled()
                try:
                    reply = cast(XReadReply, await client.xread(
                        {key: last}, block=broker.settings.block_ms, count=100))
                except RedisError as exc:
                    logger.warning("channel %s: announcement read failed (%s); retrying",
                                   channel, exc)
                    await asyncio.sleep(0.5)  # back off before reconnecting, not a poll
                    continue
                for _key, entries in reply or []:
                    for entry_id, fields in entries:
                        last = entry_id.decode()
                        gid = fields.get(b"id", b"").decode("utf-8", "replace")
                        await queue.put(("ann", last, gid))

    def start(gid: str, after: int) -> None:
        task = asyncio.create_task(pump(gid, after), name=f"tokentee-channel-{gid}")
        pumps[gid] = task
        task.add_done_callback(lambda _t, gid=gid: pumps.pop(gid, None))  # type: ignore[misc]

    for gid, seq in position.live.items():
        start(gid, seq)
    reader = asyncio.create_task(announcements(position.announced), name="tokentee-channel")
    try:
        while True:
            kind, name, item = await queue.get()
            if kind == "ann":
                waiting.append((name, cast(str, item)))
            elif kind == "gone":
                position.live.pop(name, None)
            else:
                event = cast(Event, item)
                if event.terminal:
                    position.live.pop(name, None)
                else:
                    position.live[name] = event.seq
            # Take announcements in while fewer than _MAX_LIVE generations run, so that
            # every position stays one that parse() accepts; the rest wait their turn (and
            # a resumed follower reads them again after ``announced``).
            while waiting and len(position.live) < _MAX_LIVE:
                entry_id, gid = waiting.popleft()
                position.announced = entry_id
                if is_generation_id(gid) and gid not in position.live:
                    position.live[gid] = 0
                    start(gid, 0)
            if kind == "gen":
                yield ChannelEvent(name, cast(Event, item), position.encode())
    finally:
        tasks = [reader, *pumps.values()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)


class ChannelCursor:
    """A channel follower in the shape :class:`broker.sse.EventStreamResponse` drives (a
    cancel-safe ``__anext__``, ``ready``, ``finished``, ``gid``).  Each event's SSE frame is
    built here: ``id`` is the channel position after it, ``data`` the event's data with its
    ``generation``."""

    finished = False  # a channel has no end

    def __init__(self, name: str, follower: AsyncIterator[ChannelEvent]) -> None:
        self.gid = f"channel {name}"
        self._follower = ShieldedNext(follower)

    def __aiter__(self) -> ChannelCursor:
        return self

    async def __anext__(self) -> Event:
        item = await self._follower.get()
        data = {"generation": item.generation, **item.event.data}
        event = Event(seq=item.event.seq, type=item.event.type, data=data, ts=item.event.ts)
        frame = native_frame(item.position, event.type, event.json_data())
        object.__setattr__(event, "sse_frame", frame)  # what NativeFrames sends
        return event

    def ready(self, limit: int = 1_000) -> list[Event]:
        return []

    async def aclose(self) -> None:
        await self._follower.aclose()
