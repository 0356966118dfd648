"""The chaos run's stack and the faults it suffers.

``ChaosStack``: a private Redis that keeps RDB snapshots in its own directory, two API
processes, two workers with a short lease and the offline model, each of which may be
killed and started again in place. ``FAULTS``: one coroutine per kind of fault; a new
kind (a Sentinel failover, say) is one more ``@fault`` function, plus whatever part of
a stack it needs in ``ChaosStack``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from rich.console import Console

from .benchstack import (
    BenchError,
    RedisProcess,
    spawn,
    stack_env,
    start_api,
    stop_processes,
    wait_until,
    workers_seen,
)
from .dev import free_port

TENANTS = ("tenant-a", "tenant-b")
APIS, WORKERS = 2, 2


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class ChaosStack:
    """The processes of a chaos run, by role, each restartable where it ran before."""

    workdir: Path
    redis: RedisProcess
    env: dict[str, str]
    keys: dict[str, str]  # tenant -> API key
    lease_s: float
    ports: list[int] = field(default_factory=list)
    apis: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)  # the model
    keep: bool = False  # keep ``workdir`` (the processes' logs) after the run

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(f"http://127.0.0.1:{p}" for p in self.ports)

    def start_worker(self, i: int) -> None:
        proc = spawn(["worker"], self.env, self.workdir / f"worker{i}.log")
        if i < len(self.workers):
            self.workers[i] = proc
        else:
            self.workers.append(proc)

    def start_api(self, i: int) -> None:
        """Start API ``i`` on its port and wait until it is ready (blocking)."""
        if i == len(self.ports):
            self.ports.append(free_port())
            self.apis.append(start_api(self.ports[i], self.env, self._api_log(i)))
        else:
            self.apis[i] = start_api(self.ports[i], self.env, self._api_log(i))

    def _api_log(self, i: int) -> Path:
        return self.workdir / f"api{i}.log"

    def bgsave(self) -> None:
        """An RDB snapshot of this moment in ``dump.rdb``; returns once it is written."""
        with redis.Redis(port=self.redis.port, socket_timeout=5) as client:
            client.bgsave()

            def saved() -> bool:
                info = client.info("persistence")
                if info["rdb_last_bgsave_status"] != "ok":
                    raise BenchError("BGSAVE failed")
                return int(info["rdb_bgsave_in_progress"]) == 0

            wait_until(saved, 30, "BGSAVE")

    def exited(self) -> list[str]:
        """Processes that are not running (each fault starts again what it stopped)."""
        named = [(f"api{i}", p) for i, p in enumerate(self.apis)]
        named += [(f"worker{i}", p) for i, p in enumerate(self.workers)]
        named += [("fake-llm", p) for p in self.others]
        down = [f"{name} (exit {p.returncode})" for name, p in named if p.poll() is not None]
        alive = self.redis.proc is not None and self.redis.proc.poll() is None
        return down + ([] if alive else ["redis-server"])

    def close(self) -> None:
        for proc in self.workers:  # a stopped process would not act on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
        stop_processes([*self.apis, *self.workers, *self.others])
        self.redis.kill()


def chaos_env(
    redis_url: str, keys: dict[str, str], lease_s: float, model_url: str
) -> dict[str, str]:
    return {
        **stack_env(redis_url),
        "PUSHSVC_API_KEYS": ",".join(f"{k}={t}" for t, k in keys.items()),
        "PUSHSVC_SECRET": secrets.token_hex(16),
        "PUSHSVC_LEASE_S": f"{lease_s:g}",
        "PUSHSVC_PUBLISH_RATE_HZ": "10",  # the default: output deltas merge as in production
        "PUSHSVC_LLM_BASE_URL": model_url,
        "PUSHSVC_LLM_API_KEY": "chaos",
        "PUSHSVC_LLM_MODEL": "fake-1",
    }


@contextlib.contextmanager
def chaos_stack(lease_s: float, log: Console) -> Iterator[ChaosStack]:
    """Start everything (blocking); stop it all after. The directory with the processes'
    logs is removed, unless the run raised or set ``keep``."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("the chaos run needs redis-server (it restarts it from RDB files)")
    workdir = Path(tempfile.mkdtemp(prefix="pushsvc-chaos-"))
    server = RedisProcess(exe, str(workdir))
    keys = {t: f"chaos-{secrets.token_hex(8)}" for t in TENANTS}
    model_port = free_port()
    env = chaos_env(server.url, keys, lease_s, f"http://127.0.0.1:{model_port}/v1")
    stack = ChaosStack(workdir, server, env, keys, lease_s)
    try:
        server.start()
        model = ["fake-llm", "--port", str(model_port)]
        stack.others.append(spawn(model, env, workdir / "fake-llm.log"))
        for i in range(WORKERS):
            stack.start_worker(i)
        for i in range(APIS):
            stack.start_api(i)
        wait_until(lambda: _ok(f"http://127.0.0.1:{model_port}/v1/models"), 30, "fake-llm")
        headers = {"Authorization": f"Bearer {keys[TENANTS[0]]}"}
        wait_until(lambda: workers_seen(stack.urls[0], WORKERS, headers), 30, "workers up")
        log.print(f"chaos: Redis :{server.port}, API {', '.join(stack.urls)}, logs in {workdir}")
        yield stack
    except BaseException:
        stack.keep = True
        raise
    finally:
        stack.close()
        if not stack.keep:
            shutil.rmtree(workdir, ignore_errors=True)


