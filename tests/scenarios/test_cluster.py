"""The data plane on a real Redis Cluster (3 primaries, 3 replicas, started here) and the
queue on the test Redis (``PUSHSVC_DATA_CLUSTER``): an API and a worker, over real
sockets, for tenants whose slots are on different shards."""

from __future__ import annotations

import asyncio
import functools
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from pushsvc.data_plane import connect_data
from pushsvc.events import make_bus
from pushsvc.keys import Keys
from pushsvc.models import TERMINAL
from pushsvc.settings import Settings
from pushsvc.sharded_bus import ShardedBus
from pushsvc.tools.cluster import LocalCluster
from pushsvc.tools.procs import LOCALHOST, TlsFiles, wait_until

from ..conftest import TENANTS, stack_env
from ..procs import Api, Proc, RedisServer
from ..sse import Stream, assert_gap_free
from .test_redis_outages import assert_seamless, collect, describe, submit

pytestmark = pytest.mark.timeout(180)
# An SSE client waits longer than the server's heartbeat (15 s) before it calls a stream
# dead, as EventSource does: while a shard fails over (8 s and more on a busy machine)
# its streams may carry nothing but heartbeats.
PATIENCE = httpx.Timeout(10, read=40)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster().start()
    yield local
    local.stop()


@pytest.fixture(scope="module")
def cluster_stack(redis_server: RedisServer, cluster: LocalCluster) -> Iterator[dict[str, Any]]:
    env = stack_env(redis_server.url, f"c{secrets.token_hex(3)}", data_cluster=cluster.seeds)
    worker = Proc(["worker"], env).start()
    api = Api([], env).start()
    yield {"api": api, "env": env}
    api.stop()
    worker.stop()


def owners(cluster: LocalCluster, namespace: str) -> dict[str, int]:
    """Each test API key's tenant's shard (the port of the primary owning its slot)."""
    keys = Keys(namespace)
    ranges = cluster.slot_owners()
    out = {}
    for key, tenant in TENANTS.items():
        slot = key_slot(keys.tenant_tag(tenant).encode())
        out[key] = next(port for (lo, hi), port in ranges.items() if lo <= slot <= hi)
    return out


@pytest.fixture
async def http(cluster_stack: dict[str, Any]) -> AsyncIterator[Any]:
    made: list[httpx.AsyncClient] = []

    def client(key: str) -> httpx.AsyncClient:
        c = httpx.AsyncClient(
            base_url=cluster_stack["api"].url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=PATIENCE,
        )
        made.append(c)
        return c

    yield client
    for c in made:
        await c.aclose()


async def follow(http: httpx.AsyncClient, url: str, out: Stream, timeout: float = 60) -> Stream:
    """Read ``url`` as EventSource does until a terminal event: when the server ends the
    stream or refuses it (503 while a shard fails over), connect again with the last id."""
    async with asyncio.timeout(timeout):
        while not (out.events and out.events[-1].kind in TERMINAL):
            headers = {"Last-Event-ID": out.resume_id} if out.events else {}
            try:
                await collect(http, url, headers=headers, out=out, timeout=timeout)
            except httpx.HTTPStatusError as exc:
                assert exc.response.status_code == 503, exc.response.text
                out.status += 1  # counts the refusals
                await asyncio.sleep(0.2)  # EventSource's retry delay
    return out


def tenant_of_shard(cluster: LocalCluster, namespace: str, port: int | None = None) -> str:
    """The API key of a test tenant whose slot is on the primary at ``port`` (any)."""
    return next(k for k, p in owners(cluster, namespace).items() if port in (None, p))


