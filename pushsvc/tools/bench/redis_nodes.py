"""One redis-server and one sentinel as child processes on free ports: the parts
:class:`sentinel.SentinelSet` is built from, and ``info`` to read a server's INFO."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ..procs import free_port, kill, pings, wait_until
from .stack import BenchError


def info(port: int, section: str) -> dict[str, Any]:
    """INFO ``section`` from the server at ``port``. Retried once: Sentinel promotes a
    replica with ``CLIENT KILL TYPE normal``, which may hit a connection just made."""
    for retry in (True, False):
        try:
            with redis.Redis(port=port, socket_timeout=2) as client:
                return client.info(section)  # type: ignore[no-any-return]
        except redis.ConnectionError:
            if not retry:
                raise
    raise AssertionError("unreachable")


def repl_offset(port: int) -> int:
    """The server's replication offset (``master_repl_offset``)."""
    return int(info(port, "replication")["master_repl_offset"])


@dataclass
class RedisNode:
    """One redis-server of a set: ``port`` its own (for the set's own commands),
    ``proxy_port`` its address for everyone else. No automatic saves, but BGSAVE
    works, and :meth:`start` after :meth:`kill` reads back whatever ``dump.rdb`` its
    directory holds."""

    name: str
    exe: str
    dir: Path
    port: int = field(default_factory=free_port)
    proxy_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    # A replica's full sync waits 5 s by default, for other replicas to share it.
    options = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")

    def start(self, replicaof: int | None = None) -> None:
        """Start it (a replica of the server behind proxy port ``replicaof``, or a
        primary) and wait until it answers."""
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.dir), "--logfile", "redis.log"]
        args += [*self.options, "--replica-announce-ip", "127.0.0.1"]
        args += ["--replica-announce-port", str(self.proxy_port)]
        if replicaof is not None:
            args += ["--replicaof", "127.0.0.1", str(replicaof)]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            args, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # PING answers LOADING (an error) until an RDB file is read back.
        wait_until(self.answers, 30, f"{self.name} answering")

    def answers(self) -> bool:
        if not self.alive():
            log = self.dir / "redis.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BenchError(f"{self.name} is not running:\n{tail}")
        return pings(self.port)

    def kill(self) -> None:
        """SIGKILL: nothing is saved on the way out."""
        if self.proc is not None:
            kill(self.proc)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def role(self) -> str:
        return str(info(self.port, "replication")["role"])

    def bgsave(self) -> None:
        """An RDB snapshot of this moment in ``dump.rdb``; returns once it is written."""
        with redis.Redis(port=self.port, socket_timeout=5) as client:
            client.bgsave()

            def saved() -> bool:
                persistence = client.info("persistence")
                if persistence["rdb_last_bgsave_status"] != "ok":
                    raise BenchError("BGSAVE failed")
                return int(persistence["rdb_bgsave_in_progress"]) == 0

            wait_until(saved, 30, "BGSAVE")


@dataclass
class SentinelProcess:
    """A sentinel on a free port; it rewrites its config file, so it has its own."""

    exe: str
    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, monitor: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile sentinel.log\n{monitor}"
        )
        self.proc = subprocess.Popen(
            [self.exe, str(conf), "--sentinel"],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, 30, "redis-sentinel answering")

    def answers(self) -> bool:
        return pings(self.port)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill(self.proc)
