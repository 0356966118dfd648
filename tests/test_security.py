"""Request hardening against real API processes: JSON bodies only (CSRF), keyless mode's
Host and cross-site checks (DNS rebinding), slow and idle clients, private stats, the
operator and metrics credentials, forged stream tokens, and the access line of a 500."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from pushsvc.keys import Keys
from pushsvc.logs import settings_secrets
from pushsvc.settings import Settings

from .conftest import burst, error_of, stack_env
from .procs import Api, RedisServer, wait_until
from .sse import events

TICK = {"steps": 1, "interval_ms": 0}
JOB = {"type": "ticker", "payload": TICK}
ADMIN_KEY = f"admin-{secrets.token_hex(8)}"
METRICS_TOKEN = f"metrics-{secrets.token_hex(8)}"
CORS_ORIGIN = "http://localhost:3000"


def keyless_env(redis_url: str, **extra: str) -> dict[str, str]:
    """One local tenant without API keys, as a developer runs it on loopback."""
    env = stack_env(redis_url, f"s{secrets.token_hex(3)}", **extra)
    del env["PUSHSVC_API_KEYS"], env["PUSHSVC_SECRET"]
    return env


@contextlib.contextmanager
def running(env: dict[str, str]) -> Iterator[Api]:
    api = Api([], env).start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="module")
def keyless(redis_server: RedisServer) -> Iterator[Api]:
    env = keyless_env(
        redis_server.url, cors_origins=CORS_ORIGIN, allowed_hosts="api.test,*.corp.test"
    )
    with running(env) as api:
        yield api


@pytest.fixture(scope="module")
def keyed(redis_server: RedisServer) -> Iterator[Api]:
    """API keys (key-a, key-b, ...), an operator key, a metrics token, one stream each."""
    env = stack_env(
        redis_server.url,
        f"s{secrets.token_hex(3)}",
        admin_keys=f"other-admin,{ADMIN_KEY}",
        metrics_token=METRICS_TOKEN,
        tenant_max_streams="1",
        stats_push_s="0.2",
    )
    with running(env) as api:
        yield api


@pytest.fixture
async def http(keyed: Api) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=keyed.url, timeout=10) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- CSRF: bodies are JSON -------------------------------------------------------------


async def test_a_body_that_is_not_json_is_415_and_bodiless_posts_need_no_type(
    keyed: Api, http: httpx.AsyncClient
) -> None:
    """Regression: ``text/plain`` POSTs (which any page can send without a preflight)
    were read as JSON and submitted jobs."""
    body = json.dumps(JOB)
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "text/json"):
        headers = {**bearer("key-a"), **({"Content-Type": content_type} if content_type else {})}
        resp = await http.post("/v1/jobs", content=body, headers=headers)
        assert error_of(resp, 415)["code"] == "unsupported_media_type", content_type
    resp = await http.post("/v1/stream-tokens", content="x", headers=bearer("key-a"))
    assert error_of(resp, 415)["code"] == "unsupported_media_type"
    assert (await http.get("/v1/jobs", headers=bearer("key-a"))).json()["jobs"] == []

    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        headers = {**bearer("key-a"), "Content-Type": content_type}
        resp = await http.post("/v1/jobs", content=body, headers=headers)
        assert resp.status_code == 202, resp.text
    job = resp.json()
    # No body, no Content-Type: the bodiless POSTs are answered as before.
    assert (await http.post("/v1/stream-tokens", headers=bearer("key-a"))).status_code == 201
    retry = await http.post(f"/v1/jobs/{job['id']}/retry", headers=bearer("key-a"))
    assert error_of(retry, 409)["code"] == "invalid_state"  # queued: not a 415


# ---- keyless mode: cross-site requests, Host names ------------------------------------


async def test_keyless_api_refuses_cross_site_requests(keyless: Api) -> None:
    """Regression: a keyless API on loopback took jobs from any web page."""
    same = keyless.url
    async with httpx.AsyncClient(base_url=keyless.url, timeout=10) as http:
        before = len((await http.get("/v1/jobs")).json()["jobs"])
        refused = [
            {"Origin": "https://evil.example"},
            {"Origin": "null"},
            {"Origin": "http://localhost:3001", "Sec-Fetch-Site": "same-site"},
            {"Origin": same.replace("127.0.0.1", "localhost")},  # another origin, same host
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"},
        ]
        for headers in refused:
            resp = await http.post("/v1/jobs", json=JOB, headers=headers)
            assert error_of(resp, 403)["code"] == "cross_site_request", headers
        # A body is not needed to do harm: the bodiless POSTs are refused too.
        resp = await http.post("/v1/stream-tokens", headers={"Sec-Fetch-Site": "cross-site"})
        assert error_of(resp, 403)["code"] == "cross_site_request"
        resp = await http.get("/v1/jobs", headers={"Sec-Fetch-Site": "cross-site"})
        assert error_of(resp, 403)["code"] == "cross_site_request"
        assert len((await http.get("/v1/jobs")).json()["jobs"]) == before

        allowed = [
            {"Origin": same, "Sec-Fetch-Site": "same-origin"},  # the console itself
            {"Sec-Fetch-Site": "none"},  # typed into the address bar
            {"Origin": CORS_ORIGIN, "Sec-Fetch-Site": "same-site"},  # PUSHSVC_CORS_ORIGINS
            {},  # not a browser
        ]
        for headers in allowed:
            resp = await http.post("/v1/jobs", json=JOB, headers=headers)
            assert resp.status_code == 202, (headers, resp.text)
        # A link followed from another site still opens the console.
        link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        assert (await http.get("/", headers=link)).status_code == 200


async def test_keyless_api_answers_only_loopback_host_names(keyless: Api) -> None:
    """Regression (DNS rebinding): a page whose name resolved to 127.0.0.1 could read
    and write a keyless API, its requests carrying its own name as Host."""
    port = keyless.port
    async with httpx.AsyncClient(base_url=keyless.url, timeout=10) as http:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "corp.test"):
            resp = await http.get("/v1/job-types", headers={"Host": host})
            assert error_of(resp, 421)["code"] == "host_not_allowed", host
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"[::1]:{port}",
            "app.localhost",
            "api.test",  # PUSHSVC_ALLOWED_HOSTS
            f"x.corp.test:{port}",
        ):
            resp = await http.get("/v1/job-types", headers={"Host": host})
            assert resp.status_code == 200, (host, resp.text)


async def test_api_keys_leave_host_and_origin_to_cors(keyed: Api, http: httpx.AsyncClient) -> None:
    """With API keys a page cannot send the key without CORS: no Host or Origin check."""
    headers = {**bearer("key-b"), "Host": "api.example.com", "Origin": "https://evil.example"}
    assert (await http.post("/v1/jobs", json=JOB, headers=headers)).status_code == 202


# ---- slow and idle clients -------------------------------------------------------------


async def idle(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sent ``data`` (an unfinished request head) and waits."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


async def test_idle_connections_give_way_and_busy_ones_get_503(redis_server: RedisServer) -> None:
    """Regression: 19,990 connections that never finished their headers used up the
    open files, and /healthz stopped answering."""
    with running(keyless_env(redis_server.url, max_connections="20", header_timeout_s="60")) as api:
        conns = [await idle(api.port, PARTIAL_HEAD) for _ in range(60)]
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            assert (await http.get("/healthz")).status_code == 200
            # The longest-waiting gave way, unanswered: at most 20 are open.
            async with asyncio.timeout(10):
                for reader, _ in conns[:40]:
                    assert await reader.read() == b""
            for _, writer in conns:
                writer.close()

            # Connections busy with streams never give way: past the limit, 503.
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(20):
                    resp = await stack.enter_async_context(http.stream("GET", "/v1/stats/events"))
                    assert resp.status_code == 200
                async with httpx.AsyncClient(base_url=api.url, timeout=10) as fresh:
                    resp = await fresh.get("/healthz")
                    assert error_of(resp, 503)["code"] == "server_busy"
                    assert resp.headers["retry-after"] == "1"


async def test_request_headers_must_arrive_in_time_and_fit(redis_server: RedisServer) -> None:
    env = keyless_env(redis_server.url, header_timeout_s="0.5", max_header_bytes="4096")
    with running(env) as api:
        async with asyncio.timeout(10):
            reader, writer = await idle(api.port, PARTIAL_HEAD)
            answer = await reader.read()  # 408, then closed
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == (
                "request_timeout"
            )
            reader, writer = await idle(api.port, PARTIAL_HEAD + b"X-Big: " + b"a" * 10_000)
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 431 "), answer
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            for _ in range(2):  # a keep-alive connection's next request is not cut short
                assert (await http.get("/healthz")).status_code == 200
            headers = {"X-Fits": "a" * 2000}
            assert (await http.get("/healthz", headers=headers)).status_code == 200


async def test_a_request_body_must_arrive_in_time(redis_server: RedisServer) -> None:
    """A client that sends a submit's headers and then only part of its body gets 408 and
    its connection closed; nothing of the job is written; other requests go on."""
    env = keyless_env(redis_server.url, body_timeout_s="0.5")
    body = json.dumps({"type": "ticker", "payload": {"steps": 1}}).encode()
    head = (
        "POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with running(env) as api:
        async with asyncio.timeout(10):
            reader, writer = await idle(api.port, head + body[:10])
            try:
                answer = await reader.read()  # 408, then closed
            finally:
                writer.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_timeout" and "body" in error["message"]
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            assert (await http.get("/v1/jobs")).json()["jobs"] == []  # nothing half-written
            resp = await http.post(
                "/v1/jobs", content=body, headers={"content-type": "application/json"}
            )
            assert resp.status_code == 202, resp.text


async def test_an_answer_before_the_body_is_in_closes_the_connection(
    redis_server: RedisServer,
) -> None:
    """A request refused before its body was read (here 401) keeps its connection only
    as long as headers may take: the rest of the body is not read and dropped for as long
    as the client keeps sending it."""
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    )

    async def trickle(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):  # once the server has closed it
            while True:  # each byte would restart uvicorn's keep-alive wait
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.1)

    env = stack_env(redis_server.url, f"s{secrets.token_hex(3)}", header_timeout_s="0.5")
    with running(env) as api:
        async with asyncio.timeout(10):
            reader, writer = await idle(api.port, head)
            sending = asyncio.create_task(trickle(writer))
            answer = b""
            try:
                with contextlib.suppress(ConnectionError):  # closed mid-send: a reset
                    while chunk := await reader.read(65536):  # the 401, then closed
                        answer += chunk
            finally:
                sending.cancel()
                writer.close()
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        # A body that does come whole keeps the connection for the next request.
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            for _ in range(2):
                headers = {"content-type": "application/json", "authorization": "Bearer no"}
                resp = await http.post("/v1/jobs", content=b" " * 40000, headers=headers)
                assert resp.status_code == 401


# ---- stats: each tenant its own, operators all ----------------------------------------


async def stats_of(
    http: httpx.AsyncClient, key: str, ready: Callable[[dict[str, Any]], bool] = lambda d: True
) -> dict[str, Any]:
    """``/v1/stats`` as ``key`` sees it, once ``ready`` (the API computes it at most once a
    second: a document of a moment ago may come first)."""
    async with asyncio.timeout(10):
        while True:
            resp = await http.get("/v1/stats", headers=bearer(key))
            assert resp.status_code == 200, resp.text
            doc: dict[str, Any] = resp.json()
            if ready(doc):
                return doc
            await asyncio.sleep(0.2)


async def test_a_tenant_sees_its_own_stats_and_an_operator_all(
    keyed: Api, http: httpx.AsyncClient
) -> None:
    """Regression: every tenant saw every tenant's throughput, failures and queue."""
    for key, payload in [("key-c", TICK), ("key-c", TICK), ("key-d", {**TICK, "fail_at_step": 1})]:
        resp = await http.post(
            "/v1/jobs", json={"type": "ticker", "payload": payload}, headers=bearer(key)
        )
        assert resp.status_code == 202, resp.text
    await burst(keyed.env)
    for _ in range(3):  # left queued: no worker runs now
        resp = await http.post("/v1/jobs", json=JOB, headers=bearer("key-c"))
        assert resp.status_code == 202

    c = await stats_of(http, "key-c", lambda doc: doc["overall"]["queue_depth"] == 3)
    d, every = await stats_of(http, "key-d"), await stats_of(http, ADMIN_KEY)
    assert (c["overall"]["completed"], c["overall"]["failed"]) == (2, 0)
    assert c["types"]["ticker"]["completed"] == 2
    assert (c["overall"]["queue_depth"], c["overall"]["queued_ready"]) == (3, 3)
    assert c["overall"]["oldest_queued_age_s"] >= 0
    assert (d["overall"]["completed"], d["overall"]["failed"]) == (0, 1)
    assert d["overall"]["queue_depth"] == 0 and d["overall"]["oldest_queued_age_s"] is None
    assert d["overall"]["success_rate"] == 0.0
    # The operator's figures hold every tenant's (other tests' tenants too).
    assert every["overall"]["completed"] >= 2 and every["overall"]["failed"] >= 1
    assert every["overall"]["queue_depth"] >= 3

    assert error_of(await http.get("/v1/stats"), 401)["code"] == "missing_credentials"
    resp = await http.get("/v1/stats", headers=bearer("nobody"))
    assert error_of(resp, 401)["code"] == "invalid_credentials"
    # An operator key is not a tenant's: it lists no jobs and submits none.
    assert error_of(await http.get("/v1/jobs", headers=bearer(ADMIN_KEY)), 401)


