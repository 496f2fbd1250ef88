"""Reasoning and tool calls: mapped from OpenAI-compatible chunks, accumulated by the
producer, logged as their own entries, relayed over SSE."""

from __future__ import annotations

import json
from typing import Any

from broker.events import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)
from broker.providers.base import GenerationRequest
from broker.service import Broker
from tests.conftest import make_settings
from tests.test_openai_provider import (
    MESSAGES,
    ROLE,
    FakeUpstream,
    chunk_json,
    collect,
    provider_for,
    send_body,
    sse,
)


def tool(index: int, *, id: str | None = None, name: str | None = None,
         arguments: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "type": "function", "function": {}}
    if id:
        call["id"] = id
    if name:
        call["function"]["name"] = name
    if arguments is not None:
        call["function"]["arguments"] = arguments
    return call


# Two parallel calls, their argument pieces interleaved, as OpenAI streams them.
TOOL_STREAM = (
    ROLE,
    chunk_json({"reasoning_content": "Need the weather "}),
    chunk_json({"reasoning_content": "in two cities."}),
    chunk_json({"tool_calls": [tool(0, id="call_a", name="get_weather", arguments="")]}),
    chunk_json({"tool_calls": [tool(0, arguments='{"city": ')]}),
    chunk_json({"tool_calls": [tool(1, id="call_b", name="get_weather", arguments='{"ci')]}),
    chunk_json({"tool_calls": [tool(0, arguments='"Paris"}')]}),
    chunk_json({"tool_calls": [tool(1, arguments='ty": "Oslo"}')]}),
    chunk_json(finish="tool_calls"),
    "[DONE]",
)


async def test_openai_chunks_map_to_reasoning_and_tool_call_deltas() -> None:
    async with provider_for(send_body(sse(*TOOL_STREAM))) as (provider, _):
        events = await collect(provider, GenerationRequest(MESSAGES, params={
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]}))
    assert events == [
        ReasoningDelta("Need the weather "),
        ReasoningDelta("in two cities."),
        ToolCallDelta(0, id="call_a", name="get_weather", arguments=""),
        ToolCallDelta(0, arguments='{"city": '),
        ToolCallDelta(1, id="call_b", name="get_weather", arguments='{"ci'),
        ToolCallDelta(0, arguments='"Paris"}'),
        ToolCallDelta(1, arguments='ty": "Oslo"}'),
        Finish("tool_calls"),
    ]


async def test_text_and_reasoning_keys_from_other_servers() -> None:
    stream = (ROLE, chunk_json({"reasoning": "hmm"}), chunk_json({"content": "ok"}),
              chunk_json(finish="stop"), "[DONE]")
    async with provider_for(send_body(sse(*stream))) as (provider, _):
        events = await collect(provider)
    assert events == [ReasoningDelta("hmm"), TextDelta("ok"), Finish("stop")]


async def test_the_log_holds_reasoning_tool_deltas_and_complete_tool_calls(
    redis_url: str,
) -> None:
    async with FakeUpstream(send_body(sse(*TOOL_STREAM))) as upstream:
        settings = make_settings(redis_url, openai_base_url=upstream.base_url,
                                 openai_api_key="sk-test", upstream_retries=0)
        async with Broker.open(settings) as broker:
            info = await broker.start(GenerationRequest(MESSAGES, params={
                "tools": [{"type": "function", "function": {"name": "get_weather"}}],
                "tool_choice": "auto"}), "openai")
            events = [e async for e in broker.events(info.id)]
            state = await broker.state(info.id)
    sent = upstream.received[0].json()
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["tool_choice"] == "auto"
    assert [e.type for e in events] == [
        "reasoning", "reasoning", "tool_call_delta", "tool_call_delta", "tool_call_delta",
        "tool_call_delta", "tool_call_delta", "tool_call", "tool_call", "done"]
    assert events[0].data == {"text": "Need the weather "}
    assert events[2].data == {"index": 0, "id": "call_a", "name": "get_weather"}
    assert events[3].data == {"index": 0, "arguments": '{"city": '}
    calls = [e.data for e in events if e.type == "tool_call"]
    assert calls == [
        {"index": 0, "id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"index": 1, "id": "call_b", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
    ]
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert events[-1].data["finish_reason"] == "tool_calls"
    assert state.text == ""  # reasoning and tool calls are not the text
