"""The OpenAI-compatible endpoint and ``format=openai``, driven by the official ``openai``
Python package pointed at the broker, unchanged."""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from httpx_sse import aconnect_sse

from broker.service import Broker
from tests.test_openai_provider import FakeUpstream, send_body, sse
from tests.test_tool_calls import TOOL_STREAM

TEXT = "Hello there, general Kenobi."


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused",
                                  max_retries=0) as c:
        yield c


async def test_non_streaming_completion(client: openai.AsyncOpenAI, broker: Broker) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="sim-x", messages=[{"role": "user", "content": "hi"}],
        extra_body={"text": TEXT, "tokens_per_second": 0},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "sim-x"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4  # Hello / there, / general / Kenobi.
    stream_id = raw.headers["x-stream-id"]
    assert completion.id == f"chatcmpl-{stream_id}"
    assert (await broker.state(stream_id)).text == TEXT


async def test_streaming_completion_and_a_second_reader_of_the_same_generation(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient,
) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="sim-x", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
        extra_body={"text": TEXT, "tokens_per_second": 100},
    )
    stream_id = raw.headers["x-stream-id"]
    parsed = raw.parse()
    stream = await parsed if inspect.isawaitable(parsed) else parsed
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None  # the usage chunk, choices []
    # Another client joins the same generation, in the same format, by its id.
    again: list[str] = []
    async with aconnect_sse(http, "GET", f"/v1/streams/{stream_id}/events",
                            params={"format": "openai"}) as source:
        async for message in source.aiter_sse():
            if message.data:
                again.append(message.data)
    assert again[-1] == "[DONE]"
    texts = [json.loads(d)["choices"][0]["delta"].get("content") or ""
             for d in again[:-1] if json.loads(d)["choices"]]
    assert "".join(texts) == TEXT


async def test_resume_in_openai_format_keeps_ids(http: httpx.AsyncClient) -> None:
    created = (await http.post("/v1/streams", json={
        "prompt": "p", "params": {"text": "a b c d", "tokens_per_second": 0}})).json()
    gid = created["id"]
    ids: list[str] = []
    datas: list[str] = []
    async with aconnect_sse(http, "GET", f"/v1/streams/{gid}/events",
                            params={"format": "openai"},
                            headers={"Last-Event-ID": "2"}) as source:
        async for message in source.aiter_sse():
            if message.data:
                ids.append(message.id)
                datas.append(message.data)
    assert ids[0] == "3"
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content") or ""
                   for d in datas[:-1] if json.loads(d)["choices"]) == " c d"
    assert "role" not in json.loads(datas[0])["choices"][0]["delta"]  # not the first chunk


async def test_a_failed_generation_is_an_openai_error(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(
            model="sim-x", messages=[{"role": "user", "content": "hi"}],
            extra_body={"text": "a b c", "fail_after": 1, "tokens_per_second": 0},
        )
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-stream-id"].startswith("g")
    stream = await client.chat.completions.create(
        model="sim-x", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_body={"text": "a b c", "fail_after": 1, "tokens_per_second": 0},
    )

    async def read_all() -> None:
        async for _ in stream:
            pass

    with pytest.raises(openai.APIError, match="simulated upstream failure"):
        await read_all()


async def test_bad_requests_get_openai_errors(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown params for provider simulated"):
        await client.chat.completions.create(
            model="sim-x", messages=[{"role": "user", "content": "hi"}], temperature=0.5)
    with pytest.raises(openai.BadRequestError, match="unknown provider 'nope'"):
        await client.chat.completions.create(
            model="sim-x", messages=[{"role": "user", "content": "hi"}],
            extra_body={"provider": "nope"})


async def test_tool_calls_through_the_openai_package(redis_url: str) -> None:
    from tests.conftest import make_settings, running_server

    async with FakeUpstream(send_body(sse(*TOOL_STREAM))) as upstream:
        settings = make_settings(redis_url, openai_base_url=upstream.base_url,
                                 openai_api_key="sk-up", default_provider="openai",
                                 upstream_retries=0)
        async with Broker.open(settings) as broker, running_server(settings, broker) as url, \
                openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as client:
            stream = await client.chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": "weather?"}],
                tools=[{"type": "function", "function": {"name": "get_weather"}}],
                stream=True,
            )
            calls: dict[int, dict[str, str]] = {}
            async for chunk in stream:
                for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    entry = calls.setdefault(call.index, {"id": "", "name": "", "args": ""})
                    entry["id"] += call.id or ""
                    entry["name"] += (call.function.name or "") if call.function else ""
                    entry["args"] += (call.function.arguments or "") if call.function else ""
    assert calls == {
        0: {"id": "call_a", "name": "get_weather", "args": '{"city": "Paris"}'},
        1: {"id": "call_b", "name": "get_weather", "args": '{"city": "Oslo"}'},
    }


async def test_no_usage_chunk_unless_asked(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="sim-x", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_body={"text": TEXT, "tokens_per_second": 0})
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == TEXT  # every chunk has a choice: OpenAI's own loop works


def test_anthropic_shapes_in_openai_terms() -> None:
    from broker.events import Event
    from broker.formats import OpenAIChunks, completion

    enc = OpenAIChunks("gX", "claude-x", 0, include_usage=True)
    call = json.loads(enc.encode(Event(3, "tool_call_delta", {
        "index": 2, "id": "toolu_1", "name": "f"})).decode().split("data: ")[1])
    assert call["choices"][0]["delta"]["tool_calls"][0]["index"] == 0  # dense, from 0
    done = enc.encode(Event(5, "done", {"finish_reason": "stop", "usage": {
        "input_tokens": 10, "output_tokens": 15, "cache_read_input_tokens": 2}})).decode()
    assert '"usage":{"prompt_tokens":12,"completion_tokens":15,"total_tokens":27}' in done
    whole = completion("gX", "claude-x", 0, [Event(1, "done", {"usage": {
        "input_tokens": 1, "output_tokens": 2}})])
    assert whole["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
