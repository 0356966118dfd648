"""The chaos run's stack and the faults it suffers.

``ChaosStack``: a Sentinel-managed Redis (``sentinel.SentinelSet``: a primary and a
replica behind proxies, three sentinels; the processes reach it by a
``redis+sentinel://`` URL), with the faults of a Redis Cluster asked for, job state on a
local cluster of 3 primaries and 3 replicas (``PUSHSVC_DATA_CLUSTER``: two planes), two
API processes, two workers with a short lease and the
offline model, each of which may be killed and started again in place. ``FAULTS``: one
coroutine per kind of fault; a new kind is one more ``@fault`` function, plus whatever
part of a stack it needs in ``ChaosStack``.
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

from redis.crc import key_slot
from rich.console import Console

from ...keys import Keys
from ..cluster import LocalCluster
from ..procs import free_port, http_ok, kill, spawn, stop_all, wait_until
from .sentinel import SentinelSet
from .stack import BenchError, stack_env, start_api, workers_seen

TENANTS = ("tenant-a", "tenant-b")
APIS, WORKERS = 2, 2


@dataclass
class ChaosStack:
    """The processes of a chaos run, by role, each restartable where it ran before."""

    workdir: Path
    redis: SentinelSet
    env: dict[str, str]
    keys: dict[str, str]  # tenant -> API key
    lease_s: float
    ports: list[int] = field(default_factory=list)
    apis: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)  # the model
    keep: bool = False  # keep ``workdir`` (the processes' logs) after the run
    cluster: LocalCluster | None = None  # job state's, when the run has cluster faults

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

    def exited(self) -> list[str]:
        """Processes that are not running (each fault starts again what it stopped):
        the service's, and the Redis servers, sentinels and proxies."""
        named = [(f"api{i}", p) for i, p in enumerate(self.apis)]
        named += [(f"worker{i}", p) for i, p in enumerate(self.workers)]
        named += [("fake-llm", p) for p in self.others]
        down = [f"{name} (exit {p.returncode})" for name, p in named if p.poll() is not None]
        nodes = self.cluster.nodes if self.cluster is not None else []
        down += [f"cluster node :{n.port}" for n in nodes if n.proc is None or n.proc.poll()]
        return down + self.redis.exited()

    def close(self) -> None:
        for proc in self.workers:  # a stopped process would not act on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
        stop_all([*self.apis, *self.workers, *self.others])
        self.redis.stop()
        if self.cluster is not None:
            self.cluster.stop()


@contextlib.contextmanager
def chaos_stack(lease_s: float, log: Console, cluster: bool = False) -> Iterator[ChaosStack]:
    """Start everything (blocking); stop it all after. The directory with the processes'
    logs is removed, unless the run raised or set ``keep``. ``cluster``: job state on a
    local Redis Cluster."""
    if shutil.which("redis-server") is None:
        raise BenchError("the chaos run needs redis-server (Debian's package: servers, sentinels)")
    workdir = Path(tempfile.mkdtemp(prefix="pushsvc-chaos-"))
    sset = SentinelSet(workdir)
    keys = {t: f"chaos-{secrets.token_hex(8)}" for t in TENANTS}
    model_port = free_port()
    env = stack_env(
        sset.url,
        {key: tenant for tenant, key in keys.items()},
        lease_s=f"{lease_s:g}",
        publish_rate_hz="10",  # the default: output deltas merge as in production
        llm_base_url=f"http://127.0.0.1:{model_port}/v1",
        llm_api_key="chaos",
        llm_model="fake-1",
    )
    stack = ChaosStack(workdir, sset, env, keys, lease_s)
    try:
        if cluster:
            stack.cluster = LocalCluster().start()
            env["PUSHSVC_DATA_CLUSTER"] = stack.cluster.seeds
        _start_all(stack, model_port, log)
        yield stack
    except BaseException:
        stack.keep = True
        raise
    finally:
        stack.close()
        if not stack.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _start_all(stack: ChaosStack, model_port: int, log: Console) -> None:
    """Start the Sentinel set, the offline model, the workers and the APIs; wait until
    the model answers and the workers are seen."""
    sset, workdir, env = stack.redis, stack.workdir, stack.env
    sset.start()
    model = ["fake-llm", "--port", str(model_port)]
    stack.others.append(spawn(model, env, workdir / "fake-llm.log"))
    for i in range(WORKERS):
        stack.start_worker(i)
    for i in range(APIS):
        stack.start_api(i)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{model_port}/v1/models", 1), 30, "fake-llm")
    headers = {"Authorization": f"Bearer {stack.keys[TENANTS[0]]}"}
    wait_until(lambda: workers_seen(stack.urls[0], WORKERS, headers), 30, "workers up")
    ports = ", ".join(f":{n.port} (proxy :{n.proxy_port})" for n in sset.nodes)
    sentinels = ", ".join(f":{s.port}" for s in sset.sentinels)
    log.print(f"chaos: Redis {ports}, sentinels {sentinels}, API {', '.join(stack.urls)}")
    log.print(f"chaos: logs in {workdir}")


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


