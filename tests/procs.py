"""Real processes for tests: a private redis-server, pushsvc API/worker subprocesses and
a Sentinel-managed Redis (:class:`SentinelSet`, from ``pushsvc.benchsentinel``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

# The Sentinel-managed Redis is the chaos bench's: a primary and a replica, each behind a
# proxy that can hold back replication, and three sentinels; failovers may repeat.
from pushsvc.benchsentinel import SentinelSet, info

__all__ = ["SentinelSet", "info"]  # for the tests, beside the helpers below

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: object, timeout: float, what: str) -> None:
    """Wait for an outside process to come up (no event to await across processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up in {timeout} s")


def http_ok(url: str, timeout: float = 0.5) -> bool:
    """Does ``url`` answer 200 (yet)?"""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class RedisServer:
    """A private redis-server on a free port that tests may stop, kill and restart."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="pushsvc-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    persistence = ["--appendonly", "no"]  # nothing on disk

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server") or "redis-server"
        args = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *self.persistence,
            "--dir",
            self.dir,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # PING answers LOADING (an error) until any append-only file is read back.
        wait_until(self.answers, 10, "redis-server")
        return self

    def answers(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_connect_timeout=0.2) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Proc:
    """A pushsvc subprocess (``python -m pushsvc ...``) with its log in a file."""

    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))

    def start(self) -> Proc:
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pushsvc", *self.args],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Api(Proc):
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Api:
        self.args = ["api", "--port", str(self.port), *self.args]
        super().start()
        wait_until(self._healthy, 20, f"pushsvc api ({self.log})")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"pushsvc api exited:\n{self.output()}")
        return http_ok(f"{self.url}/healthz")


class DurableRedis(RedisServer):
    """A private redis-server whose data survives a restart on the same port and dir.

    Every write is fsynced to the append-only file, so a graceful stop (SIGTERM) and a
    restart lose nothing: the outage clients see, without the amnesia.
    """

    persistence = ["--appendonly", "yes", "--appendfsync", "always"]

    def shutdown(self) -> None:
        """Stop gracefully: Redis closes its clients, syncs the AOF and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> DurableRedis:
        self.shutdown()
        return self.start()
