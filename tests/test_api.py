"""The v1 job endpoints over HTTP: contract shapes, bad input, tenants, idempotency, paging,
the per-tenant submissions limit."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from pushsvc.worker import worker_session

from .conftest import (
    Client,
    error_of,
    make_client,
    ops_api,
    settings_for,
    stack_env,
)
from .procs import Api, RedisServer

TICK = {"steps": 1, "interval_ms": 0}
JSON = {"Content-Type": "application/json"}  # raw bodies: the API takes JSON only


async def test_submit_answers_202_with_location_and_snapshot(client: Client) -> None:
    resp = await client.http.post("/v1/jobs", json={"type": "ticker", "payload": TICK})
    assert resp.status_code == 202
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    expected = {
        "id",
        "type",
        "status",
        "progress",
        "stage",
        "message",
        "output",
        "result",
        "error",
        "attempt",
        "max_attempts",
        "created_at",
        "started_at",
        "finished_at",
        "eta_s",
        "queue_position",
        "starts_in_s",
        "waiting",
        "llm",
        "seq",
        "epoch",
        "priority",
        "links",
    }
    assert set(job) == expected
    assert job["links"]["events"].startswith(f"/v1/jobs/{job['id']}/events?token=")
    # Was: the 202 said ``"epoch": ""``; its first event is in the store's epoch.
    assert job["epoch"] and job["epoch"] == (await client.get(job["id"]))["epoch"]


async def test_job_ids_are_uuid4_and_distinct(client: Client) -> None:
    import uuid

    ids = {(await client.submit("ticker", TICK))["id"] for _ in range(20)}
    assert len(ids) == 20 and all(uuid.UUID(i).version == 4 for i in ids)


async def test_etag_and_if_none_match(client: Client) -> None:
    done = await client.wait((await client.submit("ticker", TICK))["id"])
    resp = await client.http.get(f"/v1/jobs/{done['id']}")
    assert resp.headers["etag"] == f'"{done["seq"]}.{done["epoch"]}"'
    assert "retry-after" not in resp.headers  # finished: no reason to poll again
    again = await client.http.get(
        f"/v1/jobs/{done['id']}", headers={"If-None-Match": resp.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""
    stale = await client.http.get(f"/v1/jobs/{done['id']}", headers={"If-None-Match": '"1"'})
    assert stale.status_code == 200


async def test_polling_hint_while_running(client: Client) -> None:
    job = await client.submit("ticker", {"steps": 200, "interval_ms": 20})
    resp = await client.http.get(f"/v1/jobs/{job['id']}")
    assert float(resp.headers["retry-after"]) > 0
    await client.http.delete(f"/v1/jobs/{job['id']}")


async def test_job_types_lists_ticker_with_schema(client: Client) -> None:
    types = {t["name"]: t for t in (await client.http.get("/v1/job-types")).json()["types"]}
    schema = types["ticker"]["payload_schema"]
    assert schema["properties"]["steps"]["maximum"] == 10000
    assert schema["properties"]["interval_ms"]["maximum"] == 60000


async def test_health_and_readiness(client: Client) -> None:
    assert (await client.http.get("/healthz")).json() == {"status": "ok"}
    assert (await client.http.get("/readyz")).json()["redis"] is True


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"type": "ticker", "payload": {', 400, "invalid_json"),
        (b"\xff\xfe\x00not utf-8", 400, "invalid_json"),
        (b"[1, 2]", 422, "validation_error"),
        (b'{"type": "nope", "payload": {}}', 422, "unknown_job_type"),
        (b'{"type": "ticker", "payload": {"steps": 0}}', 422, "validation_error"),
        (b'{"type": "ticker", "payload": {"steps": "many"}}', 422, "validation_error"),
        (b'{"type": "ticker", "payload": {"bogus": 1}}', 422, "validation_error"),
        (b'{"type": "ticker", "payload": {}, "extra": 1}', 422, "validation_error"),
        (b'{"type": "ticker", "priority": "urgent"}', 422, "validation_error"),
    ],
)
async def test_bad_input_gets_a_clear_4xx_and_writes_nothing(
    client_factory: Callable[..., Client], body: bytes, status: int, code: str
) -> None:
    client = client_factory("key-h")  # a tenant no other test submits for
    resp = await client.http.post("/v1/jobs", content=body, headers=JSON)
    assert error_of(resp, status)["code"] == code
    assert (await client.http.get("/v1/jobs")).json()["jobs"] == []


async def test_schema_errors_name_the_offending_field(client: Client) -> None:
    resp = await client.http.post("/v1/jobs", json={"type": "ticker", "payload": {"steps": -1}})
    details = error_of(resp, 422)["details"]
    assert details[0]["loc"] == ["payload", "steps"]


async def test_body_over_the_limit_is_413(client: Client) -> None:
    big = json.dumps({"type": "ticker", "payload": {"pad": "x" * 300_000}}).encode()
    assert error_of(await client.http.post("/v1/jobs", content=big, headers=JSON), 413)["code"] == (
        "payload_too_large"
    )

    async def chunked() -> Any:  # no Content-Length: the limit holds while reading
        for _ in range(40):
            yield b" " * 10_000

    resp = await client.http.post("/v1/jobs", content=chunked(), headers=JSON)
    assert error_of(resp, 413)["code"] == "payload_too_large"


async def test_unknown_routes_and_methods_use_the_error_shape(client: Client) -> None:
    assert error_of(await client.http.get("/v2/nothing"), 404)["code"] == "not_found"
    assert error_of(await client.http.put("/v1/jobs"), 405)["code"] == "method_not_allowed"


@pytest.mark.parametrize("job_id", ["not-a-uuid", "00000000-0000-4000-8000-000000000000"])
async def test_unknown_job_is_404(client: Client, job_id: str) -> None:
    for method, path in [("GET", ""), ("DELETE", ""), ("POST", "/retry")]:
        resp = await client.http.request(method, f"/v1/jobs/{job_id}{path}")
        assert error_of(resp, 404)["code"] == "job_not_found"


async def test_credentials_are_required_and_checked(
    client_factory: Callable[..., Client],
) -> None:
    for key in (None, "wrong-key"):
        anon = client_factory(key)
        for method, path in [("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/job-types")]:
            assert error_of(await anon.http.request(method, path), 401)["code"] in {
                "missing_credentials",
                "invalid_credentials",
            }


async def test_tenants_never_see_each_others_jobs(client_factory: Callable[..., Client]) -> None:
    owner, other = client_factory("key-b"), client_factory("key-c")
    job = await owner.submit("ticker", {"steps": 100, "interval_ms": 50})
    jid = job["id"]
    for method, path in [("GET", ""), ("DELETE", ""), ("POST", "/retry")]:
        resp = await other.http.request(method, f"/v1/jobs/{jid}{path}")
        assert error_of(resp, 404)["code"] == "job_not_found"
    listed = (await other.http.get("/v1/jobs", params={"limit": 200})).json()["jobs"]
    assert jid not in {j["id"] for j in listed}
    assert (await owner.get(jid))["status"] in {"queued", "running"}  # untouched by `other`
    await owner.http.delete(f"/v1/jobs/{jid}")


async def test_idempotency_key_returns_the_same_job(
    client_factory: Callable[..., Client],
) -> None:
    a, b = client_factory("key-d"), client_factory("key-e")
    headers = {"Idempotency-Key": "order-42"}
    # The stack is shared: the tenant may hold other tests' jobs.
    before = {j["id"] for j in (await a.http.get("/v1/jobs")).json()["jobs"]}
    first = await a.submit("ticker", TICK, headers=headers)
    resp = await a.http.post("/v1/jobs", json={"type": "ticker", "payload": TICK}, headers=headers)
    assert resp.status_code == 202 and resp.json()["id"] == first["id"]
    assert resp.headers["idempotent-replayed"] == "true"
    await a.wait(first["id"])
    after = {j["id"] for j in (await a.http.get("/v1/jobs")).json()["jobs"]}
    assert after - before == {first["id"]}  # one job made
    runs = [d for k, d in await a.log(first["id"]) if k == "status" and d["status"] == "running"]
    assert len(runs) == 1  # ran once
    other_tenant = await b.submit("ticker", TICK, headers=headers)
    assert other_tenant["id"] != first["id"]
    changed = {"type": "ticker", "payload": {"steps": 2, "interval_ms": 0}}
    resp = await a.http.post("/v1/jobs", json=changed, headers=headers)
    assert error_of(resp, 409)["code"] == "idempotency_key_reused"


async def test_concurrent_submits_with_one_key_make_one_job(
    client_factory: Callable[..., Client],
) -> None:
    c = client_factory("key-f")
    headers = {"Idempotency-Key": "burst"}
    resps = await asyncio.gather(
        *[
            c.http.post("/v1/jobs", json={"type": "ticker", "payload": TICK}, headers=headers)
            for _ in range(10)
        ]
    )
    assert {r.status_code for r in resps} == {202}
    assert len({r.json()["id"] for r in resps}) == 1


async def test_list_is_newest_first_with_cursor_paging_and_filters(
    client_factory: Callable[..., Client],
) -> None:
    c = client_factory("key-g")
    ids = [(await c.submit("ticker", TICK))["id"] for _ in range(5)]
    failing = await c.submit("ticker", {**TICK, "fail_at_step": 1})
    for jid in [*ids, failing["id"]]:
        await c.wait(jid)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await c.http.get("/v1/jobs", params=params)).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [failing["id"], *reversed(ids)]
    failed = (await c.http.get("/v1/jobs", params={"status": "failed"})).json()["jobs"]
    assert [j["id"] for j in failed] == [failing["id"]]
    none = (await c.http.get("/v1/jobs", params={"type": "sleepy"})).json()["jobs"]
    assert none == []
    for params in ({"limit": 0}, {"limit": "x"}, {"status": "bogus"}):
        assert error_of(await c.http.get("/v1/jobs", params=params), 422)
    assert error_of(await c.http.get("/v1/jobs", params={"cursor": "!!"}), 400)["code"] == (
        "bad_cursor"
    )
    # Were a 503 ``redis_unavailable`` (true is an int to isinstance) and 500s (deep
    # nesting): cursors that decode to JSON of the wrong shape.
    for raw in (b'[true,"x"]', b'[-1,"x"]', b'[1.5,"x"]', b"[" * 1000 + b"]" * 1000):
        cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        resp = await c.http.get("/v1/jobs", params={"cursor": cursor})
        assert error_of(resp, 400)["code"] == "bad_cursor", raw[:20]


async def test_cancel_queued_job_never_starts_and_retry_runs_it(
    isolated: tuple[Client, RedisServer, str], redis: Redis
) -> None:
    client, server, namespace = isolated  # no worker yet: the job stays queued
    job = await client.submit("ticker", TICK)
    resp = await client.http.delete(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    # Regression: a cancelled queued job stayed in arq's queue, counted, until a worker ran.
    assert (await client.http.get("/v1/stats")).json()["overall"]["queue_depth"] == 0
    settings = settings_for(stack_env(server.url, namespace))
    async with worker_session(settings, burst=True, handle_signals=False) as worker:
        await worker.async_run()
    after = await client.get(job["id"])
    assert after["status"] == "cancelled" and after["started_at"] is None
    assert "running" not in [d.get("status") for _, d in await client.log(job["id"])]
    resp = await client.http.post(f"/v1/jobs/{job['id']}/retry")
    assert resp.status_code == 202 and resp.json()["status"] == "queued"
    async with worker_session(settings, burst=True, handle_signals=False) as worker:
        await worker.async_run()
    assert (await client.get(job["id"]))["status"] == "completed"


async def test_no_pickled_value_in_redis(
    isolated: tuple[Client, RedisServer, str], redis: Redis
) -> None:
    client, server, namespace = isolated
    queued = await client.submit("ticker", TICK)  # its arq job is stored while queued
    values: list[bytes] = []
    async for key in redis.scan_iter(match="arq:*"):
        if await redis.type(key) == b"string":
            values.append(await redis.get(key))
    assert values, "expected the queued arq job to be stored"
    settings = settings_for(stack_env(server.url, namespace))
    async with worker_session(settings, burst=True, handle_signals=False) as worker:
        await worker.async_run()
    await client.wait(queued["id"])
    async for key in redis.scan_iter(match=f"{namespace}:*"):
        kind = await redis.type(key)
        if kind == b"string":
            values.append(await redis.get(key))
        elif kind == b"hash":
            values += (await redis.hgetall(key)).values()
        elif kind == b"stream":
            values += [v for _, f in await redis.xrange(key) for v in f.values()]
    assert values
    for value in values:
        assert not value.startswith(b"\x80"), value  # pickle's protocol marker
    for value in values[:1]:
        json.loads(value)  # arq's job record is JSON


async def test_redis_down_gives_503_and_the_api_stays_up(redis_server: RedisServer) -> None:
    dead = RedisServer()  # a port nothing listens on
    api = Api([], stack_env(dead.url, "down")).start()
    try:
        async with httpx.AsyncClient(
            base_url=api.url, headers={"Authorization": "Bearer key-a"}
        ) as http:
            resp = await http.post("/v1/jobs", json={"type": "ticker", "payload": TICK})
            assert error_of(resp, 503)["code"] == "redis_unavailable"
            assert resp.headers["retry-after"]
            resp = await http.get("/v1/jobs/00000000-0000-4000-8000-000000000000")
            assert error_of(resp, 503)["code"] == "redis_unavailable"
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200
    finally:
        api.stop()


async def test_text_that_is_not_unicode_and_dunder_field_names_are_refused_at_submit(
    client: Client,
) -> None:
    """Were accepted, then failed the job as ``internal_error``: a lone surrogate (JSON's
    ``\\ud800``) in a batch input, and a ``__proto__`` field in ``generate_items``."""
    for body in (
        {"type": "batch", "payload": {"template": "say {input}", "inputs": ["ok", "\ud800"]}},
        {"type": "ticker", "payload": {"steps": 1, "\ud800": 1}},
        {"type": "generate_items", "payload": {"kind": "k", "theme": "t", "fields": ["__proto__"]}},
    ):
        content = json.dumps(body)  # ASCII: the surrogate travels as \ud800
        resp = await client.http.post(
            "/v1/jobs", content=content, headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 422, (body["type"], resp.status_code, resp.text)
        assert resp.json()["error"]["code"] == "validation_error", resp.text


async def test_submissions_per_minute_limit_answers_429(
    redis_server: RedisServer, redis: Redis
) -> None:
    async with ops_api(redis_server, redis, tenant_submits_per_minute="3") as (client, env):
        codes = []
        for _ in range(5):
            resp = await client.http.post("/v1/jobs", json={"type": "ticker", "payload": TICK})
            codes.append(resp.status_code)
        assert codes == [202, 202, 202, 429, 429]
        assert resp.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(resp.headers["retry-after"]) <= 60
        other = make_client(str(client.http.base_url), "key-b", redis, env["PUSHSVC_NAMESPACE"])
        try:  # a limit per tenant, not for everyone
            assert (
                await other.http.post("/v1/jobs", json={"type": "ticker", "payload": TICK})
            ).status_code == 202
        finally:
            await other.http.aclose()