async def pushed_stats(
    http: httpx.AsyncClient,
    url: str,
    key: str | None = None,
    ready: Callable[[dict[str, Any]], bool] = lambda d: True,
) -> dict[str, Any]:
    """The first document the stats stream pushes that is ``ready``."""
    async with asyncio.timeout(10):
        stream = events(http, url, headers=bearer(key) if key else None)
        async with contextlib.aclosing(stream):
            async for event in stream:
                assert event.kind == "stats"
                if ready(event.data):
                    return event.data
    raise AssertionError("the stats stream ended")


async def test_the_stats_stream_is_private_and_counts_as_an_open_stream(
    keyed: Api, http: httpx.AsyncClient
) -> None:
    """Regression: /v1/stats/events pushed every tenant the global figures and counted
    towards no stream limit (here PUSHSVC_TENANT_MAX_STREAMS=1)."""
    job = (await http.post("/v1/jobs", json=JOB, headers=bearer("key-e"))).json()
    await burst(keyed.env)
    async with http.stream("GET", "/v1/stats/events", headers=bearer("key-e")) as open_one:
        assert open_one.status_code == 200
        again = await http.get("/v1/stats/events", headers=bearer("key-e"))
        assert error_of(again, 429)["code"] == "rate_limited"
        other = await http.get(f"/v1/jobs/{job['id']}/events", headers=bearer("key-e"))
        assert error_of(other, 429)["code"] == "rate_limited"
        # Another tenant's count is its own; operators' streams are not limited.
        mine = await pushed_stats(http, "/v1/stats/events", "key-f")
        assert mine["overall"]["completed"] == 0 and mine["overall"]["queue_depth"] == 0
        async with http.stream("GET", "/v1/stats/events", headers=bearer(ADMIN_KEY)) as admin:
            assert admin.status_code == 200
            every = await pushed_stats(http, "/v1/stats/events", ADMIN_KEY)
            assert every["overall"]["completed"] >= 1  # key-e's job, at least
    token = (await http.post("/v1/stream-tokens", headers=bearer("key-e"))).json()["token"]
    by_token = await pushed_stats(
        http, f"/v1/stats/events?token={token}", ready=lambda doc: doc["overall"]["completed"]
    )
    assert by_token["overall"]["completed"] == 1  # key-e's one job, nobody else's


