"""``format=ai-sdk``: the Vercel AI SDK UI message stream, from the same log."""

from __future__ import annotations

import json
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from broker.events import Event
from broker.formats import AISDKParts
from broker.service import Broker
from tests.conftest import make_settings, running_server
from tests.test_openai_provider import FakeUpstream, send_body, sse
from tests.test_tool_calls import TOOL_STREAM


async def parts(http: httpx.AsyncClient, gid: str, after: int | None = None
                ) -> tuple[list[Any], list[str], httpx.Headers]:
    headers = {"Last-Event-ID": str(after)} if after else {}
    out: list[Any] = []
    ids: list[str] = []
    async with aconnect_sse(http, "GET", f"/v1/streams/{gid}/events",
                            params={"format": "ai-sdk"}, headers=headers) as source:
        async for message in source.aiter_sse():
            if message.data:
                out.append(message.data if message.data == "[DONE]" else json.loads(message.data))
                ids.append(message.id)
        return out, ids, source.response.headers


def check_strict_order(stream: list[Any]) -> None:
    """What the AI SDK enforces: no delta or end without its start."""
    open_parts: set[str] = set()
    tools: set[str] = set()
    for part in stream:
        if part == "[DONE]":
            continue
        kind = part["type"]
        if kind.endswith("-start") and kind != "tool-input-start":
            open_parts.add(part["id"])
        elif (kind.endswith("-delta") and kind != "tool-input-delta") or kind.endswith("-end"):
            assert part["id"] in open_parts, part
            if kind.endswith("-end"):
                open_parts.discard(part["id"])
        elif kind == "tool-input-start":
            tools.add(part["toolCallId"])
        elif kind in ("tool-input-delta", "tool-input-available"):
            assert part["toolCallId"] in tools, part
    assert not open_parts  # every part ended before the finish


async def test_text_stream_in_ai_sdk_parts(http: httpx.AsyncClient) -> None:
    gid = (await http.post("/v1/streams", json={
        "prompt": "p", "params": {"text": "Hi there you", "tokens_per_second": 0}})).json()["id"]
    stream, ids, headers = await parts(http, gid)
    assert headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert stream == [
        {"type": "start", "messageId": gid},
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "Hi"},
        {"type": "text-delta", "id": "text-1", "delta": " there"},
        {"type": "text-delta", "id": "text-1", "delta": " you"},
        {"type": "text-end", "id": "text-1"},
        {"type": "finish"},
        "[DONE]",
    ]
    # One id per entry, on its last frame (the SSE last event id carries over).
    assert ids[1:] == ["", "1", "2", "3", "3", "3", "4"]
    check_strict_order(stream)
    # Resumed mid-text: a new text part, no second start of the message.
    resumed, ids, _ = await parts(http, gid, after=2)
    assert resumed[0] == {"type": "text-start", "id": "text-3"}
    assert [p.get("delta") for p in resumed if isinstance(p, dict)
            and p["type"] == "text-delta"] == [" you"]
    check_strict_order(resumed)


async def test_reasoning_and_tool_calls_in_ai_sdk_parts(redis_url: str) -> None:
    async with FakeUpstream(send_body(sse(*TOOL_STREAM))) as upstream:
        settings = make_settings(redis_url, openai_base_url=upstream.base_url,
                                 openai_api_key="sk-up", upstream_retries=0)
        async with Broker.open(settings) as broker, running_server(settings, broker) as url, \
                httpx.AsyncClient(base_url=url) as http:
            gid = (await http.post("/v1/streams", json={
                "prompt": "weather?", "provider": "openai",
                "params": {"tools": [{"type": "function",
                                      "function": {"name": "get_weather"}}]}})).json()["id"]
            stream, _, _ = await parts(http, gid)
    check_strict_order(stream)
    kinds = [p["type"] if isinstance(p, dict) else p for p in stream]
    assert kinds == [
        "start", "reasoning-start", "reasoning-delta", "reasoning-delta", "reasoning-end",
        "tool-input-start", "tool-input-delta", "tool-input-start", "tool-input-delta",
        "tool-input-delta", "tool-input-delta", "tool-input-available",
        "tool-input-available", "finish", "[DONE]"]
    available = [p for p in stream if isinstance(p, dict)
                 and p["type"] == "tool-input-available"]
    assert available == [
        {"type": "tool-input-available", "toolCallId": "call_a", "toolName": "get_weather",
         "input": {"city": "Paris"}},
        {"type": "tool-input-available", "toolCallId": "call_b", "toolName": "get_weather",
         "input": {"city": "Oslo"}},
    ]


def test_errors_and_cancels_close_open_parts() -> None:
    enc = AISDKParts("gX", after=0)
    out = enc.encode(Event(1, "token", {"text": "a"})) + enc.encode(
        Event(2, "error", {"code": "upstream_error", "message": "boom"}))
    frames = [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
              for line in out.decode().splitlines() if line.startswith("data: ")]
    assert frames[-3:] == [{"type": "text-end", "id": "text-1"},
                           {"type": "error", "errorText": "boom"}, "[DONE]"]
    enc = AISDKParts("gX", after=5)
    assert enc.preamble() == b""
    cancelled = enc.encode(Event(6, "cancelled", {"reason": "requested"})).decode()
    assert '"messageMetadata":{"tokentee":{"status":"cancelled","reason":"requested"}}' \
        in cancelled


def test_every_entry_has_one_id_on_its_last_frame() -> None:
    enc = AISDKParts("gX", after=0)
    out = enc.encode(Event(1, "token", {"text": "a"})).decode()
    assert out.count("id: 1\n") == 1
    assert out.rstrip().splitlines()[-2] == "id: 1"  # on the text-delta, after text-start
    done = enc.encode(Event(2, "done", {"finish_reason": "stop"})).decode()
    assert done.count("id: 2\n") == 1
    assert done.endswith("id: 2\ndata: [DONE]\n\n")
