"""OpenAIProvider against a real HTTP/1.1 server on loopback that we script byte by byte."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from broker.errors import ProviderConfigError
from broker.events import Finish, ProviderEvent, TextDelta, UpstreamFailure, Usage
from broker.providers.base import GenerationRequest
from broker.providers.openai import OpenAIProvider
from broker.settings import Settings

pytestmark = pytest.mark.timeout(20)

CANARY = "sk-canary-7f3a9c1e5b2d4680aa11ee22"
MESSAGES = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


# --- the real chunk format -------------------------------------------------------------


def chunk_json(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
        "usage": None,
    }
    body.update(extra)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


ROLE = chunk_json({"role": "assistant", "content": ""})
FINISH = chunk_json({}, "stop")
USAGE_CHUNK = chunk_json(choices=[], usage=USAGE)


def content(text: str) -> str:
    return chunk_json({"content": text})


def sse(*datas: str, eol: str = "\n") -> bytes:
    return "".join(f"data: {d}{eol}{eol}" for d in datas).encode()


FULL = (ROLE, content("Hel"), content("lo"), FINISH, USAGE_CHUNK, "[DONE]")
FULL_EVENTS = [TextDelta("Hel"), TextDelta("lo"), Usage(USAGE), Finish("stop")]


# --- a scripted HTTP/1.1 server ------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer_closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def head(
        self,
        status: int = 200,
        content_type: str = "text/event-stream",
        chunked: bool = True,
        extra: str = "",
    ) -> None:
        framing = "Transfer-Encoding: chunked\r\n" if chunked else ""
        self.writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n{framing}"
            f"Connection: close\r\n{extra}\r\n".encode()
        )
        await self.writer.drain()

    async def chunk(self, data: bytes) -> None:
        """One HTTP chunk: h11 hands each to httpx as (at least) one separate piece."""
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def end(self) -> None:
        await self.raw(b"0\r\n\r\n")

    async def wait_peer_close(self) -> None:
        """Block until the client closes the connection (EOF or reset)."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.peer_closed.set()


Script = Callable[[Conn], Awaitable[None]]


class FakeUpstream:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[Received] = []
        self.conns: list[Conn] = []
        self.connected = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/"  # trailing slash on purpose

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Conn(reader, writer)
        self.conns.append(conn)
        self.connected.set()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
            method, path, _ = request_line.split(" ")
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.received.append(Received(method, path, headers, body))
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    async def __aenter__(self) -> FakeUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        # Every handler must end by itself: one still waiting for the client to close means
        # the provider leaked the upstream connection.
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            _, still = await asyncio.wait(pending, timeout=5)
            for task in still:
                task.cancel()
            assert not still, "the client never closed its upstream connection"


def settings(base_url: str, **kw: Any) -> Settings:
    kw.setdefault("openai_api_key", None)
    kw.setdefault("upstream_retries", 0)  # one attempt each: retries are tested apart
    return Settings(openai_base_url=base_url, **kw)


@asynccontextmanager
async def provider_for(
    script: Script, **kw: Any
) -> AsyncIterator[tuple[OpenAIProvider, FakeUpstream]]:
    async with FakeUpstream(script) as upstream:
        provider = OpenAIProvider(settings(upstream.base_url, **kw))
        try:
            yield provider, upstream
        finally:
            await provider.aclose()


async def collect(
    provider: OpenAIProvider, request: GenerationRequest | None = None
) -> list[ProviderEvent]:
    return [e async for e in provider.stream(request or GenerationRequest(MESSAGES))]


def send_body(body: bytes, *, pieces: list[bytes] | None = None, chunked: bool = True) -> Script:
    """A script: 200 event-stream, then ``body`` (as the given HTTP chunks), then the end."""

    async def script(conn: Conn) -> None:
        await conn.head(chunked=chunked)
        for piece in pieces if pieces is not None else [body]:
            if chunked:
                await conn.chunk(piece)
            else:
                await conn.raw(piece)
        if chunked:
            await conn.end()

    return script


# --- the happy path and framing variants ---------------------------------------------------


async def test_full_stream_maps_to_deltas_usage_then_finish() -> None:
    async with provider_for(send_body(sse(*FULL))) as (provider, _):
        assert await collect(provider) == FULL_EVENTS