async def test_metrics_ask_for_the_token_when_one_is_set(
    keyed: Api, http: httpx.AsyncClient
) -> None:
    assert error_of(await http.get("/metrics"), 401)["code"] == "missing_credentials"
    resp = await http.get("/metrics", headers=bearer("key-a"))
    assert error_of(resp, 401)["code"] == "invalid_credentials"
    resp = await http.get("/metrics", headers=bearer(METRICS_TOKEN))
    assert resp.status_code == 200 and "pushsvc_open_streams" in resp.text


def test_operator_keys_and_the_metrics_token_are_redacted_from_logs() -> None:
    settings = Settings.model_validate({"admin_keys": "a1, a2", "metrics_token": "m1"})
    assert {"a1", "a2", "m1"} <= set(settings_secrets(settings))
    assert "a1" not in repr(settings)


# ---- forged stream tokens --------------------------------------------------------------


def signed(body: bytes | str, secret: str = "test-secret-not-for-production") -> str:
    """A token signed as auth.py signs: ``<body>.<HMAC-SHA256 of it, 24 bytes>``,
    base64url without padding; ``bytes`` bodies are base64-encoded first."""
    b64 = lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("=")  # noqa: E731
    text = b64(body) if isinstance(body, bytes) else body
    mac = hmac.new(secret.encode(), text.encode(), hashlib.sha256).digest()[:24]
    return f"{text}.{b64(mac)}"