async def test_jobs_stream_end_to_end_for_tenants_on_every_shard(
    cluster: LocalCluster, cluster_stack: dict[str, Any], http: Any
) -> None:
    namespace = cluster_stack["env"]["PUSHSVC_NAMESPACE"]
    by_shard: dict[int, str] = {}
    for key, port in owners(cluster, namespace).items():
        by_shard.setdefault(port, key)
    assert len(by_shard) == 3, "the test tenants cover every shard"

    async def one(key: str) -> None:
        c = http(key)
        job_id = await submit(c, {"steps": 20, "interval_ms": 20})
        job, tenant = Stream(), Stream()
        await asyncio.gather(
            follow(c, f"/v1/jobs/{job_id}/events", job),
            # The tenant's log from its start: every event of its jobs, in order.
            collect(
                c,
                "/v1/events",
                headers={"Last-Event-ID": "0"},
                out=tenant,
                stop=lambda s: any(e.kind in TERMINAL for e in s.of(job_id)),
            ),
        )
        assert job.events[-1].kind == "completed" and job.status == 0
        assert_seamless(job.events)
        assert_gap_free(tenant, job_id)
        assert [e.data["seq"] for e in tenant.of(job_id)] == list(
            range(1, len(tenant.of(job_id)) + 1)
        )
        got = await c.get(f"/v1/jobs/{job_id}")
        assert (
            got.json()["status"] == "completed" and got.json()["seq"] == job.events[-1].data["seq"]
        )
        other = http(next(k for k in by_shard.values() if k != key))
        assert (await other.get(f"/v1/jobs/{job_id}")).status_code == 404

    await asyncio.gather(*(one(k) for k in by_shard.values()))


Followed = tuple[str, Stream, Stream]  # a job, its stream, its tenant's stream


async def mid_stream(
    clients: list[httpx.AsyncClient], fault: Callable[[], object], steps: int = 400
) -> list[Followed]:
    """A ticker job of each client's tenant streamed (its own stream and its tenant's),
    ``fault`` run in a thread once every job is well under way, and every stream
    followed to the end. Every job must have ended after the fault began (it ran
    through it), and been running when it did."""
    jobs = [await submit(c, {"steps": steps, "interval_ms": 20}) for c in clients]
    followed = [(job_id, Stream(), Stream()) for job_id in jobs]
    warm = [asyncio.Event() for _ in jobs]

    def progressing(ready: asyncio.Event) -> Callable[[Stream], bool]:
        def stop(s: Stream) -> bool:
            if sum(e.kind == "progress" for e in s.events) >= 15:
                ready.set()
            return False

        return stop

    tasks = []
    for c, (job_id, job, tenant), ready in zip(clients, followed, warm, strict=True):
        tasks += [
            asyncio.create_task(follow(c, f"/v1/jobs/{job_id}/events", job)),
            asyncio.create_task(follow(c, f"/v1/events?job={job_id}", tenant)),
        ]
        watch = collect(c, f"/v1/jobs/{job_id}/events", stop=progressing(ready))
        tasks.append(asyncio.create_task(watch))
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(ready.wait() for ready in warm))
        for _, job, _ in followed:  # else the fault would not happen mid-stream
            assert not any(e.kind in TERMINAL for e in job.events), describe(job.events)
        fault_at = time.time()
        await asyncio.to_thread(fault)
        await asyncio.gather(*(t for i, t in enumerate(tasks) if i % 3 != 2))
        for _, job, _ in followed:
            assert job.events[-1].data["ts"] > fault_at, describe(job.events)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return followed


async def check_after_fault(c: httpx.AsyncClient, followed: Followed) -> None:
    job_id, job, tenant = followed
    final = (await c.get(f"/v1/jobs/{job_id}")).json()
    for stream in (job, tenant):
        evs = stream.of(job_id) if stream is tenant else stream.events
        assert evs[-1].kind == "completed", describe(evs)
        assert_seamless(evs)
        assert evs[-1].data["seq"] == final["seq"]
    assert final["status"] == "completed" and final["progress"] == 100


def a_tenant(cluster: LocalCluster, cluster_stack: dict[str, Any]) -> tuple[str, int]:
    """A test tenant's API key, and its slot."""
    namespace = cluster_stack["env"]["PUSHSVC_NAMESPACE"]
    key = tenant_of_shard(cluster, namespace)
    return key, key_slot(Keys(namespace).tenant_tag(TENANTS[key]).encode())


def elsewhere(cluster: LocalCluster, cluster_stack: dict[str, Any], port: int) -> str:
    """The API key of a test tenant on another shard than the primary at ``port``."""
    namespace = cluster_stack["env"]["PUSHSVC_NAMESPACE"]
    return next(k for k, p in owners(cluster, namespace).items() if p != port)