@fault("worker-kill")
async def kill_worker(stack: ChaosStack, rng: random.Random) -> tuple[str, None]:
    """SIGKILL a worker mid-job; its leases lapse and the other worker re-runs its jobs."""
    i = rng.randrange(len(stack.workers))
    await asyncio.to_thread(kill, stack.workers[i])
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
    await asyncio.to_thread(kill, stack.apis[i])
    await asyncio.sleep(rng.uniform(0.2, 1.0))
    await asyncio.to_thread(stack.start_api, i)
    return f"api{i}", None


# Redis: the faults act on whichever server is the primary now, and each returns once
# the set could fail over again (the replica in sync, the sentinels agreeing on both).


def _restart_primary(sset: SentinelSet, down_s: float, empty: bool) -> float:
    """SIGKILL the primary and start it again after ``down_s`` (empty: its RDB file
    deleted first; else from it); returns when it was killed. The sentinels are told to
    call it down only after much longer than that, so there is no failover: the outage
    is a primary's that restarts faster than Sentinel's down-after. Its replica then
    resyncs from it (to what the RDB file held, or to nothing), as in production."""
    with sset.no_failover():
        primary = sset.primary
        killed_at = time.time()
        primary.kill()
        if empty:
            (primary.dir / "dump.rdb").unlink(missing_ok=True)
        time.sleep(down_s)  # the outage we chose: nothing to wait for
        primary.start()
    return killed_at


async def _settled(sset: SentinelSet, lost: tuple[float, float]) -> tuple[str, tuple[float, float]]:
    """Wait until the set could fail over again. Had the sentinels failed over on their
    own meanwhile (they should not), writes until now may be lost too."""
    if await asyncio.to_thread(sset.wait_healthy):
        return f"; then Sentinel failed over to {sset.primary.name}", (lost[0], time.time())
    return "", lost


@fault("redis-restore")
async def restore_redis(stack: ChaosStack, rng: random.Random) -> tuple[str, tuple[float, float]]:
    """BGSAVE, let a few seconds of writes happen, SIGKILL the primary and start it again
    from that older snapshot: those seconds are lost, and every sequence since goes back."""
    sset = stack.redis
    name = sset.primary.name
    await asyncio.to_thread(sset.primary.bgsave)
    saved_at = time.time()
    await asyncio.sleep(rng.uniform(2.0, 5.0))
    down_s = rng.uniform(0.2, 1.0)
    killed_at = await asyncio.to_thread(_restart_primary, sset, down_s, False)
    more, lost = await _settled(sset, (saved_at, killed_at))
    return f"{name}: {killed_at - saved_at:.1f} s of writes lost{more}", lost


