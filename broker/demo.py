"""``tokentee demo``: one generation arriving live at three independent HTTP readers.

Everything runs in this process: the broker (with an embedded redis-server unless a Redis URL
is configured) and the HTTP API on a free loopback port.  One generation is created with
``POST /v1/streams``; three SSE clients then follow it over HTTP, side by side:

- **A** reads from the start;
- **B** joins late (once A has a third of the events) and replays from the start;
- **C** drops its connection half-way, stays away while A moves on, and resumes with
  ``Last-Event-ID``.

At the end every reader's events and text are compared with each other and with the
generation's text from ``GET /v1/streams/{id}``, and the durable consumers' view of the same
generation is shown: the sentence logger's sentences and the analytics counter's statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker.events import TERMINAL_TYPES
from broker.server import build_server
from broker.service import Broker
from broker.settings import Settings
from consumers.analytics import Analytics
from consumers.sentences import JsonLinesSink, Sentences

PROMPT = "Explain tokentee to a newcomer."
TAIL_CHARS = 200
STYLES = {"waiting": "dim", "live": "green", "done": "bold green", "disconnected": "yellow"}

Received = tuple[int, str, dict[str, Any]]  # (SSE id, event type, decoded data)


class DemoError(RuntimeError):
    """A reader's stream broke off before its terminal event."""


