"""Real processes for tests: a private redis-server and pushsvc API/worker subprocesses."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

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


# -- Redis Sentinel -------------------------------------------------------------------


class ReplicationProxy:
    """A TCP proxy (threads, in the test process) in front of one server.

    Everything to the primary goes through it: clients, sentinels and the replica's
    replication link, so the sentinels see the replica following exactly the address
    they monitor (a replica following another address is "fixed" by Sentinel after
    ``failover-timeout``). :meth:`pause` holds back only replication traffic (a link
    whose client sent ``REPLCONF``): the replica then misses every later write while
    the link stays up and clients keep writing.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._flowing = threading.Event()  # replication traffic may pass
        self._flowing.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        self._flowing.clear()

    def close(self) -> None:
        """Close every connection; data held back by a pause is dropped, not sent."""
        self._closed = True
        self._flowing.set()  # wake held pumps: they see ``_closed`` and drop their data
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
            except OSError:
                client.close()  # the primary is gone: so is this connection
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            link = {"replication": False}
            for src, dst in ((client, upstream), (upstream, client)):
                pump = threading.Thread(target=self._pump, args=(src, dst, link, src is client))
                pump.daemon = True
                pump.start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, link: dict[str, bool], asks: bool
    ) -> None:
        try:
            while data := src.recv(65536):
                if asks and b"REPLCONF" in data:  # only a replica sends it
                    link["replication"] = True
                if link["replication"]:
                    self._flowing.wait()
                if self._closed:
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@dataclass
class ConfiguredRedis(RedisServer):
    """A private redis-server with extra options (``--replicaof ...``)."""

    options: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.persistence = [*RedisServer.persistence, *self.options]


@dataclass
class SentinelServer(RedisServer):
    """A redis-sentinel on a free port; ``config`` says what it monitors."""

    config: str = ""

    def start(self) -> SentinelServer:
        conf = Path(self.dir) / "sentinel.conf"  # Sentinel rewrites it: its own copy
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n{self.config}")
        exe = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen(
            [exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self.answers, 10, "redis-sentinel")
        return self


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


class SentinelSet:
    """A Sentinel-managed primary on free ports: a primary, one replica (replicating
    through a :class:`ReplicationProxy`) and three sentinels (quorum 2).

    The sentinels monitor the primary at the proxy's address, so clients reach it
    through the proxy too; after a failover they name the replica's own address.
    One failover per set: afterwards the proxy leads nowhere useful.
    """

    service = "pushsvc"
    fast_sync = ["--repl-diskless-sync-delay", "0"]
    down_after_ms = 1000
    failover_timeout_ms = 5000

    def __init__(self) -> None:
        # A replica's full sync waits 5 s by default, for other replicas to share it.
        self.primary = ConfiguredRedis(options=self.fast_sync)
        self.proxy: ReplicationProxy | None = None
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self) -> SentinelSet:
        self.primary.start()
        self.proxy = ReplicationProxy(self.primary.port)
        self.replica = ConfiguredRedis(
            options=[*self.fast_sync, "--replicaof", "127.0.0.1", str(self.proxy.port)]
        ).start()
        wait_until(self._replicating, 10, "replica in sync")
        for _ in range(3):
            self.sentinels.append(self._sentinel().start())
        # Sentinels find the replica in the primary's INFO and each other through
        # hello messages (every 2 s): a failover needs both.
        wait_until(self._sentinels_ready, 20, "sentinels aware of each other and the replica")
        return self

    def _sentinel(self) -> SentinelServer:
        assert self.proxy is not None
        name = self.service
        return SentinelServer(
            config=f"sentinel monitor {name} 127.0.0.1 {self.proxy.port} 2\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
        )

    def _replicating(self) -> bool:
        assert self.replica is not None
        return bool(info(self.replica.port, "replication").get("master_link_status") == "up")

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            with redis.Redis(port=sentinel.port, socket_timeout=2) as client:
                state = client.sentinel_master(self.service)
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                return False
        return True

    def master_ports(self) -> set[int]:
        """The primary's port as each sentinel names it now."""
        ports = set()
        for sentinel in self.sentinels:
            with redis.Redis(port=sentinel.port, socket_timeout=2) as client:
                addr = client.sentinel_get_master_addr_by_name(self.service)
            ports.add(int(addr[1]))
        return ports

    def _promoted(self) -> bool:
        assert self.replica is not None
        return self.master_ports() == {self.replica.port}

    def failover(self) -> None:
        """A planned failover that loses nothing: writes are paused on the primary until
        the replica has them all and is promoted, then the old primary follows it and
        drops its clients (as Sentinel itself does when it converts it, seconds later)."""
        assert self.replica is not None
        with redis.Redis(port=self.primary.port, socket_timeout=5) as old:
            old.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            try:
                wait_until(self._caught_up, 5, "replica caught up with the paused primary")
                with redis.Redis(port=self.sentinels[0].port) as sentinel:
                    sentinel.execute_command("SENTINEL", "FAILOVER", self.service)
                wait_until(self._replica_is_master, 10, "replica promoted")
                old.execute_command("REPLICAOF", "127.0.0.1", self.replica.port)
                old.execute_command("CLIENT", "KILL", "TYPE", "normal")
                old.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            finally:
                old.execute_command("CLIENT", "UNPAUSE")
        wait_until(self._promoted, 20, "every sentinel naming the replica as the primary")

    def sentinel_failover(self) -> None:
        """``SENTINEL FAILOVER`` alone, until every sentinel names the replica. The old
        primary keeps its clients and takes their writes until Sentinel demotes it,
        about 10 s later (:meth:`wait_demoted`); those writes are then lost."""
        with redis.Redis(port=self.sentinels[0].port) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", self.service)
        wait_until(self._promoted, 20, "every sentinel naming the replica as the primary")

    def wait_demoted(self) -> None:
        """Wait until Sentinel has made the old primary a replica (and dropped its clients)."""

        def demoted() -> bool:
            return bool(info(self.primary.port, "replication")["role"] == "slave")

        wait_until(demoted, 30, "Sentinel demoting the old primary")

    def _caught_up(self) -> bool:
        assert self.replica is not None
        primary = info(self.primary.port, "replication")["master_repl_offset"]
        return bool(info(self.replica.port, "replication")["master_repl_offset"] == primary)

    def _replica_is_master(self) -> bool:
        assert self.replica is not None
        return bool(info(self.replica.port, "replication")["role"] == "master")

    def pause_replication(self) -> None:
        """From now on the replica misses every write (see :meth:`kill_primary`)."""
        assert self.proxy is not None and self.replica is not None
        link = info(self.replica.port, "replication")
        assert link["master_port"] == self.proxy.port, "the replica no longer uses the proxy"
        assert link["master_link_status"] == "up", link
        self.proxy.pause()

    def kill_primary(self) -> int:
        """SIGKILL the primary; returns how many bytes of its replication stream the
        replica never got (the writes the coming failover loses: more than 0 after
        :meth:`pause_replication` and some writes). Then :meth:`wait_promoted`."""
        assert self.primary.proc is not None and self.replica is not None
        written = info(self.primary.port, "replication")["master_repl_offset"]
        self.primary.proc.kill()
        self.primary.proc.wait()
        got = info(self.replica.port, "replication")["master_repl_offset"]
        return int(written) - int(got)

    def wait_promoted(self) -> None:
        """Wait until every sentinel names the replica as the primary."""
        wait_until(self._promoted, 30, "a failover to the replica")

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            if server is not None:
                server.stop()
        if self.proxy is not None:
            self.proxy.close()
