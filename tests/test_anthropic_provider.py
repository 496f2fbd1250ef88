"""The anthropic provider against a loopback server speaking the Messages stream format."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.errors import ProviderConfigError
from broker.events import (
    Finish,
    ReasoningDelta,
    ReasoningSignature,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    UpstreamFailure,
    Usage,
)
from broker.providers.anthropic import AnthropicProvider
from broker.providers.base import GenerationRequest
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import make_settings
from tests.test_openai_provider import Conn, FakeUpstream

KEY = "sk-ant-test-0123456789"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


START = event("message_start", message={
    "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-x",
    "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1}})
PING = event("ping")


def stop(reason: str = "end_turn", output_tokens: int = 15) -> bytes:
    return (event("message_delta", delta={"stop_reason": reason, "stop_sequence": None},
                  usage={"output_tokens": output_tokens}) + event("message_stop"))


def text_block(index: int, *pieces: str) -> bytes:
    out = event("content_block_start", index=index, content_block={"type": "text", "text": ""})
    for piece in pieces:
        out += event("content_block_delta", index=index,
                     delta={"type": "text_delta", "text": piece})
    return out + event("content_block_stop", index=index)


def body(*parts: bytes) -> Any:
    async def script(conn: Conn) -> None:
        await conn.head()
        for part in parts:
            await conn.chunk(part)
        await conn.end()
    return script


def settings(base_url: str, **kw: Any) -> Settings:
    kw.setdefault("anthropic_api_key", KEY)
    kw.setdefault("upstream_retries", 0)
    return Settings(anthropic_base_url=base_url.removesuffix("/v1/"), **kw)


async def run(script: Any, request: GenerationRequest | None = None, **kw: Any
              ) -> tuple[list[Any], FakeUpstream]:
    async with FakeUpstream(script) as upstream:
        provider = AnthropicProvider(settings(upstream.base_url, **kw))
        try:
            events = [e async for e in provider.stream(request or GenerationRequest(MESSAGES))]
        finally:
            await provider.aclose()
    return events, upstream


async def test_text_stream_with_usage_and_stop_reason() -> None:
    events, upstream = await run(body(START, PING, text_block(0, "Hel", "lo"), PING, stop()))
    assert events == [TextDelta("Hel"), TextDelta("lo"),
                      Usage({"input_tokens": 10, "output_tokens": 15}), Finish("stop")]
    sent = upstream.received[0]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    payload = sent.json()
    assert payload["system"] == "Be brief."
    assert payload["messages"] == [{"role": "user", "content": "hi"}]
    assert payload["stream"] is True
    assert payload["max_tokens"] == 4096
    assert payload["model"] == "claude-sonnet-4-5"


THINKING_AND_TOOLS = (
    START,
    event("content_block_start", index=0,
          content_block={"type": "thinking", "thinking": "", "signature": ""}),
    event("content_block_delta", index=0,
          delta={"type": "thinking_delta", "thinking": "The user wants weather."}),
    event("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "sig1"}),
    event("content_block_stop", index=0),
    text_block(1, "Let me check."),
    event("content_block_start", index=2, content_block={
        "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}),
    event("content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": ""}),
    event("content_block_delta", index=2,
          delta={"type": "input_json_delta", "partial_json": '{"city": "Pa'}),
    event("content_block_delta", index=2,
          delta={"type": "input_json_delta", "partial_json": 'ris"}'}),
    event("content_block_stop", index=2),
    event("some_future_event", whatever=1),
    stop("tool_use", 40),
)


async def test_thinking_signature_and_tool_use() -> None:
    events, _ = await run(body(*THINKING_AND_TOOLS), GenerationRequest(MESSAGES, params={
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024}}))
    assert events == [
        ReasoningDelta("The user wants weather."), ReasoningSignature("sig1"),
        TextDelta("Let me check."),
        ToolCallDelta(2, id="toolu_1", name="get_weather"),
        ToolCallDelta(2, arguments='{"city": "Pa'), ToolCallDelta(2, arguments='ris"}'),
        ToolCallEnd(2),
        Usage({"input_tokens": 10, "output_tokens": 40}), Finish("tool_calls"),
    ]


async def test_the_log_of_a_tool_use_generation(redis_url: str) -> None:
    async with FakeUpstream(body(*THINKING_AND_TOOLS)) as upstream:
        s = make_settings(redis_url, anthropic_base_url=upstream.base_url.removesuffix("/v1/"),
                          anthropic_api_key=KEY, upstream_retries=0)
        async with Broker.open(s) as broker:
            info = await broker.start(GenerationRequest(MESSAGES), "anthropic")
            events = [e async for e in broker.events(info.id)]
            state = await broker.state(info.id)
    assert [e.type for e in events] == [
        "reasoning", "reasoning_signature", "token", "tool_call_delta", "tool_call_delta",
        "tool_call_delta", "tool_call", "done"]
    assert events[6].data == {"index": 2, "id": "toolu_1", "name": "get_weather",
                              "arguments": '{"city": "Paris"}'}
    assert events[-1].data == {"finish_reason": "tool_calls",
                               "usage": {"input_tokens": 10, "output_tokens": 40}}
    assert state.text == "Let me check."
    assert info.model == "claude-sonnet-4-5"


async def test_error_event_mid_stream_ends_the_generation() -> None:
    overloaded = event("error", error={"type": "overloaded_error", "message": "Overloaded"})
    events, upstream = await run(
        body(START, text_block(0, "partial"), overloaded), upstream_retries=2)
    assert events[0] == TextDelta("partial")
    assert events[-1] == UpstreamFailure("overloaded_error", "Overloaded")
    assert len(upstream.received) == 1  # after the first token: never retried


async def test_overloaded_before_the_first_token_is_retried() -> None:
    calls = {"n": 0}
    overloaded = event("error", error={"type": "overloaded_error", "message": "Overloaded"})

    async def script(conn: Conn) -> None:
        calls["n"] += 1
        parts = (START, overloaded) if calls["n"] == 1 else (START, text_block(0, "ok"), stop())
        await body(*parts)(conn)

    events, upstream = await run(script, upstream_retries=1, upstream_retry_base_seconds=0.01)
    assert events[0] == TextDelta("ok")
    assert isinstance(events[-1], Finish)
    assert len(upstream.received) == 2


async def test_http_529_is_reported_with_its_message_and_no_key() -> None:
    async def overloaded(conn: Conn) -> None:
        payload = json.dumps({"type": "error", "error": {
            "type": "overloaded_error", "message": f"Overloaded (key {KEY})"}}).encode()
        await conn.head(status=529, content_type="application/json", chunked=False,
                        extra=f"Content-Length: {len(payload)}\r\n")
        await conn.raw(payload)

    events, _ = await run(overloaded)
    assert events == [UpstreamFailure("upstream_http_529", "Overloaded (key [redacted])")]


async def test_a_body_cut_before_message_stop() -> None:
    events, _ = await run(body(START, text_block(0, "cut")))
    assert events[-1].code == "upstream_incomplete"  # type: ignore[union-attr]
    after_stop_reason, _ = await run(body(
        START, text_block(0, "done"),
        event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 2})))
    assert after_stop_reason[-1] == Finish("stop")


@pytest.mark.parametrize(("request_", "match"), [
    (GenerationRequest([{"role": "tool", "content": "x"}]), "role 'tool' is not supported"),
    (GenerationRequest(MESSAGES, params={"system": "x"}), "set by the broker"),
    (GenerationRequest(MESSAGES, params={"logprobs": True}), "unknown parameters"),
])
def test_bad_requests_are_refused_before_any_call(request_: GenerationRequest,
                                                  match: str) -> None:
    provider = AnthropicProvider(Settings(anthropic_api_key=KEY))
    with pytest.raises(ProviderConfigError, match=match):
        provider.validate(request_)


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_keys_never_reach_logs_events_or_redis(
    redis_url: str, provider: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """An upstream that echoes the key back, in an error body and in a stream error."""
    import logging

    import redis.asyncio as aioredis

    caplog.set_level(logging.DEBUG)

    async def echo_401(conn: Conn) -> None:
        payload = json.dumps({"error": {"type": "authentication_error",
                                        "message": f"invalid x-api-key {KEY}"}}).encode()
        await conn.head(status=401, content_type="application/json", chunked=False,
                        extra=f"Content-Length: {len(payload)}\r\n")
        await conn.raw(payload)

    async def echo_in_stream(conn: Conn) -> None:
        await conn.head()
        if provider == "anthropic":
            await conn.chunk(START + event("error", error={"type": f"bad {KEY}",
                                                           "message": f"key {KEY} revoked"}))
        else:
            await conn.chunk(b'data: {"error": {"code": "' + KEY.encode()
                             + b'", "message": "key ' + KEY.encode() + b' revoked"}}\n\n')
        await conn.end()

    for script in (echo_401, echo_in_stream):
        async with FakeUpstream(script) as upstream:
            base = upstream.base_url
            s = make_settings(
                redis_url, upstream_retries=0,
                anthropic_base_url=base.removesuffix("/v1/"), anthropic_api_key=KEY,
                openai_base_url=base, openai_api_key=KEY,
            )
            async with Broker.open(s) as broker:
                info = await broker.start(GenerationRequest(MESSAGES), provider)
                events = [e async for e in broker.events(info.id)]
                assert events[-1].type == "error"
                assert KEY not in json.dumps(events[-1].data)
                client = aioredis.from_url(redis_url)
                try:
                    async for key in client.scan_iter(match=f"{s.key_prefix}:*"):
                        kind = (await client.type(key)).decode()
                        if kind == "stream":
                            dump = repr(await client.xrange(key))
                        elif kind == "hash":
                            dump = repr(await client.hgetall(key))
                        elif kind == "string":
                            dump = repr(await client.get(key))
                        else:
                            continue
                        assert KEY not in dump, key
                finally:
                    await client.aclose()
    assert KEY not in caplog.text


async def test_server_side_tools_are_not_client_tool_calls() -> None:
    search = (START,
              event("content_block_start", index=0, content_block={
                  "type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                  "input": {}}),
              event("content_block_delta", index=0,
                    delta={"type": "input_json_delta", "partial_json": '{"query": "x"}'}),
              event("content_block_stop", index=0),
              text_block(1, "Found it."), stop())
    events, _ = await run(body(*search))
    assert events == [TextDelta("Found it."),
                      Usage({"input_tokens": 10, "output_tokens": 15}), Finish("stop")]