@dataclass
class Reader:
    """One SSE client's view of the generation, and what the display says about it."""

    name: str
    plan: str
    state: str = "waiting"
    events: list[Received] = field(default_factory=list)
    replay_until: int = 0  # B: the last id A had seen when B connected
    dropped_at: int = 0  # C: the last id seen before the drop
    error: str = ""

    @property
    def last_id(self) -> int:
        return self.events[-1][0] if self.events else 0

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1][1] in TERMINAL_TYPES

    @property
    def ended(self) -> bool:
        return self.finished or bool(self.error)

    @property
    def text(self) -> str:
        return "".join(str(d.get("text", "")) for _, t, d in self.events if t == "token")

    @property
    def style(self) -> str:
        return STYLES.get(self.state, "bold red")

    @property
    def status(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if self.state == "disconnected":
            return f"disconnected at id {self.dropped_at}"
        notes = []
        if self.replay_until:
            replayed = min(self.last_id, self.replay_until)
            more = "" if replayed == self.replay_until else "..."
            notes.append(f"joined late, replayed {replayed}{more}")
        if self.dropped_at:
            notes.append(f"resumed after id {self.dropped_at}")
        return "; ".join([*notes, self.state])


class Board:
    """The readers' shared state: renders it into the live display on every change, and lets
    readers await a condition on it (instead of sleeping)."""

    def __init__(self, live: Live, title: str, readers: list[Reader]) -> None:
        self.live = live
        self.title = title
        self.readers = readers
        self._changed = asyncio.Condition()

    async def changed(self) -> None:
        # update() only swaps the renderable; Live's own thread redraws it at most
        # refresh_per_second times, so a fast stream does not flood the terminal.
        self.live.update(self.render())
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    def render(self) -> Table:
        table = Table(title=self.title, expand=True, show_lines=True)
        for r in self.readers:
            table.add_column(f"{r.name}: {r.plan}", ratio=1, overflow="fold")
        table.add_row(*(Text(r.status, style=r.style) for r in self.readers))
        table.add_row(*(f"{len(r.events)} events, last id {r.last_id}" for r in self.readers))
        table.add_row(*(Text(_tail(r.text)) for r in self.readers))
        return table


async def follow(
    client: httpx.AsyncClient, board: Board, reader: Reader, gid: str, *, after: int = 0,
    until: Callable[[], bool] = lambda: False,
) -> None:
    """Read ``gid``'s SSE stream after id ``after`` into ``reader`` up to the terminal event,
    or until ``until()`` holds: leaving the ``async with`` early drops the connection."""
    headers = {"Last-Event-ID": str(after)} if after else {}
    async with aconnect_sse(client, "GET", f"/v1/streams/{gid}/events", headers=headers) as sse:
        sse.response.raise_for_status()
        reader.state = "live"
        async for message in sse.aiter_sse():
            if not message.data:
                continue  # httpx-sse dispatches a bare "retry:" block (sent on server shutdown)
            reader.events.append((int(message.id), message.event, json.loads(message.data)))
            if reader.finished:
                reader.state = reader.events[-1][1]
            await board.changed()
            if reader.finished or until():
                return
    raise DemoError("the stream ended before its terminal event (server shutting down?)")


async def guarded(board: Board, reader: Reader, part: Callable[[], Awaitable[None]]) -> None:
    """Run one reader's part; record a failure on it instead of failing the task group.

    Failing children are avoided on purpose: on Python 3.11 a child that fails while the
    group's owner already waits in ``__aexit__`` leaves the owner's cancel count raised, and
    ``asyncio.run`` then turns Ctrl-C into a ``CancelledError`` traceback.
    """
    try:
        await part()
    except (httpx.HTTPError, DemoError) as exc:
        reader.state, reader.error = "failed", f"{type(exc).__name__}: {exc}"
        await board.changed()


async def _show(client: httpx.AsyncClient, console: Console, broker: Broker, *, tokens: int,
                rate: float) -> int:
    created = await client.post("/v1/streams", json={
        "prompt": PROMPT, "provider": "simulated",
        "params": {"max_tokens": tokens, "tokens_per_second": rate},
    })
    created.raise_for_status()
    gid: str = created.json()["id"]
    a = Reader("A", "from the start")
    b = Reader("B", "joins late, replays")
    c = Reader("C", "drops, resumes")
    third, half, sixth = (max(1, tokens // k) for k in (3, 2, 6))

    async def from_start() -> None:
        await follow(client, board, a, gid)

    async def late_joiner() -> None:
        await board.wait_until(lambda: len(a.events) >= third or a.ended)
        b.replay_until = a.last_id
        await follow(client, board, b, gid)

    async def dropper() -> None:
        await follow(client, board, c, gid, until=lambda: len(c.events) >= half)
        if c.finished:
            return
        c.dropped_at, c.state = c.last_id, "disconnected"
        await board.changed()
        await board.wait_until(lambda: a.last_id >= c.dropped_at + sixth or a.ended)
        await follow(client, board, c, gid, after=c.dropped_at)

    title = f"generation {gid}: {tokens} tokens at {rate:g}/s, three SSE readers over HTTP"
    # transient: the last frame is printed below instead, because Live leaves it without a
    # final newline when the console is not a terminal (a pipe gets only that last frame).
    with Live(console=console, refresh_per_second=8, transient=True) as live:
        board = Board(live, title, [a, b, c])
        await board.changed()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(guarded(board, a, from_start), name="reader-A")
            tg.create_task(guarded(board, b, late_joiner), name="reader-B")
            tg.create_task(guarded(board, c, dropper), name="reader-C")
    console.print(board.render())
    problems = [f"reader {r.name}: {r.error}" for r in (a, b, c) if r.error]
    if not problems:
        status = (await client.get(f"/v1/streams/{gid}")).raise_for_status().json()
        summary = Table(title="What each reader received", show_lines=True)
        for column in ("reader", "events", "ended with", "text"):
            summary.add_column(column, overflow="fold")
        for r in (a, b, c):
            summary.add_row(r.name, str(len(r.events)), r.state, r.text)
        console.print(summary)
        problems = _check([a, b, c], status["text"])
        consumed = await _show_consumers(client, console, broker, gid, status["text"], tokens)
        problems += consumed
    for problem in problems:
        console.print(f"[bold red]FAIL[/] {problem}")
    if problems:
        return 1
    console.print(
        f"[bold green]OK[/] All three readers received identical event sequences "
        f"({len(a.events)} events, ids 1..{a.last_id}, same types and data, ending with done), "
        f"and each one's text equals the generation's text from GET /v1/streams/{gid}. "
        f"The sentence logger's sentences add up to that text, and the analytics counter "
        f"counted all {tokens} tokens."
    )
    return 0


async def _show_consumers(client: httpx.AsyncClient, console: Console, broker: Broker,
                          gid: str, text: str, tokens: int) -> list[str]:
    """The durable consumers' view of the same generation, once both are through it."""
    async for _ in broker.records(gid, "sentences"):
        pass  # ends when the logger has processed the terminal entry
    async for _ in broker.records(gid, "analytics"):
        pass
    sentences = (await client.get(f"/v1/streams/{gid}/sentences")).raise_for_status().json()
    stats = (await client.get(f"/v1/streams/{gid}/stats")).raise_for_status().json()
    table = Table(title=f"Sentence logger: GET /v1/streams/{gid}/sentences", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("sentence", overflow="fold")
    for sentence in sentences["sentences"]:
        table.add_row(str(sentence["index"]), sentence["text"])
    console.print(table)
    gaps = stats["inter_token_gap_ms"]
    console.print(
        f"Analytics counter: {stats['tokens']} tokens, {stats['characters']} characters, "
        f"first token after {stats['time_to_first_token_ms']} ms, "
        f"{stats['tokens_per_second']} tokens/s, inter-token gap p50 {gaps['p50']} ms "
        f"/ p95 {gaps['p95']} ms / max {gaps['max']} ms, finish reason "
        f"{stats['finish_reason']}"
    )
    problems = []
    if " ".join(s["text"] for s in sentences["sentences"]).split() != text.split():
        problems.append("the logged sentences do not add up to the generation's text")
    if stats["tokens"] != tokens or not stats["complete"]:
        problems.append(f"the analytics counter counted {stats['tokens']} tokens, not {tokens}")
    return problems


def _check(readers: list[Reader], generation_text: str) -> list[str]:
    first = readers[0]
    problems = [
        f"{r.name}'s events differ from {first.name}'s (not identical)"
        for r in readers[1:] if r.events != first.events
    ]
    if [e[0] for e in first.events] != list(range(1, len(first.events) + 1)):
        problems.append(f"{first.name}'s ids are not 1..n without gaps or repeats")
    if first.state != "done":
        problems.append(f"the stream ended with {first.state!r}, not 'done'")
    problems += [
        f"{r.name}'s text differs from the generation's text"
        for r in readers if r.text != generation_text
    ]
    return problems


async def run_demo(
    settings: Settings, *, tokens: int, rate: float, console: Console | None = None
) -> int:
    """Run the demo; return 0 if all three readers got the same complete stream, else 1.

    The broker, the HTTP server and the HTTP client are stopped before this returns, also on
    failure or cancellation.
    """
    console = console or Console()
    # The durable consumers run here too; the sentence logger's JSON lines stay off, since
    # this output is the demo's.
    consumers = [Sentences(JsonLinesSink("off")), Analytics()]
    async with Broker.open(settings, consumers=consumers) as broker:
        with _loopback_listener() as sock:
            host, port = sock.getsockname()[:2]
            console.print(f"tokentee demo: Redis at {broker.url}, HTTP API at http://{host}:{port}")
            server = build_server(settings, broker, log_level="warning", access_log=False)
            code = 1
            async with asyncio.TaskGroup() as tg:
                serving = tg.create_task(server.serve(sockets=[sock]), name="demo-http-server")
                try:
                    async with httpx.AsyncClient(
                        base_url=f"http://{host}:{port}", trust_env=False,
                        timeout=httpx.Timeout(10.0, read=settings.heartbeat_seconds + 10.0),
                    ) as client:
                        code = await _show(client, console, broker, tokens=tokens, rate=rate)
                except httpx.HTTPError as exc:
                    console.print(f"[bold red]FAIL[/] {type(exc).__name__}: {exc}")
                finally:
                    # Stop uvicorn and wait for it here: if the group cancelled it instead (on
                    # Ctrl-C), it would leave its lifespan task behind to log a traceback.
                    # asyncio.wait, not await: a server failure is the group's to report.
                    server.should_exit = True
                    await asyncio.wait([serving])
    return code


@contextlib.contextmanager
def _loopback_listener() -> Iterator[socket.socket]:
    # Bound and listening before the server runs: requests made before uvicorn accepts
    # simply wait in the backlog, so nothing needs to poll for "server ready".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield sock


def _tail(text: str) -> str:
    return text if len(text) <= TAIL_CHARS else "..." + text[-TAIL_CHARS:]