async def test_each_sse_event_in_its_own_http_chunk_with_keepalive_comments() -> None:
    pieces = [b": keep-alive\n\n", *(sse(d) for d in FULL)]
    async with provider_for(send_body(b"", pieces=pieces)) as (provider, _):
        assert await collect(provider) == FULL_EVENTS


@pytest.mark.parametrize("eol", ["\r\n", "\r"])
async def test_crlf_and_cr_framing(eol: str) -> None:
    async with provider_for(send_body(sse(*FULL, eol=eol))) as (provider, _):
        assert await collect(provider) == FULL_EVENTS


async def test_utf8_split_across_http_chunks_at_every_byte() -> None:
    text = "héllo € 😀"
    body = sse(ROLE, content(text), FINISH, USAGE_CHUNK, "[DONE]")
    # One byte per HTTP chunk, so every multi-byte character arrives split at every boundary.
    pieces = [body[i : i + 1] for i in range(len(body))]
    async with provider_for(send_body(b"", pieces=pieces)) as (provider, _):
        assert await collect(provider) == [TextDelta(text), Usage(USAGE), Finish("stop")]


async def test_usage_chunk_with_null_choices() -> None:
    usage_null = chunk_json(choices=None, usage=USAGE)
    body = sse(ROLE, content("x"), FINISH, usage_null, "[DONE]")
    async with provider_for(send_body(body)) as (provider, _):
        assert await collect(provider) == [TextDelta("x"), Usage(USAGE), Finish("stop")]


async def test_finish_reason_is_passed_on() -> None:
    body = sse(ROLE, content("x"), chunk_json({}, "length"), USAGE_CHUNK, "[DONE]")
    async with provider_for(send_body(body)) as (provider, _):
        assert await collect(provider) == [TextDelta("x"), Usage(USAGE), Finish("length")]


async def test_done_without_finish_reason_is_stop_and_no_usage_is_fine() -> None:
    async with provider_for(send_body(sse(content("x"), "[DONE]"))) as (provider, _):
        assert await collect(provider) == [TextDelta("x"), Finish("stop")]


async def test_repeated_usage_is_reported_once_the_last_one() -> None:
    first = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    body = sse(
        chunk_json({"content": "a"}, usage=first),
        chunk_json({"content": "b"}, "stop", usage=USAGE),
        "[DONE]",
    )
    async with provider_for(send_body(body)) as (provider, _):
        assert await collect(provider) == [
            TextDelta("a"),
            TextDelta("b"),
            Usage(USAGE),
            Finish("stop"),
        ]


async def test_nothing_after_done_is_read() -> None:
    body = sse(content("x"), "[DONE]", content("ignored"))
    async with provider_for(send_body(body)) as (provider, _):
        assert await collect(provider) == [TextDelta("x"), Finish("stop")]


# --- the request ---------------------------------------------------------------------------


async def test_request_body_and_headers_with_key() -> None:
    request = GenerationRequest(
        [{"role": "system", "content": "be brief"}, *MESSAGES],
        model="gpt-test",
        params={"temperature": 0.25, "max_tokens": 7, "stop": ["\n"], "n": 1},
    )
    async with provider_for(send_body(sse(*FULL)), openai_api_key=CANARY) as (provider, up):
        assert await collect(provider, request) == FULL_EVENTS
    (received,) = up.received
    assert received.method == "POST"
    assert received.path == "/v1/chat/completions"
    assert received.headers["authorization"] == f"Bearer {CANARY}"
    assert received.headers["accept"] == "text/event-stream"
    assert received.headers["content-type"] == "application/json"
    assert received.json() == {
        "model": "gpt-test",
        "messages": [{"role": "system", "content": "be brief"}, *MESSAGES],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.25,
        "max_tokens": 7,
        "stop": ["\n"],
        "n": 1,
    }


async def test_no_authorization_header_without_key_and_default_model() -> None:
    async with provider_for(send_body(sse(*FULL)), openai_model="default-m") as (provider, up):
        request = GenerationRequest(MESSAGES)
        assert provider.model_for(request) == "default-m"
        assert await collect(provider, request) == FULL_EVENTS
    (received,) = up.received
    assert "authorization" not in received.headers
    assert received.json()["model"] == "default-m"