async def test_a_primary_killed_mid_stream_loses_nothing(
    cluster: LocalCluster, cluster_stack: dict[str, Any], http: Any
) -> None:
    """The tenant's shard fails over (its replica promoted) while its job and a job of a
    tenant on another shard stream: both finish, every stream without a gap."""
    key, slot = a_tenant(cluster, cluster_stack)
    primary = cluster.owner(slot)
    clients = [http(key), http(elsewhere(cluster, cluster_stack, primary.port))]
    try:
        followed = await mid_stream(clients, lambda: cluster.fail_over(primary))
        assert cluster.owner(slot).port != primary.port
        for c, one in zip(clients, followed, strict=True):
            await check_after_fault(c, one)
    finally:  # the cluster whole again, for the next test
        if primary not in cluster.nodes:
            await asyncio.to_thread(cluster.rejoin, primary)


async def test_a_slot_moved_mid_stream_loses_nothing(
    cluster: LocalCluster, cluster_stack: dict[str, Any], http: Any
) -> None:
    key, slot = a_tenant(cluster, cluster_stack)
    source = cluster.owner(slot)
    target = next(n for n in cluster.primary_nodes() if n.port != source.port)
    c = http(key)
    # One key at a time, a pause between: the slot is half moved for a while (ASK).
    (followed,) = await mid_stream(
        [c], lambda: cluster.move_slot(slot, target, batch=1, pause=lambda: time.sleep(0.05))
    )
    assert cluster.owner(slot).port == target.port
    await check_after_fault(c, followed)


async def test_a_job_a_shard_lost_in_its_failover_is_recovering_for_the_grace_then_gone(
    cluster: LocalCluster, redis_server: RedisServer
) -> None:
    """A job written to its shard's primary only (the replica stopped, SIGSTOP, and its
    link cut), then the primary killed and the replica promoted: the job is gone. As on
    one Redis, GET answers 503 ``state_recovering`` for ``PUSHSVC_STATE_LOST_GRACE_S``
    (its worker may still write it again; none runs here), then 404; a job the replica
    had stays.
    Was: 404 at once (the grace was the store-wide epoch's, one Redis's)."""
    grace = 4.0
    namespace = f"g{secrets.token_hex(3)}"
    env = stack_env(
        redis_server.url, namespace, data_cluster=cluster.seeds, state_lost_grace_s=str(grace)
    )
    key = next(
        k
        for k, port in owners(cluster, namespace).items()
        if cluster.replicas_of(next(n for n in cluster.nodes if n.port == port))
    )
    slot = key_slot(Keys(namespace).tenant_tag(TENANTS[key]).encode())
    primary = cluster.owner(slot)
    replica = cluster.replicas_of(primary)[0]
    api = Api([], env).start()  # no worker: nothing writes the lost job again
    try:
        async with httpx.AsyncClient(
            base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=PATIENCE
        ) as c:
            kept = await submit(c, {"steps": 1})  # and the tenant's epoch, on the replica too
            assert replica.proc is not None
            async with Redis(port=primary.port) as client:
                assert await client.execute_command("WAIT", 1, 10000) == 1  # the replica has it
                replica.proc.send_signal(signal.SIGSTOP)
                try:
                    # Its link cut too (else the kernel holds what is sent for it): the
                    # replica cannot come back for it while stopped.
                    assert await client.client_kill_filter(_type="slave") == 1
                    lost = await submit(c, {"steps": 1})
                finally:  # once the primary is gone, the replica goes on and takes over
                    resume = functools.partial(replica.proc.send_signal, signal.SIGCONT)
                    await asyncio.to_thread(cluster.fail_over, primary, on_kill=resume)
            answers = await answers_until_gone(c, lost, within=grace + 30)
            assert (await c.get(f"/v1/jobs/{kept}")).status_code == 200
    finally:
        api.stop()
        await asyncio.to_thread(cluster.rejoin, primary)
    recovering = [at for at, code in answers if code == "state_recovering"]
    assert recovering, answers  # 503 first, while the grace lasts
    assert answers[-1][1] == "job_not_found" and answers[-1][0] - recovering[0] >= grace - 1.5
    assert [code for _, code in answers if code != "redis_unavailable"] == [
        *["state_recovering"] * len(recovering),
        "job_not_found",
    ], answers


