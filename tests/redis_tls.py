"""A private TLS-only redis-server with ACL users, for the Redis security tests.

The certificates come from ``trustme`` (a throw-away CA); the server listens on a TLS port
only (``--port 0``), so a plaintext client is refused.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import trustme

from broker.embedded import free_loopback_port

_CANDIDATES = ("/usr/bin/redis-server", "redis-server")


def tls_redis_server() -> str | None:
    """A redis-server binary of version 7 or newer (ACL selectors), or None.  Whether it was
    built with TLS shows when it starts (:class:`TlsUnsupported`)."""
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path is None:
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        major = re.search(r"v=(\d+)\.", out)
        if major is not None and int(major.group(1)) >= 7:
            return path
    return None


class TlsUnsupported(RuntimeError):
    """The binary would not serve TLS (built without it)."""


@dataclass
class TlsRedis:
    """A running TLS-only redis-server; ``url(user, password)`` builds a client URL."""

    binary: str
    directory: Path
    port: int
    ca_file: Path
    process: subprocess.Popen[bytes] | None = None

    def url(self, user: str, password: str, db: int = 0, ca_file: Path | None = None) -> str:
        ca = ca_file or self.ca_file
        return f"rediss://{user}:{password}@127.0.0.1:{self.port}/{db}?ssl_ca_certs={ca}"

    def admin(self, password: str) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username="admin",
                           password=password, ssl=True, ssl_ca_certs=str(self.ca_file))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_tls_redis(binary: str, acl: str, admin_password: str) -> TlsRedis:
    """Start ``binary`` with TLS only and the ACL file ``acl`` (plus an ``admin`` user)."""
    directory = Path(tempfile.mkdtemp(prefix="tokentee-tls-"))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    cert.private_key_pem.write_to_path(str(directory / "server.key"))
    (directory / "users.acl").write_text(
        f"user admin on >{admin_password} ~* &* +@all\nuser default off\n{acl}\n"
    )
    port = free_loopback_port()
    server = TlsRedis(binary, directory, port, directory / "ca.pem")
    server.process = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(directory / "server.pem"),
         "--tls-key-file", str(directory / "server.key"),
         "--tls-ca-cert-file", str(directory / "ca.pem"), "--tls-auth-clients", "no",
         "--aclfile", str(directory / "users.acl"), "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    client = server.admin(admin_password)
    try:
        while True:
            try:
                client.ping()
                return server
            except (redis.ConnectionError, ssl.SSLError, OSError):
                if server.process.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise TlsUnsupported(f"{binary} did not start with TLS") from None
                time.sleep(0.05)  # the server process is starting: nothing to block on
    finally:
        client.close()