async def test_injected_client_is_used_and_not_closed() -> None:
    async with FakeUpstream(send_body(sse(*FULL))) as up, httpx.AsyncClient() as client:
        provider = OpenAIProvider(settings(up.base_url.rstrip("/")), client=client)
        assert await collect(provider) == FULL_EVENTS
        await provider.aclose()
        assert not client.is_closed
        assert up.received[0].path == "/v1/chat/completions"


async def test_owned_client_is_closed_and_recreated() -> None:
    async def script(conn: Conn) -> None:
        await send_body(sse(*FULL))(conn)

    async with provider_for(script) as (provider, up):
        assert await collect(provider) == FULL_EVENTS
        await provider.aclose()
        await provider.aclose()  # idempotent
        assert await collect(provider) == FULL_EVENTS  # a fresh client, created lazily
    assert len(up.received) == 2


# --- request validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"logit_bias": {}}, "unknown parameters.*logit_bias"),
        ({"n": 2}, "'n' must be 1"),
        ({"n": True}, "'n' must be 1"),
        ({"stream": False}, "set by the broker"),
        ({"model": "x"}, "set by the broker"),
        ({"functions": []}, "deprecated function-calling API"),
    ],
)
async def test_bad_params_raise_before_any_request(params: dict[str, Any], match: str) -> None:
    async with provider_for(send_body(sse(*FULL))) as (provider, up):
        request = GenerationRequest(MESSAGES, params=params)
        with pytest.raises(ProviderConfigError, match=match):
            provider.validate(request)
        with pytest.raises(ProviderConfigError, match=match):
            await collect(provider, request)
    assert up.received == []


def test_bad_settings_raise_config_errors_without_quoting_the_key() -> None:
    bad_key = OpenAIProvider(settings("http://127.0.0.1:1/v1", openai_api_key=CANARY + "\n"))
    with pytest.raises(ProviderConfigError) as info:
        bad_key.validate(GenerationRequest(MESSAGES))
    assert CANARY not in str(info.value)
    no_scheme = OpenAIProvider(settings("127.0.0.1:1/v1"))
    with pytest.raises(ProviderConfigError, match="http"):
        no_scheme.validate(GenerationRequest(MESSAGES))


# --- upstream failures ---------------------------------------------------------------------


async def test_error_object_mid_stream() -> None:
    error = {
        "error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}
    }
    body = sse(ROLE, content("Hi"), json.dumps(error), FINISH, "[DONE]")
    async with provider_for(send_body(body)) as (provider, _):
        assert await collect(provider) == [
            TextDelta("Hi"),
            UpstreamFailure("server_error", "overloaded"),
        ]


async def test_error_object_code_wins_and_fallback() -> None:
    body = sse(json.dumps({"error": {"message": "slow down", "code": "rate_limit_exceeded"}}))
    async with provider_for(send_body(body)) as (provider, _):
        assert await collect(provider) == [UpstreamFailure("rate_limit_exceeded", "slow down")]
    async with provider_for(send_body(sse('{"error": "boom"}'))) as (provider, _):
        assert await collect(provider) == [UpstreamFailure("upstream_error", "boom")]


async def test_malformed_json() -> None:
    body = sse(ROLE, content("Hi"), '{"choices": [', FINISH, "[DONE]")
    async with provider_for(send_body(body)) as (provider, _):
        events = await collect(provider)
    assert events[0] == TextDelta("Hi")
    assert isinstance(events[1], UpstreamFailure)
    assert events[1].code == "upstream_protocol"
    assert len(events) == 2


