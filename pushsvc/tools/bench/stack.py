"""The stack a benchmark runs against, and how its costs are read.

Its own (a private Redis, API and worker processes, stopped afterwards) or a running
one (``--url``); CPU and RSS from psutil, counts from each API's ``/metrics``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from ..procs import (
    RedisServer,
    StartFailed,
    embedded_valkey,
    free_port,
    http_ok,
    spawn,
    stop_all,
    wait_serving,
    wait_until,
)


class BenchError(Exception):
    """A scenario could not run or finish; the message says why."""


@dataclass
class Target:
    """The API processes under load (pid None: not on this machine's process table)."""

    urls: list[str]
    pids: list[int | None]
    redis_port: int | None = None

    def first(self) -> Target:
        return Target(self.urls[:1], self.pids[:1], self.redis_port)


# -- the stack ----------------------------------------------------------------------


@contextlib.contextmanager
def _private_redis(workdir: str) -> Iterator[tuple[str, int]]:
    """A redis-server from PATH (else an embedded Valkey): its URL and port."""
    exe = shutil.which("redis-server")
    if exe is None:
        with contextlib.ExitStack() as stack:
            try:
                url = stack.enter_context(embedded_valkey())
            except StartFailed as exc:
                raise BenchError(f"no redis-server on PATH, and {exc}") from exc
            yield url, int(urlsplit(url).port or 0)
        return
    redis = RedisServer(dir=workdir, exe=exe)
    try:
        redis.start()
        yield redis.url, redis.port
    finally:
        redis.kill()


OFFLINE_MODEL = "fake-1"  # the model name the benches' offline model answers as


@dataclass
class Private:
    """A bench's own processes: a private ``redis-server``, the processes started beside
    it, and the folder of their logs; all stopped when the bench's ``with`` ends."""

    workdir: str
    redis: RedisServer
    procs: list[subprocess.Popen[bytes]]

    def start(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        """``pushsvc <args>``, its output in ``<name>.log``."""
        proc = spawn(args, env, Path(self.workdir, f"{name}.log"))
        self.procs.append(proc)
        return proc

    def workers(self, count: int, env: dict[str, str]) -> None:
        for i in range(count):
            self.start(["worker"], env, f"worker{i}")

    def model(self, options: list[str], processes: int = 1) -> tuple[str, list[int]]:
        """``pushsvc fake-llm`` (``processes`` of them sharing a port when more than one),
        once it answers: its base URL and pids."""
        port = free_port()
        serve = ["fake-llm", "--port", str(port), *options]
        if processes > 1:
            serve.append("--reuse-port")
        env = stack_env(self.redis.url)
        started = [self.start(serve, env, f"model{i}") for i in range(processes)]
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/v1/models"), 30, "pushsvc fake-llm")
        return url, [p.pid for p in started]

    def model_env(self, model_url: str, **settings: str) -> dict[str, str]:
        """The environment of processes that call the offline model at ``model_url``."""
        llm = {"llm_base_url": f"{model_url}/v1", "llm_api_key": "offline"}
        return stack_env(self.redis.url, None, **llm, llm_model=OFFLINE_MODEL, **settings)

    def api(self, env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
        """``pushsvc api`` on a free port, once it is ready: its URL and process."""
        port = free_port()
        proc = start_api(port, env, Path(self.workdir, "api.log"))
        self.procs.append(proc)
        return f"http://127.0.0.1:{port}", proc


@contextlib.contextmanager
def private(what: str) -> Iterator[Private]:
    """A private ``redis-server`` (from PATH: the benches read its CPU) and a place for the
    processes a bench starts beside it."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError(f"the {what} bench needs redis-server on PATH")
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pushsvc-bench-"))
        redis = RedisServer(dir=workdir, exe=exe)
        redis.start()
        stack.callback(redis.kill)
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_all, procs)
        yield Private(workdir, redis, procs)


def stack_env(
    redis_url: str, api_keys: Mapping[str, str] | None = None, **settings: str
) -> dict[str, str]:
    """The environment of a bench stack's processes: this one's, ``PUSHSVC_REDIS_URL``
    and the benches' defaults. ``api_keys`` (key -> tenant): those tenants, with a fresh
    ``PUSHSVC_SECRET`` (without: one local tenant on loopback). ``settings``: more
    ``PUSHSVC_*`` variables by their setting's name (``lease_s="3"``: ``PUSHSVC_LEASE_S``).
    """
    env = {
        **os.environ,
        "PUSHSVC_REDIS_URL": redis_url,
        "PUSHSVC_NAMESPACE": f"bench{secrets.token_hex(3)}",
        "PUSHSVC_PUBLISH_RATE_HZ": "1000",  # every ticker step its own event
        "PUSHSVC_API_KEYS": "",  # one local tenant on loopback
        "PUSHSVC_HOST": "127.0.0.1",
        "PUSHSVC_TENANT_MAX_STREAMS": "0",
        "PUSHSVC_TENANT_SUBMITS_PER_MINUTE": "0",
        "PUSHSVC_TENANT_MAX_RUNNING": "0",
        "PUSHSVC_STREAMS_ENABLED": "true",
        "PUSHSVC_WORKER_METRICS_PORT": "0",
    }
    if api_keys:
        env["PUSHSVC_API_KEYS"] = ",".join(f"{k}={t}" for k, t in api_keys.items())
        env["PUSHSVC_SECRET"] = secrets.token_hex(16)
    env.update({f"PUSHSVC_{name.upper()}": value for name, value in settings.items()})
    return env


def start_api(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``pushsvc api`` on ``port``, once it is ready."""
    proc = spawn(["api", "--port", str(port)], env, log)
    wait_serving(proc, f"http://127.0.0.1:{port}/readyz", 30, "pushsvc api", log)
    return proc


def workers_seen(url: str, workers: int, headers: dict[str, str] | None = None) -> bool:
    stats = httpx.get(f"{url}/v1/stats", headers=headers, timeout=5).json()
    return int(stats.get("workers", 0)) >= workers


@dataclass
class _Own:
    env: dict[str, str]
    workdir: str
    procs: list[subprocess.Popen[bytes]]
    redis_port: int

    def apis(self, count: int) -> list[tuple[str, subprocess.Popen[bytes]]]:
        ports = [free_port() for _ in range(count)]
        started = [start_api(p, self.env, Path(self.workdir, f"api{p}.log")) for p in ports]
        self.procs += started
        return [(f"http://127.0.0.1:{p}", proc) for p, proc in zip(ports, started, strict=True)]


@contextlib.contextmanager
def _own(workers: int) -> Iterator[_Own]:
    """A private Redis (an embedded Valkey where there is no redis-server) and ``workers``
    worker processes; what is started beside them is stopped with them."""
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pushsvc-bench-"))
        redis_url, redis_port = stack.enter_context(_private_redis(workdir))
        env = stack_env(redis_url)
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_all, procs)
        for i in range(workers):
            procs.append(spawn(["worker"], env, Path(workdir, f"worker{i}.log")))
        yield _Own(env, workdir, procs, redis_port)


@contextlib.contextmanager
def own_stack(apis: int, workers: int, log: Console) -> Iterator[Target]:
    """A private Redis, ``apis`` API and ``workers`` worker processes; all stopped after."""
    with _own(workers) as own:
        started = own.apis(apis)
        urls = [url for url, _ in started]
        wait_until(lambda: workers_seen(urls[0], workers), 30, f"{workers} workers up")
        log.print(f"bench: Redis :{own.redis_port}, API {', '.join(urls)}, {workers} worker(s)")
        yield Target(urls, [proc.pid for _, proc in started], own.redis_port)


def attach(urls: list[str]) -> Target:
    """A running stack: find the API processes by their listening ports, when we may."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        conns = []
    listening = {c.laddr.port: c.pid for c in conns if c.status == psutil.CONN_LISTEN}
    return Target(urls, [listening.get(httpx.URL(u).port or 80) for u in urls])


# -- measuring ----------------------------------------------------------------------


def cpu_seconds(pids: list[int | None]) -> float | None:
    if None in pids:
        return None
    return sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)


def rss_bytes(pids: list[int | None]) -> int | None:
    return None if None in pids else sum(psutil.Process(p).memory_info().rss for p in pids)


def _outbound(pid: int, own_port: int | None, redis_port: int | None) -> int:
    """A process's TCP sockets to Redis (to anything but its own port when Redis's is unknown;
    an API process connects to nothing else)."""
    conns = psutil.Process(pid).net_connections(kind="tcp")
    live = [c for c in conns if c.status == psutil.CONN_ESTABLISHED and c.raddr]
    if redis_port is not None:
        return sum(c.raddr.port == redis_port for c in live)
    return sum(c.laddr.port != own_port for c in live)


def redis_sockets(target: Target) -> int | None:
    """The most Redis sockets any one API process holds (psutil's view)."""
    counts = []
    for pid, url in zip(target.pids, target.urls, strict=True):
        if pid is None:
            return None
        counts.append(_outbound(pid, httpx.URL(url).port, target.redis_port))
    return max(counts)


async def scrape(http: httpx.AsyncClient, urls: list[str]) -> list[dict[str, int]]:
    out = []
    for url in urls:
        text = (await http.get(f"{url}/metrics")).text
        families = text_string_to_metric_families(text)
        out.append({s.name: int(s.value) for f in families for s in f.samples if not s.labels})
    return out


# -- a peer beside the stack (fanout --baseline) ------------------------------------

BASELINES = {"broadcaster": "pushsvc.tools.bench.baseline"}  # name -> its server's module


def start_baseline(name: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The baseline server ``name`` (BASELINES) on ``port``, once it is ready; it reads
    the stack's Redis and namespace from ``env``."""
    command = [sys.executable, "-m", BASELINES[name], "--port", str(port)]
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_serving(proc, f"http://127.0.0.1:{port}/readyz", 30, f"the {name} baseline", log)
    return proc


@contextlib.contextmanager
def own_stack_with_baseline(
    name: str, workers: int, log: Console
) -> Iterator[tuple[Target, Target]]:
    """As own_stack with one API, and the baseline server ``name`` on the same Redis and
    namespace (the worker publishes to both): the API's target and the baseline's."""
    with _own(workers) as own:
        ((url, api),) = own.apis(1)
        peer_port = free_port()
        peer = start_baseline(name, peer_port, own.env, Path(own.workdir, f"{name}.log"))
        own.procs.append(peer)
        peer_url = f"http://127.0.0.1:{peer_port}"
        wait_until(lambda: workers_seen(url, workers), 30, f"{workers} workers up")
        log.print(
            f"bench: Redis :{own.redis_port}, API {url}, {name} {peer_url}, {workers} worker(s)"
        )
        port = own.redis_port
        yield Target([url], [api.pid], port), Target([peer_url], [peer.pid], port)