SOON = int(time.time()) + 3600
WRONG_SHAPES = [
    b'{"tenant": "tenant-a", "scope": "tenant", "exp": 1}',
    b'["tenant-a", "tenant"]',
    b'["tenant-a", "tenant", 1, 2]',
    b'["tenant-a", "tenant", "soon"]',
    b'["tenant-a", "tenant", true]',
    b'["tenant-a", "tenant", NaN]',
    b'["tenant-a", "tenant", 1e999]',
    b'["tenant-a", "tenant", ' + b"9" * 400 + b"]",
    b"[1, 2, " + str(SOON).encode() + b"]",
    b'[["tenant-a"], "tenant", ' + str(SOON).encode() + b"]",
    b'["", "tenant", ' + str(SOON).encode() + b"]",
    b"null",
    b"\xff\xfe not utf-8",
    b"not json",
]


async def test_stream_tokens_of_the_wrong_shape_are_401(
    keyed: Api, http: httpx.AsyncClient
) -> None:
    """Regression: a token with a valid signature whose body was not the
    ``[tenant, scope, expiry]`` list (another version's, say) was a 500."""
    job = (await http.post("/v1/jobs", json=JOB, headers=bearer("key-g"))).json()
    tokens = [signed(body) for body in WRONG_SHAPES]
    tokens += [signed("not base64!"), signed("tökén"), "tökén.sïgnature", "..", ""]
    for token in tokens:
        for path in ("/v1/events", f"/v1/jobs/{job['id']}/events", "/v1/stats/events"):
            resp = await http.get(path, params={"token": token})
            assert resp.status_code == 401, (token, path, resp.text)
            assert error_of(resp, 401)["code"] in ("invalid_token", "missing_credentials")
    # The same signing, with the right shape: the forgeries above failed on their shape.
    good = signed(json.dumps(["tenant-g", "tenant", SOON]).encode())
    stream = events(http, f"/v1/jobs/{job['id']}/events?token={good}")
    async with contextlib.aclosing(stream):
        assert (await anext(stream)).kind == "snapshot"


# ---- the access line of a 500 ---------------------------------------------------------


async def test_the_access_line_of_an_unhandled_error_says_500(
    keyed: Api, http: httpx.AsyncClient, redis: Redis
) -> None:
    """Regression: the access line said 0 when a handler raised before responding."""
    job = (await http.post("/v1/jobs", json=JOB, headers=bearer("key-h"))).json()
    keys = Keys(keyed.env["PUSHSVC_NAMESPACE"])
    await redis.hset(
        keys.job("tenant-h", job["id"]), "progress", "{not json"
    )  # a stored field broken
    resp = await http.get(f"/v1/jobs/{job['id']}", headers=bearer("key-h"))
    assert error_of(resp, 500)["code"] == "internal_error"
    line = re.compile(rf'"GET /v1/jobs/{job["id"]}\\?" (\d+) ')  # a JSON line escapes the "
    wait_until(lambda: line.search(keyed.output()), 10, "the access line")
    assert [m.group(1) for m in line.finditer(keyed.output())] == ["500"]
    await redis.delete(keys.job("tenant-h", job["id"]))
