"""A private Redis Cluster on this machine, for the tests and the benches: primaries
and their replicas as ``redis-server`` processes on free ports (``redis-server
--cluster-enabled yes``), joined by ``redis-cli --cluster create``."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from typing import ClassVar, Self

import redis

from .procs import LOCALHOST, RedisServer, StartFailed, free_port, wait_until

BUS_OFFSET = 10000  # a node's cluster bus listens this many ports above its own


def cluster_port() -> int:
    """A free port whose cluster bus port is free too (so at most 65535 - BUS_OFFSET)."""
    while True:
        port = free_port()
        if port + BUS_OFFSET <= 65535:
            with socket.socket() as sock:
                try:
                    sock.bind((LOCALHOST, port + BUS_OFFSET))
                except OSError:
                    continue
            return port


@dataclass
class ClusterNode(RedisServer):
    """One node: a RedisServer with cluster mode on (its ``nodes.conf`` in its dir)."""

    port: int = field(default_factory=cluster_port)

    persistence: ClassVar[tuple[str, ...]] = (
        "--appendonly", "no", "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
    )  # fmt: skip

    def cluster_info(self) -> dict[str, str]:
        with redis.Redis(port=self.port, socket_timeout=2) as client:
            text = client.execute_command("CLUSTER", "INFO")
        text = text.decode() if isinstance(text, bytes) else str(text)
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k: v.strip() for k, v in pairs}


@dataclass
class LocalCluster:
    """``primaries`` primaries with ``replicas`` replicas each, every slot assigned."""

    primaries: int = 3
    replicas: int = 1
    nodes: list[ClusterNode] = field(default_factory=list)
    cli: str = field(default_factory=lambda: shutil.which("redis-cli") or "redis-cli")

    @property
    def seeds(self) -> str:
        """Every node as ``host:port,...``: what a cluster client starts from."""
        return ",".join(f"{LOCALHOST}:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 60) -> Self:
        """Start the nodes, join them, and wait until each says the cluster is ok."""
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                self.nodes.append(ClusterNode().start())
            args = [self.cli, "--cluster", "create", *self.seeds.split(",")]
            args += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
            if done.returncode != 0:
                raise StartFailed(f"redis-cli --cluster create failed: {done.stdout[-2000:]!r}")
            wait_until(self.ok, timeout, "every node saying cluster_state:ok")
        except BaseException:
            self.stop()
            raise
        return self

    def ok(self) -> bool:
        """Every node reachable, every slot served, and each node knows every other."""
        want = str(len(self.nodes))
        try:
            infos = [n.cluster_info() for n in self.nodes]
        except redis.RedisError:
            return False
        return all(
            i.get("cluster_state") == "ok"
            and i.get("cluster_slots_ok") == "16384"
            and i.get("cluster_known_nodes") == want
            for i in infos
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