# -- faults ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Injected:
    """One fault as it happened; ``lost``: writes acknowledged in that window (wall
    clock) may be gone afterwards."""

    kind: str
    at: float
    took_s: float
    detail: str
    lost: tuple[float, float] | None = None


Inject = Callable[[ChaosStack, random.Random], Awaitable[tuple[str, tuple[float, float] | None]]]
FAULTS: dict[str, Inject] = {}


def fault(kind: str) -> Callable[[Inject], Inject]:
    """Register a kind of fault: a coroutine that does it, brings the stack back, and
    returns (what it did, the window of lost writes or None)."""

    def register(inject: Inject) -> Inject:
        FAULTS[kind] = inject
        return inject

    return register


async def inject(kind: str, stack: ChaosStack, rng: random.Random) -> Injected:
    at = time.time()
    detail, lost = await FAULTS[kind](stack, rng)
    return Injected(kind, at, time.time() - at, detail, lost)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


@fault("worker-kill")
async def kill_worker(stack: ChaosStack, rng: random.Random) -> tuple[str, None]:
    """SIGKILL a worker mid-job; its leases lapse and the other worker re-runs its jobs."""
    i = rng.randrange(len(stack.workers))
    await asyncio.to_thread(_kill, stack.workers[i])
    await asyncio.sleep(rng.uniform(0.5, 2.0))
    stack.start_worker(i)
    return f"worker{i}", None


@fault("worker-stop")
async def stop_worker(stack: ChaosStack, rng: random.Random) -> tuple[str, None]:
    """SIGSTOP a worker past its lease, then SIGCONT: it wakes up as a stale writer."""
    i = rng.randrange(len(stack.workers))
    paused = stack.lease_s + rng.uniform(1.0, 3.0)
    stack.workers[i].send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(paused)
    finally:
        stack.workers[i].send_signal(signal.SIGCONT)
    return f"worker{i} for {paused:.1f} s", None


@fault("api-kill")
async def kill_api(stack: ChaosStack, rng: random.Random) -> tuple[str, None]:
    """SIGKILL an API process and start it again on its port: its streams break and
    their clients reconnect (refused until it is back)."""
    i = rng.randrange(len(stack.apis))
    await asyncio.to_thread(_kill, stack.apis[i])
    await asyncio.sleep(rng.uniform(0.2, 1.0))
    await asyncio.to_thread(stack.start_api, i)
    return f"api{i}", None


@fault("redis-restore")
async def restore_redis(stack: ChaosStack, rng: random.Random) -> tuple[str, tuple[float, float]]:
    """BGSAVE, let a few seconds of writes happen, SIGKILL Redis and start it again from
    that older snapshot: those seconds are lost, and every sequence since goes back."""
    await asyncio.to_thread(stack.bgsave)
    saved_at = time.time()
    await asyncio.sleep(rng.uniform(2.0, 5.0))
    killed_at = time.time()
    await asyncio.to_thread(stack.redis.kill)
    await asyncio.sleep(rng.uniform(0.2, 1.0))
    await asyncio.to_thread(stack.redis.start)
    return f"{killed_at - saved_at:.1f} s of writes lost", (saved_at, killed_at)


@fault("redis-empty")
async def empty_redis(stack: ChaosStack, rng: random.Random) -> tuple[str, tuple[float, float]]:
    """SIGKILL Redis, delete its RDB file and start it again: everything is gone."""
    killed_at = time.time()
    await asyncio.to_thread(stack.redis.kill)
    (stack.workdir / "dump.rdb").unlink(missing_ok=True)
    await asyncio.sleep(rng.uniform(0.2, 1.0))
    await asyncio.to_thread(stack.redis.start)
    return "all data lost", (0.0, killed_at)
