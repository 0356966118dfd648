"""Real processes for tests: pushsvc API and worker subprocesses (:class:`Proc`,
:class:`Api`) and a Redis whose data survives a restart (:class:`DurableRedis`).

A private redis-server (:class:`RedisServer`), a Sentinel-managed Redis
(:class:`SentinelSet`) and the waiting are the tools' own (``pushsvc.tools.procs``,
``pushsvc.tools.bench.sentinel``, ``redis_nodes``), re-exported here."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pushsvc.tools.bench.redis_nodes import info
from pushsvc.tools.bench.sentinel import SentinelSet
from pushsvc.tools.procs import (
    RedisServer,
    free_port,
    http_ok,
    spawn,
    stop_all,
    wait_serving,
    wait_until,
)

# The Sentinel-managed Redis is the chaos bench's: a primary and a replica, each behind a
# proxy that can hold back replication, and three sentinels; failovers may repeat.
__all__ = ["RedisServer", "SentinelSet", "free_port", "http_ok", "info", "wait_until"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Proc:
    """A pushsvc subprocess (``python -m pushsvc ...``) with its log in a file."""

    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))

    def start(self) -> Proc:
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
        self.proc = spawn(self.args, env, self.log, cwd=ROOT)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_all([self.proc])


@dataclass
class Api(Proc):
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Api:
        self.args = ["api", "--port", str(self.port), *self.args]
        super().start()
        assert self.proc is not None
        wait_serving(self.proc, f"{self.url}/healthz", 20, f"pushsvc api ({self.log})", self.log)
        return self


class DurableRedis(RedisServer):
    """A private redis-server whose data survives a restart on the same port and dir.

    Every write is fsynced to the append-only file, so a graceful stop (SIGTERM) and a
    restart lose nothing: the outage clients see, without the amnesia.
    """

    persistence = ("--appendonly", "yes", "--appendfsync", "always")

    def shutdown(self) -> None:
        """Stop gracefully: Redis closes its clients, syncs the AOF and exits."""
        if self.proc is not None:
            stop_all([self.proc])
        self.proc = None

    def restart(self) -> DurableRedis:
        self.shutdown()
        return self.start()
