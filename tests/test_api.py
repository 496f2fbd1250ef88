"""The HTTP API over a real uvicorn server on loopback, with real SSE clients."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from broker.server import build_server
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import make_settings, running_server


async def create(http: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await http.post("/v1/streams", json={"prompt": "hello", "params": params})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def read_sse(
    http: httpx.AsyncClient, gid: str, *, headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None, stop_after: int | None = None,
) -> list[ServerSentEvent]:
    events: list[ServerSentEvent] = []
    async with aconnect_sse(
        http, "GET", f"/v1/streams/{gid}/events", headers=dict(headers or {}), params=params
    ) as source:
        source.response.raise_for_status()
        async for sse in source.aiter_sse():
            if not sse.data:  # httpx-sse yields comment-only blocks as empty events
                continue
            events.append(sse)
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


def check_stream(events: list[ServerSentEvent], tokens: int) -> None:
    assert [int(e.id) for e in events] == list(range(1, tokens + 2))
    assert [e.event for e in events] == ["token"] * tokens + ["done"]
    for e in events[:-1]:
        assert set(json.loads(e.data)) == {"text"}


async def test_create_status_and_events(http: httpx.AsyncClient) -> None:
    created = await create(http, max_tokens=20, tokens_per_second=200)
    assert created["events_url"].endswith(f"/v1/streams/{created['id']}/events")
    events = await read_sse(http, created["id"])
    check_stream(events, 20)
    status = (await http.get(f"/v1/streams/{created['id']}")).json()
    assert status["status"] == "done"
    assert status["text"] == "".join(json.loads(e.data)["text"] for e in events[:-1])
    assert status["model"] == "simulated-1"
    assert status["finish_reason"] == "length"
    assert status["last_event_id"] == 21
    assert status["usage"]["completion_tokens"] == 20
    assert isinstance(status["created"], float)


async def test_identical_delivery_to_many_clients_and_a_late_joiner(
    http: httpx.AsyncClient,
) -> None:
    created = await create(http, max_tokens=80, tokens_per_second=400)
    clients = [asyncio.create_task(read_sse(http, created["id"])) for _ in range(8)]
    first = await read_sse(http, created["id"], stop_after=30)  # a client that is there early
    late = asyncio.create_task(read_sse(http, created["id"]))  # joins after 30 tokens
    results = await asyncio.gather(*clients, late)
    for events in results:
        check_stream(events, 80)
        assert [(e.id, e.event, e.data) for e in events] == [
            (e.id, e.event, e.data) for e in results[0]
        ]
    assert [e.data for e in first] == [e.data for e in results[0][:30]]


@pytest.mark.parametrize("how", ["header", "query"])
async def test_resume_has_no_gap_and_no_duplicate(http: httpx.AsyncClient, how: str) -> None:
    created = await create(http, max_tokens=60, tokens_per_second=300)
    first = await read_sse(http, created["id"], stop_after=23)
    last_id = first[-1].id
    if how == "header":
        rest = await read_sse(http, created["id"], headers={"Last-Event-ID": last_id})
    else:
        rest = await read_sse(http, created["id"], params={"after": last_id})
    check_stream(first + rest, 60)


async def test_last_event_id_header_wins_over_after(http: httpx.AsyncClient) -> None:
    # EventSource reconnects to the same URL (with its ?after=) and adds the header: the
    # header is the newer position.
    created = await create(http, max_tokens=10, tokens_per_second=0)
    rest = await read_sse(
        http, created["id"], headers={"Last-Event-ID": "7"}, params={"after": "2"}
    )
    assert [e.id for e in rest] == ["8", "9", "10", "11"]


async def test_resume_after_terminal_event_is_204(http: httpx.AsyncClient) -> None:
    created = await create(http, max_tokens=3, tokens_per_second=0)
    events = await read_sse(http, created["id"])
    response = await http.get(
        f"/v1/streams/{created['id']}/events", headers={"Last-Event-ID": events[-1].id}
    )
    assert response.status_code == 204


@pytest.mark.parametrize(
    "value", ["x", "-1", "1.5", "0-5", "$", "+", "99999999999999999999", " 5", "5\u0660"]
)
async def test_malformed_resume_id_is_400(http: httpx.AsyncClient, value: str) -> None:
    created = await create(http, max_tokens=3, tokens_per_second=0)
    response = await http.get(f"/v1/streams/{created['id']}/events", params={"after": value})
    assert response.status_code == 400
    assert "resume id" in response.json()["detail"]


async def test_resume_beyond_the_end_is_400(http: httpx.AsyncClient) -> None:
    created = await create(http, max_tokens=3, tokens_per_second=0)
    await read_sse(http, created["id"])
    response = await http.get(
        f"/v1/streams/{created['id']}/events", headers={"Last-Event-ID": "999"}
    )
    assert response.status_code == 400


async def test_trimmed_resume_point_gets_an_explicit_gap_event(
    http: httpx.AsyncClient, broker: Broker
) -> None:
    created = await create(http, max_tokens=20, tokens_per_second=0)
    await read_sse(http, created["id"])
    await broker.redis.xtrim(broker.log.keys(created["id"]).log, minid="0-9", approximate=False)
    events = await read_sse(http, created["id"], headers={"Last-Event-ID": "3"})
    assert events[0].event == "gap"
    assert json.loads(events[0].data) == {"first_missing": 4, "last_missing": 8}
    assert [e.id for e in events[1:]] == [str(i) for i in range(9, 22)]


@pytest.mark.parametrize(
    "path", ["/v1/streams/gnotthere000000", "/v1/streams/gnotthere000000/events",
             "/v1/streams/bad%7Bid%7D/events", "/v1/streams/x"]
)
async def test_unknown_stream_is_404(http: httpx.AsyncClient, path: str) -> None:
    assert (await http.get(path)).status_code == 404


async def test_cancel_unknown_is_404(http: httpx.AsyncClient) -> None:
    assert (await http.post("/v1/streams/gnotthere000000/cancel")).status_code == 404


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "exactly one of 'prompt' or 'messages'"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
        ({"prompt": ""}, "at least 1 character"),
        ({"messages": []}, "at least 1 item"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"prompt": "a", "provider": "nope"}, "unknown provider 'nope'"),
        ({"prompt": "a", "params": {"max_tokens": "many"}}, "params.max_tokens"),
        ({"prompt": "a", "params": {"bogus": 1}}, "unknown params"),
        ({"prompt": "a", "extra": 1}, "extra"),
    ],
)
async def test_invalid_body_is_422_with_a_clear_message(
    http: httpx.AsyncClient, body: dict[str, Any], needle: str
) -> None:
    response = await http.post("/v1/streams", json=body)
    assert response.status_code == 422
    assert needle in json.dumps(response.json())


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
async def test_a_non_finite_number_is_422_not_500(http: httpx.AsyncClient, value: bytes
                                                  ) -> None:
    # Python's JSON reader takes these; the 422 repeats the input, which JSON cannot hold.
    response = await http.post("/v1/streams", content=b'{"prompt": ' + value + b"}",
                               headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "prompt"]


async def test_invalid_json_is_422(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/streams", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


async def test_oversized_body_is_413(http: httpx.AsyncClient, settings: Settings) -> None:
    big = {"prompt": "x" * (settings.max_body_bytes + 10)}
    response = await http.post("/v1/streams", json=big)
    assert response.status_code == 413

    async def chunks() -> Any:  # no content-length: the limit counts streamed bytes
        for _ in range(settings.max_body_bytes // 10_000 + 2):
            yield b" " * 10_000

    response = await http.post(
        "/v1/streams", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


async def test_messages_input_is_accepted(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/streams",
        json={"messages": [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "hi"}],
              "params": {"text": "Hi there.", "tokens_per_second": 0}, "model": "sim-x"},
    )
    assert response.status_code == 201
    gid = response.json()["id"]
    events = await read_sse(http, gid)
    assert "".join(json.loads(e.data).get("text", "") for e in events) == "Hi there."
    assert (await http.get(f"/v1/streams/{gid}")).json()["model"] == "sim-x"


async def test_cancel_ends_the_stream_with_cancelled(http: httpx.AsyncClient) -> None:
    created = await create(http, max_tokens=100_000, tokens_per_second=100)
    events: list[ServerSentEvent] = []
    async with aconnect_sse(http, "GET", f"/v1/streams/{created['id']}/events") as source:
        async for sse in source.aiter_sse():
            if not sse.data:
                continue
            events.append(sse)
            if len(events) == 3:
                response = await http.post(f"/v1/streams/{created['id']}/cancel")
                assert response.status_code == 202
                assert response.json()["status"] in ("running", "cancelled")
    assert events[-1].event == "cancelled"
    assert [e.event for e in events[:-1]] == ["token"] * (len(events) - 1)
    assert (await http.get(f"/v1/streams/{created['id']}")).json()["status"] == "cancelled"
    # Cancelling again is harmless and reports the final status.
    again = await http.post(f"/v1/streams/{created['id']}/cancel")
    assert again.status_code == 202
    assert again.json()["status"] == "cancelled"


async def test_upstream_error_mid_stream_reaches_clients(http: httpx.AsyncClient) -> None:
    created = await create(http, max_tokens=50, tokens_per_second=0, fail_after=5)
    events = await read_sse(http, created["id"])
    assert [e.event for e in events] == ["token"] * 5 + ["error"]
    assert json.loads(events[-1].data) == {
        "code": "upstream_error", "message": "simulated upstream failure"
    }
    status = (await http.get(f"/v1/streams/{created['id']}")).json()
    assert (status["status"], status["error_code"]) == ("error", "upstream_error")


async def test_headers_first_comment_and_heartbeats(redis_url: str) -> None:
    settings = make_settings(redis_url, heartbeat_seconds=0.2)
    async with (
        Broker.open(settings) as broker,
        running_server(settings, broker) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        created = await create(http, max_tokens=3, tokens_per_second=2)
        async with http.stream("GET", f"/v1/streams/{created['id']}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
        assert body.startswith(b": tokentee stream\n\n")
        # 2 tokens/s with a 0.2 s heartbeat: silent stretches are filled with comments.
        assert body.count(b": keep-alive\n\n") >= 2
        assert body.endswith(b"event: done\ndata: " + body.rsplit(b"data: ", 1)[1])


async def test_token_text_cannot_forge_sse_fields(http: httpx.AsyncClient) -> None:
    nasty = "a\r\nevent: done\r\ndata: {}\n\nid: 999\rretry: 1\n\u2028x\u0085y"
    response = await http.post(
        "/v1/streams", json={"prompt": "p", "params": {"text": nasty, "tokens_per_second": 0}}
    )
    gid = response.json()["id"]
    async with http.stream("GET", f"/v1/streams/{gid}/events") as raw:
        body = (await raw.aread()).decode()
    # Every line of the body is a comment, an empty line, or one of our three fields.
    for line in body.split("\n"):
        assert line == "" or line.startswith((": ", "id: ", "event: ", "data: ")), line
        assert "\r" not in line
        assert "\u2028" not in line
        assert "\u0085" not in line
    events = await read_sse(http, gid)
    text = "".join(json.loads(e.data).get("text", "") for e in events)
    assert text == nasty
    assert [e.event for e in events][-1] == "done"
    assert all(e.event in ("token", "done") for e in events)


async def test_client_that_stops_reading_does_not_stall_the_others(redis_url: str) -> None:
    settings = make_settings(
        redis_url, client_queue_size=8, send_timeout_seconds=2.0, max_body_bytes=4_000_000
    )
    async with (
        Broker.open(settings) as broker,
        running_server(settings, broker) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        # Big tokens so that the stalled socket's buffers fill up quickly.
        text = " ".join(["x" * 4000] * 400)
        response = await http.post(
            "/v1/streams", json={"prompt": "p", "params": {"text": text, "tokens_per_second": 0}}
        )
        gid = response.json()["id"]
        port = int(url.rsplit(":", 1)[1])
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(
            f"GET /v1/streams/{gid}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        try:
            others = await asyncio.gather(*(read_sse(http, gid) for _ in range(4)))
            for events in others:
                check_stream(events, 400)
            # The stalled client is dropped by the send timeout, freeing its cursor.
            async with asyncio.timeout(20):
                await broker.hub.idle.wait()
        finally:
            stalled.close()


async def test_disconnected_clients_free_everything(
    http: httpx.AsyncClient, broker: Broker, redis_url: str
) -> None:
    import redis.asyncio as aioredis

    created = await create(http, max_tokens=100_000, tokens_per_second=50)
    probe = aioredis.from_url(redis_url)
    try:
        async def client() -> None:
            async with httpx.AsyncClient(base_url=str(http.base_url)) as own:
                await read_sse(own, created["id"], stop_after=2)

        connections: list[int] = []
        for _ in range(3):
            await asyncio.gather(*(client() for _ in range(30)))
            # The server notices each disconnect as soon as uvicorn sees the socket close.
            async with asyncio.timeout(10):
                await broker.hub.idle.wait()
            assert broker.hub.cursor_count == broker.hub.stream_count == 0
            mine = [c for c in await probe.client_list()
                    if c["name"].startswith(broker.settings.key_prefix + ":")]
            connections.append(len(mine))
        # Connections come from a bounded pool and go back to it: however many rounds of
        # clients come and go, the broker never holds more than the pool and its three
        # blocking connections: hub, control, watchdog (the pool may still be filling up
        # between rounds).
        assert max(connections) <= 3 + broker.settings.redis_max_connections
        await http.post(f"/v1/streams/{created['id']}/cancel")
        await broker.manager.wait(created["id"])
        assert broker.manager.active == []
    finally:
        await probe.aclose()


async def test_server_shutdown_ends_streams_with_retry_hint(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with Broker.open(settings) as broker:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        server = build_server(settings, broker, log_level="warning", access_log=False)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            async with httpx.AsyncClient(base_url=url) as http:
                created = await create(http, max_tokens=100_000, tokens_per_second=50)
                body = b""
                async with http.stream(
                    "GET", f"/v1/streams/{created['id']}/events"
                ) as response:
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if b"id: 2\n" in body and not server.should_exit:
                            server.should_exit = True  # what SIGTERM does
                # The response ended (instead of holding shutdown up) with a retry hint.
                assert body.endswith(b": server shutting down\nretry: 1000\n\n")
            async with asyncio.timeout(15):
                await serving
        finally:
            server.should_exit = True
            await serving
            sock.close()
        # The generation itself lives on in the log; a client resumes elsewhere.
        assert (await broker.state(created["id"])).meta.status == "running"
        await broker.cancel(created["id"])


async def test_healthz(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
