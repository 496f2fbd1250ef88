"""Authentication, read tokens, CORS and log redaction, over real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from pydantic import ValidationError
from starlette.routing import Mount

from broker.api import create_app
from broker.auth import READ_TOKEN_SALT, ClientAddresses, RedactTokens, warn_if_open
from broker.embedded import free_loopback_port
from broker.keys import new_generation_id
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import delete_prefix, make_settings, running_server

TOKEN_A = "tok-a-" + "A" * 30
TOKEN_B = "tok-b-" + "B" * 30
SIGNING_KEY = "signing-key-for-tests-" + "k" * 20
ORIGIN = "https://app.example.com"
PUBLIC = {"/healthz", "/readyz", "/"}  # and the console's /static/* assets


@contextlib.asynccontextmanager
async def secured(redis_url: str, **overrides: Any) -> AsyncIterator[tuple[Settings, str]]:
    values: dict[str, Any] = {"api_tokens": f"{TOKEN_A},{TOKEN_B}",
                              "signing_key": SIGNING_KEY, **overrides}
    settings = make_settings(redis_url, **values)
    try:
        async with Broker.open(settings) as broker, running_server(settings, broker) as url:
            yield settings, url
    finally:
        await delete_prefix(redis_url, settings.key_prefix)


def bearer(token: str = TOKEN_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create(http: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await http.post("/v1/streams", json={"prompt": "hi", "params": params},
                               headers=bearer())
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def concrete(path: str) -> str:
    """A route path with its parameters filled in with well-formed values."""
    return (path.replace("{gid}", new_generation_id()).replace("{name}", "chan-1")
            .replace("{ctype}", "sentences"))


def is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith("/static")


async def test_every_route_needs_a_token(redis_url: str) -> None:
    """Every route of the app, including ones added after this test was written, answers
    401 without a token, unless it is a health check or the console's page and assets."""
    async with secured(redis_url) as (settings, url):
        app = create_app(settings)
        checked = 0
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for route in app.routes:
                if isinstance(route, Mount):
                    assert route.path.startswith("/static"), f"unexpected mount {route.path}"
                    continue
                assert isinstance(route, APIRoute), f"route {route} is outside the guard"
                for method in sorted(route.methods - {"HEAD"}):
                    path = concrete(route.path)
                    answers = [
                        await http.request(method, path, json={}),
                        await http.request(method, path, json={},
                                           headers={"Authorization": "Bearer wrong"}),
                        await http.request(method, path, json={},
                                           headers={"Authorization": f"Basic {TOKEN_A}"}),
                    ]
                    for response in answers:
                        if is_public(route.path):
                            assert response.status_code != 401, (method, route.path)
                            continue
                        assert response.status_code == 401, (method, route.path, response.text)
                        assert response.headers["www-authenticate"] == "Bearer"
                        assert "detail" in response.json()
                    checked += 1
        assert checked >= 10  # the API's own routes at least
        # FastAPI's docs cannot be guarded: with tokens they are not served at all.
        assert app.openapi_url is None


async def test_bearer_tokens_any_of_the_list(redis_url: str) -> None:
    async with secured(redis_url) as (_, url), httpx.AsyncClient(base_url=url) as http:
        gid = (await create(http, max_tokens=3, tokens_per_second=500))["id"]
        for token in (TOKEN_A, TOKEN_B):
            response = await http.get(f"/v1/streams/{gid}", headers=bearer(token))
            assert response.status_code == 200, response.text
            async with http.stream("GET", f"/v1/streams/{gid}/events",
                                   headers=bearer(token)) as stream:
                assert stream.status_code == 200
                body = b"".join([chunk async for chunk in stream.aiter_bytes()])
            assert b"event: done" in body
        for wrong in (TOKEN_A[:-1], TOKEN_A + "x", f"{TOKEN_A},{TOKEN_B}", "A"):
            response = await http.get(f"/v1/streams/{gid}", headers=bearer(wrong))
            assert response.status_code == 401, wrong


