"""Fixtures: a private Redis, a running API and worker, tenants, and event-driven waits."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

# The built-in types, for the tests that read ``jobs.registry`` without an entry point
# (``jobs.load_job_modules``) having filled it.
from pushsvc import llm_jobs, ticker  # noqa: F401
from pushsvc.auth import LOCAL_TENANT
from pushsvc.data_plane import connect_data
from pushsvc.epoch import server_run_id
from pushsvc.keys import Keys
from pushsvc.models import TERMINAL
from pushsvc.queue import Queue
from pushsvc.settings import Settings
from pushsvc.store import JobStore
from pushsvc.tools.cluster import LocalCluster
from pushsvc.worker import worker_session

from .procs import Api, Proc, RedisServer, free_port, http_ok, wait_until

TENANTS = {f"key-{name}": f"tenant-{name}" for name in "abcdefghijklmnopq"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse two tests with one node id. pytest-xdist (``-n``, scripts/test.sh) keys its
    work by node id and would run one of them and drop the rest without a word. pytest
    9.2 gives schemathesis' items (``test_api_conforms_to_its_document[POST /v1/jobs]``,
    one per operation) the function's node id, hence ``pytest<9.2`` in pyproject.toml."""
    seen: set[str] = set()
    for item in items:
        if item.nodeid in seen:
            raise pytest.UsageError(f"two tests have the node id {item.nodeid}")
        seen.add(item.nodeid)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def stack_env(redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    env = {
        "PUSHSVC_REDIS_URL": redis_url,
        "PUSHSVC_NAMESPACE": namespace,
        "PUSHSVC_API_KEYS": ",".join(f"{k}={t}" for k, t in TENANTS.items()),
        "PUSHSVC_SECRET": "test-secret-not-for-production",
        "PUSHSVC_JOB_MODULES": "tests.jobtypes",
        "PUSHSVC_RETRY_BASE_S": "0.02",
        "PUSHSVC_LEASE_S": "2",
        "PUSHSVC_POLL_DELAY_S": "0.05",
        # Every step its own event, so tests can count on seqs; the throttle has its own test.
        "PUSHSVC_PUBLISH_RATE_HZ": "1000",
        # A failed model call ends its attempt at once (tests of retries count attempts);
        # tests/test_llm_restart.py rides a restart out with the default window.
        "PUSHSVC_LLM_RETRY_WINDOW_S": "0",
    }
    env.update({f"PUSHSVC_{k.upper()}": v for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    """The offline OpenAI-compatible model (``pushsvc fake-llm``), a real HTTP server."""
    port = free_port()
    model = Proc(["fake-llm", "--port", str(port), "--tokens-per-s", "400"], {}).start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{url}/v1/models"), 20, "pushsvc fake-llm")
    yield f"{url}/v1"
    model.stop()


async def model_answer(model_url: str, prompt: str, **kw: Any) -> str:
    """The model's answer asked directly (the fake is deterministic)."""
    async with openai.AsyncOpenAI(base_url=model_url, api_key="x", max_retries=0) as client:
        reply = await client.chat.completions.create(
            model="fake-1", messages=[{"role": "user", "content": prompt}], **kw
        )
        return reply.choices[0].message.content or ""


@pytest.fixture(scope="session")
def stack(redis_server: RedisServer) -> Iterator[dict[str, Any]]:
    """One API and one worker process shared by the tests that need nothing special."""
    env = stack_env(redis_server.url, f"t{secrets.token_hex(3)}")
    worker = Proc(["worker"], env).start()
    api = Api([], env).start()
    yield {"api": api, "worker": worker, "env": env}
    api.stop()
    worker.stop()


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    """The JSON error of ``resp``, checked to have the contract's shape and ``status``."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body: dict[str, Any] = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return body["error"]


def settings_for(env: dict[str, str]) -> Settings:
    return Settings(redis_url=env["PUSHSVC_REDIS_URL"], namespace=env["PUSHSVC_NAMESPACE"])


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


class Client:
    """httpx against a running API, as one tenant, with event-driven waits."""

    def __init__(self, http: httpx.AsyncClient, redis: Redis, namespace: str, tenant: str) -> None:
        self.http, self.redis, self.keys = http, redis, Keys(namespace)
        self.tenant = tenant  # whose jobs its key makes (their keys carry it)

    async def submit(self, type_: str, payload: dict[str, Any], **kw: Any) -> dict[str, Any]:
        resp = await self.http.post("/v1/jobs", json={"type": type_, "payload": payload}, **kw)
        assert resp.status_code == 202, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def get(self, job_id: str) -> dict[str, Any]:
        resp = await self.http.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def wait(
        self,
        job_id: str,
        until: Callable[[dict[str, Any]], bool] = lambda j: j["status"] in TERMINAL,
        timeout: float = 20,
    ) -> dict[str, Any]:
        """Wait for a snapshot matching ``until``, woken by the job's pub/sub channel."""
        async with asyncio.timeout(timeout), self.redis.pubsub() as pubsub:
            await pubsub.subscribe(self.keys.job_channel(self.tenant, job_id))
            while True:
                job = await self.get(job_id)  # read after subscribing: no missed change
                if until(job):
                    return job
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)

    async def log(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        """The job's stored event log as (kind, data) pairs."""
        import json

        entries = await self.redis.xrange(self.keys.job_log(self.tenant, job_id))
        return [(f[b"k"].decode(), json.loads(f[b"d"])) for _, f in entries]


def make_client(api_url: str, key: str | None, redis: Redis, namespace: str) -> Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    http = httpx.AsyncClient(base_url=api_url, headers=headers, timeout=10)
    return Client(http, redis, namespace, TENANTS.get(key or "", LOCAL_TENANT))


@pytest.fixture
async def client_factory(
    stack: dict[str, Any], redis: Redis
) -> AsyncIterator[Callable[..., Client]]:
    made: list[Client] = []

    def factory(key: str | None = "key-a", api: Api | None = None) -> Client:
        target = api or stack["api"]
        c = make_client(target.url, key, redis, target.env["PUSHSVC_NAMESPACE"])
        made.append(c)
        return c

    yield factory
    for c in made:
        await c.http.aclose()


@pytest.fixture
async def client(client_factory: Callable[..., Client]) -> Client:
    return client_factory("key-a")


@pytest.fixture
async def isolated(
    redis_server: RedisServer, redis: Redis
) -> AsyncIterator[tuple[Client, RedisServer, str]]:
    """An API with its own namespace and no worker: the test brings (or withholds) workers."""
    namespace = f"i{secrets.token_hex(3)}"
    api = Api([], stack_env(redis_server.url, namespace)).start()
    c = make_client(api.url, "key-a", redis, namespace)
    yield c, redis_server, namespace
    await c.http.aclose()
    api.stop()


@pytest.fixture(scope="module")
def llm_stack(redis_server: RedisServer, model_url: str) -> Iterator[dict[str, str]]:
    """A worker and an API on the offline model, for one test module's LLM jobs."""
    env = stack_env(
        redis_server.url,
        f"llm{secrets.token_hex(3)}",
        llm_base_url=model_url,
        llm_api_key="offline",
        llm_model="fake-1",
        retry_base_s="0.05",
    )
    worker = Proc(["worker"], env).start()
    api = Api([], env).start()
    yield {"api": api.url, "ns": env["PUSHSVC_NAMESPACE"], "model": model_url}
    api.stop()
    worker.stop()


@pytest.fixture
async def llm(llm_stack: dict[str, str], redis: Redis) -> AsyncIterator[Client]:
    c = make_client(llm_stack["api"], "key-a", redis, llm_stack["ns"])
    yield c
    await c.http.aclose()


# An API of its own settings and workers as a test asks (stats, metrics, limits, priorities).

TICK = {"steps": 1, "interval_ms": 0}


@asynccontextmanager
async def ops_api(
    server: RedisServer, redis: Redis, key: str = "key-a", **settings: str
) -> AsyncIterator[tuple[Client, dict[str, str]]]:
    """An API of its own namespace and settings; the test decides about workers."""
    env = stack_env(server.url, f"o{secrets.token_hex(3)}", **settings)
    api = Api([], env).start()
    client = make_client(api.url, key, redis, env["PUSHSVC_NAMESPACE"])
    try:
        yield client, env
    finally:
        await client.http.aclose()
        api.stop()


@contextmanager
def worker(env: dict[str, str], **settings: str) -> Iterator[Proc]:
    proc = Proc(["worker"], {**env, **{f"PUSHSVC_{k.upper()}": v for k, v in settings.items()}})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


async def burst(env: dict[str, str], **update: Any) -> None:
    """Run one in-process arq worker until the queue is empty."""
    settings = settings_for(env).model_copy(update={"poll_delay_s": 0.01, **update})
    async with worker_session(settings, burst=True, handle_signals=False) as w:
        await w.async_run()


@asynccontextmanager
async def open_store(redis_server: RedisServer, **overrides: Any) -> AsyncIterator[JobStore]:
    """A job store on a namespace of its own in the test Redis (its data plane on a
    cluster when ``data_cluster`` is given: two planes)."""
    namespace = f"s{secrets.token_hex(3)}"
    settings = Settings(redis_url=redis_server.url, namespace=namespace, **overrides)
    redis = Redis.from_url(settings.redis_url)
    data = connect_data(settings, socket_timeout=10)
    try:
        if data is None:
            yield JobStore(redis, settings)
        else:
            yield JobStore(data, settings, queue=Queue(redis, settings))  # type: ignore[arg-type]
    finally:
        if data is not None:
            await data.close_all()
        await redis.aclose()


async def noted_run_id(client: Redis) -> str:
    """The run id pushsvc notes for the server ``client`` reaches (epoch.server_run_id)."""
    server, replication = await client.info("server"), await client.info("replication")
    return server_run_id(
        server["run_id"], replication["master_replid"], replication["second_repl_offset"] >= 0
    )


@pytest.fixture(scope="session")
def data_cluster() -> Iterator[LocalCluster]:
    """A Redis Cluster (3 primaries, 3 replicas) for tests of two planes; tests that
    kill or move its parts start their own (scenarios/test_cluster.py)."""
    cluster = LocalCluster().start()
    yield cluster
    cluster.stop()
