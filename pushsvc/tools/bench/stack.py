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


@contextlib.contextmanager
def own_stack(apis: int, workers: int, log: Console) -> Iterator[Target]:
    """A private Redis, ``apis`` API and ``workers`` worker processes; all stopped after."""
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pushsvc-bench-"))
        redis_url, redis_port = stack.enter_context(_private_redis(workdir))
        env = stack_env(redis_url)
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_all, procs)
        for i in range(workers):
            procs.append(spawn(["worker"], env, Path(workdir, f"worker{i}.log")))
        ports = [free_port() for _ in range(apis)]
        procs += [start_api(p, env, Path(workdir, f"api{p}.log")) for p in ports]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        wait_until(lambda: workers_seen(urls[0], workers), 30, f"{workers} workers up")
        log.print(f"bench: Redis :{redis_port}, API {', '.join(urls)}, {workers} worker(s)")
        yield Target(urls, [p.pid for p in procs[workers:]], redis_port)


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