async def test_chunked_body_cut_before_done_is_disconnected() -> None:
    async def script(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(sse(ROLE, content("Hel")))
        conn.writer.transport.abort()

    async with provider_for(script) as (provider, _):
        events = await collect(provider)
    assert events[0] == TextDelta("Hel")
    assert isinstance(events[1], UpstreamFailure)
    assert events[1].code == "upstream_disconnected"
    assert len(events) == 2


async def test_clean_eof_before_done_is_incomplete() -> None:
    # Connection: close framing, so EOF is a well-formed end of the HTTP body.
    body = sse(ROLE, content("Hel"))
    async with provider_for(send_body(body, chunked=False)) as (provider, _):
        events = await collect(provider)
    assert events == [
        TextDelta("Hel"),
        UpstreamFailure("upstream_incomplete", "upstream stream ended before [DONE]"),
    ]


async def test_eof_after_finish_reason_is_still_a_finish() -> None:
    body = sse(ROLE, content("Hel"), FINISH, USAGE_CHUNK)
    async with provider_for(send_body(body, chunked=False)) as (provider, _):
        assert await collect(provider) == [TextDelta("Hel"), Usage(USAGE), Finish("stop")]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, {"message": "Incorrect API key provided", "type": "invalid_request_error"}),
        (429, {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}),
        (500, {"message": "The server had an error", "type": "server_error"}),
    ],
)
async def test_http_error_with_json_body(status: int, error: dict[str, Any]) -> None:
    async def script(conn: Conn) -> None:
        await conn.head(status, "application/json")
        await conn.chunk(json.dumps({"error": error}).encode())
        await conn.end()

    async with provider_for(script) as (provider, _):
        assert await collect(provider) == [
            UpstreamFailure(f"upstream_http_{status}", error["message"])
        ]


async def test_http_error_with_text_body() -> None:
    async def script(conn: Conn) -> None:
        await conn.head(502, "text/html")
        await conn.chunk(b"  <html>bad gateway</html>\n")
        await conn.end()

    async with provider_for(script) as (provider, _):
        assert await collect(provider) == [
            UpstreamFailure("upstream_http_502", "<html>bad gateway</html>")
        ]


async def test_http_error_body_is_read_only_up_to_a_bound() -> None:
    # 8 KB of body and then nothing: a reader that wanted the whole body would wait until
    # the read timeout (far above the test timeout); the bounded reader stops at 4 KB.
    async def script(conn: Conn) -> None:
        await conn.head(500, "text/plain")
        await conn.chunk(b"e" * 8192)
        await conn.wait_peer_close()

    async with provider_for(script, upstream_read_timeout=600) as (provider, up):
        events = await collect(provider)
        await asyncio.wait_for(up.conns[0].peer_closed.wait(), 5)
    (failure,) = events
    assert isinstance(failure, UpstreamFailure)
    assert failure.code == "upstream_http_500"
    assert failure.message == "e" * 500


async def test_success_status_with_wrong_content_type() -> None:
    async def script(conn: Conn) -> None:
        await conn.head(200, "application/json")
        await conn.chunk(b'{"choices": []}')
        await conn.end()

    async with provider_for(script) as (provider, _):
        (failure,) = await collect(provider)
    assert isinstance(failure, UpstreamFailure)
    assert failure.code == "upstream_protocol"
    assert "application/json" in failure.message