@fault("redis-empty")
async def empty_redis(stack: ChaosStack, rng: random.Random) -> tuple[str, tuple[float, float]]:
    """SIGKILL the primary, delete its RDB file and start it again: everything is gone."""
    sset = stack.redis
    name = sset.primary.name
    killed_at = await asyncio.to_thread(_restart_primary, sset, rng.uniform(0.2, 1.0), True)
    more, lost = await _settled(sset, (0.0, killed_at))
    return f"{name}: all data lost{more}", lost


@fault("sentinel-failover")
async def fail_over(stack: ChaosStack, rng: random.Random) -> tuple[str, tuple[float, float]]:
    """The replica misses a few seconds of acknowledged writes (its replication link is
    held at the primary's proxy, the link up), then it is promoted, and those writes are
    lost. Either by ``SENTINEL FAILOVER``, the old primary demoted as soon as the
    replica is promoted (its clients dropped), or by SIGKILLing the primary: the
    sentinels fail over after their down-after and the old primary comes back as a
    replica. Either way the old primary resyncs from the new one (the next failover
    goes back), and the API and workers follow the sentinels without restarts."""
    sset = stack.redis
    old, new = sset.primary.name, sset.replica.name
    # The sentinels that voted in an automatic failover start none for a while.
    kill = rng.random() < 0.5 and sset.may_kill_over()
    stopped_at = await asyncio.to_thread(sset.hold_replication)
    await asyncio.sleep(rng.uniform(2.0, 4.0))
    if kill:
        lost_bytes = await asyncio.to_thread(sset.kill_primary)
        ended_at = time.time()
        await asyncio.to_thread(sset.wait_promoted)
        await asyncio.to_thread(sset.rejoin)
        how = f"{old} killed"
    else:
        ended_at, lost_bytes = await asyncio.to_thread(sset.failover_losing_writes)
        how = f"SENTINEL FAILOVER, {old} demoted"
    more, lost = await _settled(sset, (stopped_at, ended_at))
    lost_s = ended_at - stopped_at
    return f"{how}, {new} promoted: {lost_s:.1f} s ({lost_bytes} B) of writes lost{more}", lost


# The Redis Cluster of job state (with ``cluster_stack``): the faults act on the shard of
# a tenant of the run, so its streams and jobs live through them.

CLUSTER_FAULTS = ("shard-failover", "slot-move")


def _tenant_slot(stack: ChaosStack, rng: random.Random) -> tuple[LocalCluster, str, int]:
    if stack.cluster is None:
        raise BenchError("cluster faults need the run's job state on a cluster")
    tenant = rng.choice(TENANTS)
    tag = Keys(stack.env["PUSHSVC_NAMESPACE"]).tenant_tag(tenant)
    return stack.cluster, tenant, key_slot(tag.encode())


@fault("shard-failover")
async def fail_over_shard(stack: ChaosStack, rng: random.Random) -> tuple[str, tuple[float, float]]:
    """SIGKILL the primary of a tenant's shard; its replica is promoted (writes it had
    not received are lost), then the killed node comes back as the new one's replica."""
    cluster, tenant, slot = _tenant_slot(stack, rng)
    primary = cluster.owner(slot)
    killed_at = time.time()
    promoted = await asyncio.to_thread(cluster.fail_over, primary)
    await asyncio.to_thread(cluster.rejoin, primary)
    took = time.time() - killed_at
    detail = f"{tenant}'s shard: :{primary.port} killed, :{promoted.port} promoted in {took:.1f} s"
    return detail, (killed_at - 1.0, killed_at)  # replication on loopback: well within 1 s


@fault("slot-move")
async def move_tenant_slot(stack: ChaosStack, rng: random.Random) -> tuple[str, None]:
    """Move a tenant's slot to another primary, as ``redis-cli --cluster reshard`` does."""
    cluster, tenant, slot = _tenant_slot(stack, rng)
    source = cluster.owner(slot)
    target = rng.choice([n for n in cluster.primary_nodes() if n.port != source.port])
    began = time.time()
    await asyncio.to_thread(cluster.move_slot, slot, target, 10)
    took = time.time() - began
    return f"{tenant}'s slot {slot}: :{source.port} to :{target.port} in {took:.1f} s", None