async def test_read_token_opens_its_generation_only(redis_url: str) -> None:
    async with secured(redis_url) as (settings, url), \
            httpx.AsyncClient(base_url=url, timeout=20) as http:
        first = await create(http, max_tokens=5, tokens_per_second=500)
        second = await create(http, max_tokens=5, tokens_per_second=500)
        token = first["read_token"]
        assert first["read_token_expires_in"] == settings.read_token_ttl_seconds

        async with http.stream("GET", f"/v1/streams/{first['id']}/events",
                               params={"token": token}) as stream:
            assert stream.status_code == 200
            body = b"".join([chunk async for chunk in stream.aiter_bytes()])
        assert body.count(b"event: token") == 5
        assert b"event: done" in body

        # Another generation's stream: refused, in every format.
        for fmt in ("native", "openai", "ai-sdk"):
            response = await http.get(f"/v1/streams/{second['id']}/events",
                                      params={"token": token, "format": fmt})
            assert response.status_code == 403, response.text
        # Anything but the event stream: a read token is not a bearer token.
        gid = first["id"]
        for method, path in [("GET", f"/v1/streams/{gid}"), ("POST", f"/v1/streams/{gid}/cancel"),
                             ("GET", f"/v1/streams/{gid}/stats"),
                             ("POST", f"/v1/streams/{gid}/read-token"),
                             ("POST", "/v1/streams")]:
            response = await http.request(method, path, params={"token": token},
                                          json={"prompt": "x"})
            assert response.status_code == 401, (method, path)
        # A damaged token, a token signed with another key, an expired one.
        past = URLSafeTimedSerializer(SIGNING_KEY, salt=READ_TOKEN_SALT, signer=_PastSigner)
        other_key = URLSafeTimedSerializer("another key", salt=READ_TOKEN_SALT)
        for bad in (token[:-2], token + "x", other_key.dumps(f"g:{gid}"),
                    past.dumps(f"g:{gid}"), ""):
            response = await http.get(f"/v1/streams/{gid}/events", params={"token": bad})
            assert response.status_code == 401, bad
        # The same key on the test's side mints a token that works: the key setting is used.
        fresh = URLSafeTimedSerializer(SIGNING_KEY, salt=READ_TOKEN_SALT).dumps(f"g:{gid}")
        response = await http.get(f"/v1/streams/{gid}/events", params={"token": fresh})
        assert response.status_code == 200

        # Minted later by a service for a browser.
        minted = await http.post(f"/v1/streams/{second['id']}/read-token", headers=bearer())
        assert minted.status_code == 200, minted.text
        assert minted.json()["events_url"].endswith(f"/v1/streams/{second['id']}/events")
        response = await http.get(f"/v1/streams/{second['id']}/events",
                                  params={"token": minted.json()["token"]})
        assert response.status_code == 200
        missing = await http.post(f"/v1/streams/{new_generation_id()}/read-token",
                                  headers=bearer())
        assert missing.status_code == 404


class _PastSigner(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - 3_600


async def test_channel_read_token(redis_url: str) -> None:
    async with secured(redis_url) as (_, url), \
            httpx.AsyncClient(base_url=url, timeout=20) as http:
        minted = await http.post("/v1/channels/chat-1/read-token", headers=bearer())
        assert minted.status_code == 200
        token = minted.json()["token"]
        async with http.stream("GET", "/v1/channels/chat-1/events",
                               params={"token": token}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
        other = await http.get("/v1/channels/chat-2/events", params={"token": token})
        assert other.status_code == 403
        # A generation's token does not open a channel, nor the reverse.
        gid = (await create(http, max_tokens=2, tokens_per_second=500))["id"]
        response = await http.get(f"/v1/streams/{gid}/events", params={"token": token})
        assert response.status_code == 403


async def test_auth_is_off_without_tokens(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/streams", json={"prompt": "hi", "params": {"max_tokens": 2}})
    assert response.status_code == 201
    gid = response.json()["id"]
    assert (await http.get(f"/v1/streams/{gid}")).status_code == 200
    assert (await http.get("/openapi.json")).status_code == 200


def test_warning_when_open_beyond_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="broker.auth"):
        assert not warn_if_open(Settings(host="127.0.0.1"))
        assert not warn_if_open(Settings(host="::1"))
        assert not warn_if_open(Settings(host="localhost"))
        assert not warn_if_open(Settings(host="0.0.0.0", api_tokens="t"))  # type: ignore[arg-type]
        assert not caplog.records
        assert warn_if_open(Settings(host="0.0.0.0"))
    assert "AUTHENTICATION IS OFF" in caplog.text
    assert "TOKENTEE_API_TOKENS" in caplog.text


def test_forwarded_for_is_believed_from_trusted_proxies_only() -> None:
    addresses = ClientAddresses(["10.0.0.0/8", "127.0.0.1"])
    assert addresses.client("127.0.0.1", "203.0.113.9") == "203.0.113.9"
    # The rightmost address that is not a proxy: a client cannot prepend a fake one.
    assert addresses.client("127.0.0.1", "1.2.3.4, 203.0.113.9, 10.1.2.3") == "203.0.113.9"
    assert addresses.client("198.51.100.7", "203.0.113.9") == "198.51.100.7"
    assert addresses.client("127.0.0.1", None) == "127.0.0.1"
    assert ClientAddresses([]).client("127.0.0.1", "203.0.113.9") == "127.0.0.1"


def test_redaction_filter_cleans_message_and_arguments() -> None:
    flt = RedactTokens([TOKEN_A])
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/v1/streams/g1/events?format=openai&token=SECRET.x.y", "1.1",
         200), None,
    )
    flt.filter(record)
    line = record.getMessage()
    assert "SECRET" not in line
    assert "token=[redacted]" in line
    assert "format=openai" in line
    record = logging.LogRecord("x", logging.ERROR, __file__, 1,
                               f"header was Bearer {TOKEN_B} and {TOKEN_A}", None, None)
    flt.filter(record)
    assert TOKEN_A not in record.getMessage()
    assert TOKEN_B not in record.getMessage()