async def answers_until_gone(
    c: httpx.AsyncClient, job_id: str, within: float
) -> list[tuple[float, str]]:
    """GET the job (as a poller does, 0.2 s apart) until it answers 404: when each answer
    came, and its error code (503s while the shard fails over or recovers)."""
    answers: list[tuple[float, str]] = []
    async with asyncio.timeout(within):
        while not answers or answers[-1][1] != "job_not_found":
            resp = await c.get(f"/v1/jobs/{job_id}")
            assert resp.status_code in (404, 503), (resp.status_code, resp.text)
            answers.append((time.monotonic(), resp.json()["error"]["code"]))
            await asyncio.sleep(0.2)
    return answers


async def a_job_runs_and_streams(api: Api, key: str) -> None:
    """A job made, run and streamed to its end at once (no 503 while it streamed)."""
    async with httpx.AsyncClient(
        base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=PATIENCE
    ) as c:
        job_id = await submit(c, {"steps": 5, "interval_ms": 10})
        stream = await follow(c, f"/v1/jobs/{job_id}/events", Stream())
        assert stream.events[-1].kind == "completed" and stream.status == 0
        assert_seamless(stream.events)
        assert (await c.get(f"/v1/jobs/{job_id}")).json()["status"] == "completed"


async def test_a_cluster_that_requires_auth_serves_jobs_and_their_streams(
    redis_server: RedisServer,
) -> None:
    """Every node with ``requirepass``: the API and the worker AUTH with
    ``PUSHSVC_DATA_CLUSTER_PASSWORD`` on commands, transactions and sharded pub/sub
    alike (a job made, run and streamed to its end), and the password is in no log."""
    password = f"pw-{secrets.token_hex(8)}"
    cluster = LocalCluster(replicas=0, password=password).start()
    namespace = f"a{secrets.token_hex(3)}"
    env = stack_env(
        redis_server.url,
        namespace,
        data_cluster=cluster.seeds,
        data_cluster_password=password,
        log_level="debug",
    )
    worker, api = Proc(["worker"], env).start(), Api([], env).start()
    try:
        key = tenant_of_shard(cluster, namespace)
        await a_job_runs_and_streams(api, key)
    finally:
        api.stop()
        worker.stop()
        cluster.stop()
    for proc in (api, worker):
        assert password not in proc.output()


def certificates(into: Path) -> dict[str, TlsFiles]:
    """One CA's files for the servers (127.0.0.1), for pushsvc's processes (a client
    certificate) and for servers under a name they do not have; and another CA's."""
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(into / "ca.pem")
    other.cert_pem.write_to_path(into / "other-ca.pem")
    files = {}
    for name, identity in (
        ("server", "127.0.0.1"),
        ("client", "pushsvc@example.com"),
        ("misnamed", "redis.example.com"),
    ):
        issued = ca.issue_cert(identity)
        issued.cert_chain_pems[0].write_to_path(into / f"{name}.pem")
        issued.private_key_pem.write_to_path(into / f"{name}.key")
        files[name] = TlsFiles(
            str(into / "ca.pem"), str(into / f"{name}.pem"), str(into / f"{name}.key")
        )
    files["other"] = TlsFiles(str(into / "other-ca.pem"), files["client"].cert, files["client"].key)
    return files


async def refused(settings: Settings, node: tuple[str, int]) -> None:
    """Commands, transactions and pub/sub each refuse to talk to the cluster."""
    data = connect_data(settings)
    assert data is not None
    try:
        with pytest.raises(RedisClusterException):
            await data.initialize()  # the slots' owners, asked of the seeds
        with pytest.raises(RedisConnectionError, match="certificate verify failed"):
            await data.node_client(*node).ping()
    finally:
        await data.close_all()
    bus = make_bus(settings)
    assert isinstance(bus, ShardedBus)
    with pytest.raises(ConnectionError, match="unreachable"):
        await bus._connect()


