"""docker-compose.yml, deploy/nginx.conf and the Dockerfile, checked without Docker: the
compose file parses, every service's command exists in the CLI, its environment is the
settings module's, ports agree everywhere, nginx accepts its config, and the simulated
upstream really serves what the openai provider consumes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from httpx_sse import aconnect_sse

from broker.embedded import free_loopback_port
from broker.events import Finish, TextDelta, Usage
from broker.providers.base import GenerationRequest
from broker.providers.openai import OpenAIProvider
from broker.providers.simulated import ProseTokens
from broker.service import Broker
from broker.settings import Settings
from tests.conftest import make_settings, running_server

ROOT = Path(__file__).parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
NGINX_CONF = (ROOT / "deploy" / "nginx.conf").read_text()
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# Services that run the tokentee image (every one but Redis and nginx).
OURS = sorted(name for name, svc in SERVICES.items() if svc.get("build") == ".")
APIS = sorted(name for name in OURS if SERVICES[name]["command"][1] == "serve")


def nginx_directives(name: str) -> list[str]:
    """The arguments of every ``name`` directive in nginx.conf (comments removed)."""
    text = re.sub(r"#[^\n]*", "", NGINX_CONF)
    return [m.strip() for m in re.findall(rf"(?:^|[;{{}}\s]){name}\s+([^;{{]*);", text)]


def service_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a service's process builds from its compose environment alone."""
    for var in Settings.env_names():
        monkeypatch.delenv(var, raising=False)
    for var, value in (SERVICES[name].get("environment") or {}).items():
        monkeypatch.setenv(var, str(value))
    return Settings()


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value.strip())
    assert match is not None, value
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# --- the compose file -------------------------------------------------------------------


def test_compose_has_the_whole_system() -> None:
    assert set(SERVICES) == {"redis", "upstream", "api1", "api2", "proxy", "sentences",
                             "analytics"}
    assert APIS == ["api1", "api2"]
    for name, svc in SERVICES.items():
        for dependency in svc.get("depends_on") or {}:
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
    redis = SERVICES["redis"]
    command = redis["command"]
    assert option(command, "--appendonly") == "yes"  # AOF persistence
    assert "/data" in " ".join(redis["volumes"])
    assert "ping" in redis["healthcheck"]["test"]
    for name in OURS:
        if name != "upstream":
            assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", OURS)