def test_settings_refuse_a_wildcard_origin() -> None:
    with pytest.raises(ValidationError):
        Settings(cors_origins="*")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Settings(cors_origins="https://a.example.com,null")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Settings(trusted_proxies="not-an-address")  # type: ignore[arg-type]
    s = Settings(cors_origins=" https://a.example.com/ , http://localhost:5173")  # type: ignore[arg-type]
    assert s.cors_origin_list == ["https://a.example.com", "http://localhost:5173"]


async def test_cors_preflight_from_the_allowlist_only(redis_url: str) -> None:
    async with secured(redis_url, cors_origins=f"{ORIGIN},http://localhost:5173") as (_, url), \
            httpx.AsyncClient(base_url=url) as http:
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        allowed = await http.options("/v1/streams", headers={"Origin": ORIGIN, **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in allowed.headers

        for evil in ("https://evil.example.com", "https://app.example.com.evil.net", "null",
                     "http://app.example.com"):
            refused = await http.options("/v1/streams", headers={"Origin": evil, **preflight})
            assert refused.status_code == 400, evil
            assert "access-control-allow-origin" not in refused.headers
            simple = await http.get("/healthz", headers={"Origin": evil})
            assert "access-control-allow-origin" not in simple.headers
            assert "access-control-allow-credentials" not in simple.headers

        # Actual requests from an allowed origin, errors included, are readable by the page.
        denied = await http.post("/v1/streams", json={"prompt": "x"}, headers={"Origin": ORIGIN})
        assert denied.status_code == 401
        assert denied.headers["access-control-allow-origin"] == ORIGIN
        created = await http.post("/v1/streams", json={"prompt": "x", "params": {"max_tokens": 1}},
                                  headers={"Origin": ORIGIN, **bearer()})
        assert created.status_code == 201
        assert created.headers["access-control-allow-origin"] == ORIGIN
        assert "access-control-allow-credentials" not in created.headers


async def test_no_cors_headers_without_an_allowlist(http: httpx.AsyncClient) -> None:
    preflight = await http.options("/v1/streams", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    response = await http.get("/healthz", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.timeout(90)
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_tokens_never_reach_the_logs(redis_url: str, tmp_path: Path,
                                           log_format: str) -> None:
    """``tokentee serve`` with the access log on: neither bearer tokens nor read tokens
    appear in anything it prints, while the request lines themselves do."""
    settings = make_settings(redis_url)
    port = free_loopback_port()
    log_file = tmp_path / "serve.log"
    env = {**os.environ, "REDIS_URL": redis_url, "TOKENTEE_KEY_PREFIX": settings.key_prefix,
           "TOKENTEE_API_TOKENS": f"{TOKEN_A},{TOKEN_B}", "TOKENTEE_CONSUMERS": "",
           "TOKENTEE_SHUTDOWN_GRACE_SECONDS": "0.5", "TOKENTEE_LOG_FORMAT": log_format}
    with log_file.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness awaited below
            [sys.executable, "-m", "broker", "serve", "--port", str(port),
             "--log-level", "debug"], env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            async with asyncio.timeout(30):  # a process start has no event to await
                while True:
                    assert proc.poll() is None, log_file.read_text()
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get("/healthz")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)
            created = await create(http, max_tokens=2, tokens_per_second=500)
            read_token = created["read_token"]
            response = await http.get(f"/v1/streams/{created['id']}/events",
                                      params={"token": read_token})
            assert response.status_code == 200
            await http.get(f"/v1/streams/{created['id']}/events",
                           params={"token": read_token + "tampered"})
            await http.get("/v1/streams/x", headers=bearer("not-" + TOKEN_B))
            await http.get(f"/v1/streams/{created['id']}", headers=bearer(TOKEN_B))
    finally:
        proc.terminate()
        proc.wait(20)
        await delete_prefix(redis_url, settings.key_prefix)
    logs = log_file.read_text()
    line = r'GET /v1/streams/g[\w-]+/events\?token=\[redacted\] HTTP/1.1\\?" 200'
    assert re.search(line, logs), logs
    for secret in (TOKEN_A, TOKEN_B, read_token, read_token.split(".")[-1]):
        assert secret not in logs