async def test_oversized_line_fails_and_closes_the_connection() -> None:
    async def script(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(sse(content("ok")))
        await conn.chunk(b"data: " + b"x" * 1000)
        await conn.chunk(b"x" * 1000)  # over the 1024-byte cap, still no line end
        await conn.wait_peer_close()

    async with provider_for(script, upstream_max_line_bytes=1024) as (provider, up):
        events = await collect(provider)
        await asyncio.wait_for(up.conns[0].peer_closed.wait(), 5)
    assert events[0] == TextDelta("ok")
    assert isinstance(events[1], UpstreamFailure)
    assert events[1].code == "upstream_protocol"
    assert "1024" in events[1].message


async def test_headers_then_silence_is_a_read_timeout() -> None:
    async def script(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(sse(ROLE, content("Hel")))
        await conn.wait_peer_close()

    async with provider_for(script, upstream_read_timeout=0.2) as (provider, up):
        events = await collect(provider)
        await asyncio.wait_for(up.conns[0].peer_closed.wait(), 5)
    assert events == [
        TextDelta("Hel"),
        UpstreamFailure("upstream_timeout", "upstream timed out (ReadTimeout)"),
    ]


async def test_no_response_headers_is_a_read_timeout() -> None:
    async with provider_for(Conn.wait_peer_close, upstream_read_timeout=0.2) as (provider, _):
        assert await collect(provider) == [
            UpstreamFailure("upstream_timeout", "upstream timed out (ReadTimeout)")
        ]


async def test_connection_refused_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    provider = OpenAIProvider(settings(f"http://127.0.0.1:{port}/v1"))
    try:
        events = await collect(provider)
    finally:
        await provider.aclose()
    assert events == [
        UpstreamFailure("upstream_unreachable", "could not connect to upstream (ConnectError)")
    ]


# --- the key never leaks -------------------------------------------------------------------


async def test_canary_key_never_appears_in_events_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"Incorrect API key provided: {CANARY}"

    async def echo_401(conn: Conn) -> None:
        await conn.head(401, "application/json")
        await conn.chunk(json.dumps({"error": {"message": echo, "code": CANARY}}).encode())
        await conn.end()

    async def echo_mid_stream(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(sse(content("x"), json.dumps({"error": {"message": echo}})))
        await conn.end()

    async def echo_text_500(conn: Conn) -> None:
        await conn.head(500, "text/plain")
        await conn.chunk(echo.encode())
        await conn.end()

    async def echo_content_type(conn: Conn) -> None:
        await conn.head(200, f"text/{CANARY}")
        await conn.end()

    async def drop(conn: Conn) -> None:
        await conn.head()
        conn.writer.transport.abort()

    events: list[ProviderEvent] = []
    for script in (echo_401, echo_mid_stream, echo_text_500, echo_content_type, drop):
        async with provider_for(script, openai_api_key=CANARY) as (provider, up):
            events += await collect(provider)
        assert up.received[0].headers["authorization"] == f"Bearer {CANARY}"
    failures = [e for e in events if isinstance(e, UpstreamFailure)]
    assert len(failures) == 5
    assert failures[0] == UpstreamFailure(
        "upstream_http_401", "Incorrect API key provided: [redacted]"
    )
    assert CANARY not in repr(events)
    assert caplog.records  # the capture works, so the next lines can fail
    # The one exception is not ours: httpcore's DEBUG trace prints response headers verbatim,
    # so the header the server echoed the key into (echo_content_type) shows up there.
    leaks = [r for r in caplog.records if CANARY in r.getMessage()]
    assert [(r.name, r.getMessage().split(" ")[0]) for r in leaks] == [
        ("httpcore.http11", "receive_response_headers.complete")
    ]


async def test_key_cut_by_truncation_leaves_no_prefix_behind() -> None:
    # 495 characters, then the key: truncating to 500 before redacting would keep "sk-ca".
    message = "x" * 495 + CANARY

    async def script(conn: Conn) -> None:
        await conn.head(403, "application/json")
        await conn.chunk(json.dumps({"error": {"message": message}}).encode())
        await conn.end()

    async with provider_for(script, openai_api_key=CANARY) as (provider, _):
        (failure,) = await collect(provider)
    assert failure == UpstreamFailure("upstream_http_403", "x" * 495 + "[reda")


async def test_unreadable_error_body_still_reports_the_status() -> None:
    async def script(conn: Conn) -> None:
        await conn.head(503, "application/json")
        await conn.wait_peer_close()

    async with provider_for(script, upstream_read_timeout=0.2) as (provider, _):
        assert await collect(provider) == [UpstreamFailure("upstream_http_503", "X")]


# --- the consumer stops early --------------------------------------------------------------


def endless_stream() -> tuple[Script, asyncio.Event]:
    sent = asyncio.Event()

    async def script(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(sse(ROLE, content("Hel")))
        sent.set()
        await conn.wait_peer_close()

    return script, sent


async def test_aclose_mid_stream_closes_the_upstream_connection() -> None:
    script, _ = endless_stream()
    async with provider_for(script) as (provider, up):
        stream = provider.stream(GenerationRequest(MESSAGES))
        assert await anext(stream) == TextDelta("Hel")
        assert not up.conns[0].peer_closed.is_set()
        await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(up.conns[0].peer_closed.wait(), 5)


async def test_cancel_while_waiting_for_upstream_closes_the_connection() -> None:
    script, sent = endless_stream()
    got: list[ProviderEvent] = []
    first = asyncio.Event()

    async def consume(provider: OpenAIProvider) -> None:
        async for event in provider.stream(GenerationRequest(MESSAGES)):
            got.append(event)
            first.set()

    async with provider_for(script, upstream_read_timeout=600) as (provider, up):
        task = asyncio.create_task(consume(provider))
        await asyncio.wait_for(first.wait(), 5)
        await sent.wait()
        # The consumer is now blocked reading the next chunk, which never comes.
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(up.conns[0].peer_closed.wait(), 5)
    assert got == [TextDelta("Hel")]