def test_every_service_command_exists_in_the_cli(name: str) -> None:
    command = SERVICES[name]["command"]
    assert command[0] == "tokentee"
    # --help after the service's own arguments: click still parses them first, so an
    # unknown command or option fails here.
    done = subprocess.run([sys.executable, "-m", "broker", *command[1:], "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", OURS)
def test_every_environment_variable_is_a_setting(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = set(Settings.env_names())
    for var in SERVICES[name].get("environment") or {}:
        assert var in known, f"{name} sets {var}, which no setting reads"
    service_settings(name, monkeypatch)  # and the values validate


def test_api_replicas_agree_with_nginx_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    (upstream_block,) = re.findall(r"upstream\s+\S+\s*\{(.*?)\}", NGINX_CONF, flags=re.S)
    servers = {line.split()[1] for line in upstream_block.splitlines()
               if line.strip().startswith("server ")}
    expected = set()
    for name in APIS:
        settings = service_settings(name, monkeypatch)
        expected.add(f"{name}:{settings.port}")
        assert settings.host == "0.0.0.0"
        assert settings.consumer_types == []  # the workers are services of their own
        health = " ".join(SERVICES[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{settings.port}/readyz" in health
        grace = seconds(SERVICES[name]["stop_grace_period"])
        assert grace > settings.shutdown_grace_seconds + 5  # uvicorn's drain ends first
        redis = urlsplit(settings.redis_url or "")
        assert redis.hostname == "redis"
        assert (redis.port or 6379) == 6379  # the redis image's default port
    assert servers == expected
    proxy = SERVICES["proxy"]
    (listen,) = nginx_directives("listen")
    assert [p.split(":")[-1] for p in proxy["ports"]] == [listen]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert set(proxy["depends_on"]) == set(APIS)


def test_api_replicas_use_the_simulated_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    command = SERVICES["upstream"]["command"]
    port = int(option(command, "--port"))
    assert option(command, "--host") == "0.0.0.0"
    assert f"127.0.0.1:{port}/healthz" in " ".join(SERVICES["upstream"]["healthcheck"]["test"])
    for name in APIS:
        settings = service_settings(name, monkeypatch)
        url = urlsplit(settings.openai_base_url)
        assert (url.hostname, url.port, url.path) == ("upstream", port, "/v1")
        assert settings.default_provider == "openai"
        assert SERVICES[name]["depends_on"]["upstream"]["condition"] == "service_healthy"


def test_nginx_is_configured_for_sse(monkeypatch: pytest.MonkeyPatch) -> None:
    assert nginx_directives("proxy_buffering") == ["off"]
    assert nginx_directives("proxy_http_version") == ["1.1"]
    assert 'Connection ""' in nginx_directives("proxy_set_header")
    assert nginx_directives("keepalive")
    for types in nginx_directives("gzip_types"):
        assert "text/event-stream" not in types
    heartbeat = max(service_settings(name, monkeypatch).heartbeat_seconds for name in APIS)
    (read_timeout,) = nginx_directives("proxy_read_timeout")
    assert seconds(read_timeout) >= 10 * heartbeat


@contextlib.contextmanager
def nginx_config(tmp_path: Path, replace: dict[str, str], globals_: str = ""
                 ) -> Iterator[list[str]]:
    """deploy/nginx.conf under a temporary prefix, with ``replace`` applied (nginx resolves
    upstream host names when it loads its config, and api1/api2 exist only in Docker's
    network); yields the nginx command line that runs it with its pid file, error log and
    temporary files under ``tmp_path``."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip(f"no nginx binary at {NGINX} (apt-get install nginx-light)")
    text = NGINX_CONF
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    yield [NGINX, "-p", f"{tmp_path}/", "-c", str(conf), "-e", str(tmp_path / "error.log"),
           "-g", f"pid {tmp_path}/nginx.pid; {globals_}"]


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    with nginx_config(tmp_path, {"api1:8000": "127.0.0.1:8000",
                                 "api2:8000": "127.0.0.1:8001"}) as command:
        done = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


async def test_sse_through_nginx_to_two_replicas(redis_url: str, tmp_path: Path) -> None:
    """The proxy as configured, in front of two real replicas on one Redis: events arrive
    while the generation runs, uncompressed, and a client resumes through the proxy."""
    settings = make_settings(redis_url)
    proxy_port = free_loopback_port()
    async with contextlib.AsyncExitStack() as stack:
        brokers = [await stack.enter_async_context(Broker.open(settings)) for _ in range(2)]
        urls = [await stack.enter_async_context(running_server(settings, b)) for b in brokers]
        replace = {"api1:8000": urls[0].removeprefix("http://"),
                   "api2:8000": urls[1].removeprefix("http://"),
                   "listen 8080;": f"listen 127.0.0.1:{proxy_port};"}
        command = stack.enter_context(nginx_config(tmp_path, replace, "daemon off;"))
        nginx = subprocess.Popen(command, stderr=subprocess.PIPE)  # noqa: ASYNC220
        assert nginx.stderr is not None
        stack.callback(nginx.stderr.close)
        stack.callback(nginx.wait, 10)
        stack.callback(nginx.terminate)
        base = f"http://127.0.0.1:{proxy_port}"
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30))
        async with asyncio.timeout(20):
            while True:  # nginx's start has no event to await from outside
                assert nginx.poll() is None, nginx.stderr.read() if nginx.stderr else ""
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)

        created = await http.post("/v1/streams", json={
            "prompt": "p", "params": {"max_tokens": 40, "tokens_per_second": 20}})
        assert created.status_code == 201
        body = created.json()
        gid = body["id"]
        assert body["events_url"] == f"{base}/v1/streams/{gid}/events"  # Host passed on
        seen: list[int] = []
        async with aconnect_sse(http, "GET", f"/v1/streams/{gid}/events",
                                headers={"accept-encoding": "gzip"}) as source:
            assert source.response.headers.get("content-encoding") is None
            async for sse in source.aiter_sse():
                if sse.event == "token":
                    seen.append(int(sse.id))
                    if len(seen) == 5:
                        break
        # Delivered through the proxy while the upstream was still generating.
        assert (await brokers[0].state(gid)).meta.status == "running"
        async with aconnect_sse(http, "GET", f"/v1/streams/{gid}/events",
                                headers={"last-event-id": str(seen[-1])}) as source:
            async for sse in source.aiter_sse():
                if sse.data:
                    seen.append(int(sse.id))
                if sse.event == "done":
                    break
        assert seen == list(range(1, 42))
        # The console's figures through the proxy are both replicas', whichever answers.
        owners = sorted(b.manager.owner for b in brokers)
        answered = set()
        for _ in range(6):
            figures = (await http.get("/v1/console/figures")).json()
            assert [r["replica"] for r in figures["replicas"]] == owners
            assert figures["tokens_out_per_second"] >= 0
            answered.add(figures["replica"])
        assert answered == set(owners)  # nginx's round robin reached both


# --- the Dockerfile ---------------------------------------------------------------------


def test_dockerfile_copies_every_package_and_runs_a_cli_command() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            sources = line.split()[1:-1]
            for source in sources:
                assert (ROOT / source).exists(), source
            copied.update(sources)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in project["tool"]["setuptools"]["packages"]:
        assert package.split(".")[0] in copied, f"{package} is not copied into the image"
    assert project["project"]["readme"] in copied
    cmd = re.search(r'^CMD \["tokentee", "(\w+)"\]', dockerfile, flags=re.M)
    assert cmd is not None
    assert "RUN pip install ." in dockerfile
    subprocess.run([sys.executable, "-m", "broker", cmd.group(1), "--help"],
                   capture_output=True, timeout=60, check=True)


# --- the simulated upstream -------------------------------------------------------------


@contextlib.asynccontextmanager
async def upstream_process(*args: str) -> AsyncIterator[str]:
    """``tokentee upstream`` on a free loopback port; yields its OPENAI_BASE_URL."""
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; its first line is awaited
        [sys.executable, "-m", "broker", "upstream", "--port", "0", "--log-level", "warning",
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            line = await asyncio.to_thread(proc.stdout.readline)  # printed once listening
        assert line.startswith("tokentee upstream: OPENAI_BASE_URL="), (
            line + (proc.stderr.read() if proc.stderr else ""))
        yield line.strip().split("=", 1)[1]
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


async def test_upstream_serves_what_the_openai_provider_consumes() -> None:
    async with upstream_process("--rate", "0") as base_url:
        settings = Settings(openai_base_url=base_url, upstream_trust_env=False)
        provider = OpenAIProvider(settings)
        try:
            events = [e async for e in provider.stream(GenerationRequest(
                messages=[{"role": "user", "content": "hello"}], params={"max_tokens": 12}))]
        finally:
            await provider.aclose()
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "".join(ProseTokens(12))
    usage = [e.usage for e in events if isinstance(e, Usage)]
    assert usage
    assert usage[-1]["completion_tokens"] == 12
    assert events[-1] == Finish("length")


async def test_broker_generation_through_the_upstream(redis_url: str) -> None:
    """What the compose stack does: the API's default provider is openai, pointed at
    ``tokentee upstream``."""
    async with upstream_process("--rate", "200", "--tokens", "30") as base_url:
        settings = make_settings(redis_url, openai_base_url=base_url,
                                 default_provider="openai", upstream_trust_env=False)
        async with Broker.open(settings) as broker:
            info = await broker.start(GenerationRequest(
                messages=[{"role": "user", "content": "hi"}]))
            events = [e async for e in broker.events(info.id)]
    assert info.provider == "openai"
    assert [e.type for e in events] == ["token"] * 30 + ["done"]
    assert "".join(e.text for e in events) == "".join(ProseTokens(30))
    assert events[-1].data["usage"]["completion_tokens"] == 30


async def test_upstream_with_the_official_openai_client() -> None:
    openai = pytest.importorskip("openai")
    async with upstream_process("--rate", "0") as base_url, openai.AsyncOpenAI(
        base_url=base_url, api_key="unused"
    ) as client:
        stream = await client.chat.completions.create(
            model="simulated-1", messages=[{"role": "user", "content": "hi"}],
            max_tokens=5, stream=True)
        parts = [chunk.choices[0].delta.content or "" async for chunk in stream
                 if chunk.choices]
        whole = await client.chat.completions.create(
            model="simulated-1", messages=[{"role": "user", "content": "hi"}],
            max_tokens=5)
    assert "".join(parts) == "".join(ProseTokens(5))
    assert whole.choices[0].message.content == "".join(ProseTokens(5))