async def test_a_cluster_over_tls_serves_jobs_and_refuses_a_node_it_cannot_trust(
    tmp_path: Path,
) -> None:
    """Every node speaks TLS only and wants a client certificate, and so does the queue's
    Redis (``rediss://``). With ``PUSHSVC_DATA_CLUSTER_TLS`` and the CA, certificate and
    key, the API and the worker make, run and stream a job: commands, transactions and
    sharded pub/sub over TLS. Told to trust another CA, or facing nodes whose
    certificates name another host, every client refuses them."""
    tls = certificates(tmp_path)
    queue, cluster = RedisServer(tls=tls["server"]), LocalCluster(replicas=0, tls=tls["server"])
    procs: list[Proc] = []
    try:
        queue.start()
        cluster.start()
        namespace = f"t{secrets.token_hex(3)}"
        client = tls["client"]
        env = stack_env(
            f"rediss://127.0.0.1:{queue.port}/0?{client.query()}",
            namespace,
            data_cluster=cluster.seeds,
            data_cluster_tls="true",
            data_cluster_tls_ca_file=client.ca,
            data_cluster_tls_cert_file=client.cert,
            data_cluster_tls_key_file=client.key,
        )
        procs += [Proc(["worker"], env), api := Api([], env)]
        for proc in procs:
            proc.start()
        key = tenant_of_shard(cluster, namespace)
        await a_job_runs_and_streams(api, key)

        def trusting(files: TlsFiles) -> Settings:
            return Settings(
                namespace=namespace,
                data_cluster=cluster.seeds,
                data_cluster_tls=True,
                data_cluster_tls_ca_file=files.ca,
                data_cluster_tls_cert_file=files.cert,
                data_cluster_tls_key_file=files.key,
            )

        node = (LOCALHOST, cluster.nodes[0].port)
        await refused(trusting(tls["other"]), node)
        misnamed = tls["misnamed"]
        for server in cluster.nodes:  # new connections get a certificate for another name
            with server.client() as admin:
                pair = ("tls-cert-file", misnamed.cert, "tls-key-file", misnamed.key)
                admin.execute_command("CONFIG", "SET", *pair)
        await refused(trusting(client), node)
    finally:
        for proc in procs:
            proc.stop()
        cluster.stop()
        queue.stop()


async def test_an_attempt_delivered_while_its_shard_is_down_runs_once_it_is_back(
    redis_server: RedisServer,
) -> None:
    """The queue's Redis up, the job's shard down (its only node killed, its data saved)
    when a worker takes the attempt: the worker cannot read the job, so it hands the
    delivery back to arq, which makes it again later; once the shard is back the job
    runs to its end. Was (a chaos run): arq counted the delivery done, and the job
    stayed queued for ever."""
    cluster = LocalCluster(replicas=0).start()
    namespace = f"d{secrets.token_hex(3)}"
    env = stack_env(redis_server.url, namespace, data_cluster=cluster.seeds)
    api, worker = Api([], env), Proc(["worker"], env)
    try:
        api.start()
        key = tenant_of_shard(cluster, namespace)
        shard = cluster.owner(key_slot(Keys(namespace).tenant_tag(TENANTS[key]).encode()))
        async with httpx.AsyncClient(
            base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=PATIENCE
        ) as c:
            job_id = await submit(c, {"steps": 3, "interval_ms": 10})  # no worker yet
            with shard.client() as node:
                node.save()
            shard.kill()
            worker.start()
            again = f"job {job_id}: its state is unreachable"
            await asyncio.to_thread(wait_until, lambda: again in worker.output(), 60, again)
            await asyncio.to_thread(shard.start)  # its data back from the save
            await asyncio.to_thread(wait_until, cluster.ok, 60, "the cluster whole again")
            async with asyncio.timeout(60):
                while (resp := await c.get(f"/v1/jobs/{job_id}")).status_code != 200 or (
                    resp.json()["status"] not in TERMINAL
                ):
                    await asyncio.sleep(0.2)
            assert resp.json()["status"] == "completed", resp.text
            assert resp.json()["attempt"] == 1  # the same attempt, delivered again
    finally:
        worker.stop()
        api.stop()
        cluster.stop()
