"""Stream tokens (auth.py, sse.py) over real sockets: scopes, tenants, forgery, expiry, logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from pushsvc.auth import TENANT_SCOPE, Authenticator, _b64, job_scope
from pushsvc.settings import Settings

from . import sse
from .conftest import Client, error_of, stack_env
from .procs import Api, RedisServer, wait_until

TICK = {"steps": 3, "interval_ms": 20}
LONG = {"steps": 1000, "interval_ms": 100}  # runs until the test cancels it


def token_of(url: str) -> str:
    (token,) = parse_qs(urlsplit(url).query)["token"]
    return token


def mint(env: dict[str, str], tenant: str, scope: str, expires: int) -> str:
    """A token signed with the secret the test stack runs with, for any expiry."""
    auth = Authenticator(Settings(secret=env["PUSHSVC_SECRET"]))
    body = _b64(json.dumps([tenant, scope, expires], separators=(",", ":")).encode())
    return f"{body}.{auth._sign(body)}"


def assert_whole_run(stream: sse.Stream, job_id: str, last: str = "completed") -> None:
    assert stream.closed, "the server should end a per-job stream after the terminal event"
    assert stream.events[0].kind == "snapshot" and stream.events[-1].kind == last
    assert {e.data["job_id"] for e in stream.events} == {job_id}
    sse.assert_gap_free(stream, job_id)


@pytest.fixture
async def anon() -> AsyncIterator[Callable[[str], httpx.AsyncClient]]:
    """httpx clients that send no Authorization header, closed at teardown."""
    made: list[httpx.AsyncClient] = []

    def factory(base_url: str) -> httpx.AsyncClient:
        made.append(httpx.AsyncClient(base_url=base_url, timeout=10))
        return made[-1]

    yield factory
    for http in made:
        await http.aclose()


async def read_tenant_stream_until_cancelled(
    http: httpx.AsyncClient, url: str, owner: Client, job_id: str
) -> list[sse.Event]:
    """Read an all-jobs stream; once the job shows up, cancel it and read to its end."""
    seen: list[sse.Event] = []
    async with asyncio.timeout(20), contextlib.aclosing(sse.events(http, url)) as frames:
        async for event in frames:
            if event.data.get("job_id") != job_id:
                continue  # the tenant's other active jobs
            seen.append(event)
            if len(seen) == 1:
                assert (await owner.http.delete(f"/v1/jobs/{job_id}")).status_code in {200, 202}
            if event.kind == "cancelled":
                return seen
    raise AssertionError(f"the tenant stream ended before the job did: {seen}")


async def test_submit_links_events_with_a_token_that_streams_without_a_header(
    client: Client, anon: Callable[[str], httpx.AsyncClient]
) -> None:
    job = await client.submit("ticker", TICK)
    events_url = job["links"]["events"]
    assert events_url.startswith(f"/v1/jobs/{job['id']}/events?token=")
    assert token_of(events_url)
    assert job["links"]["events_expires_at"] > time.time()
    http = anon(str(client.http.base_url))
    stream = await sse.read(http, events_url)
    assert_whole_run(stream, job["id"])
    assert stream.events[-1].data["result"] == {"steps": TICK["steps"]}


async def test_job_token_is_refused_on_another_jobs_stream(
    client: Client, anon: Callable[[str], httpx.AsyncClient]
) -> None:
    first = await client.submit("ticker", TICK)
    second = await client.submit("ticker", TICK)
    token = token_of(first["links"]["events"])
    http = anon(str(client.http.base_url))
    resp = await http.get(f"/v1/jobs/{second['id']}/events", params={"token": token})
    assert error_of(resp, 401)["code"] == "invalid_token"
    assert resp.headers["www-authenticate"] == "Bearer"
    named = await http.get("/v1/events", params={"token": token, "job": second["id"]})
    assert error_of(named, 401)["code"] == "invalid_token"
    everything = await http.get("/v1/events", params={"token": token})
    assert error_of(everything, 401)["code"] == "invalid_token"  # a job token is not a tenant's
    await client.wait(first["id"])
    await client.wait(second["id"])


async def test_tenant_stream_token_opens_the_tenants_streams_only(
    client_factory: Callable[..., Client], anon: Callable[[str], httpx.AsyncClient]
) -> None:
    owner, stranger = client_factory("key-a"), client_factory("key-b")
    before = int(time.time())
    resp = await owner.http.post("/v1/stream-tokens")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert set(body) == {"token", "expires_at", "events_url"}
    token = body["token"]
    assert body["events_url"] == f"/v1/events?token={token}"
    assert before < body["expires_at"] <= int(time.time()) + 900
    http = anon(str(owner.http.base_url))

    running = await owner.submit("ticker", LONG)
    seen = await read_tenant_stream_until_cancelled(http, body["events_url"], owner, running["id"])
    assert seen[0].kind == "snapshot" and seen[-1].kind == "cancelled"

    job = await owner.submit("ticker", TICK)
    stream = await sse.read(http, f"/v1/jobs/{job['id']}/events?token={token}")
    assert_whole_run(stream, job["id"])

    theirs = await stranger.submit("ticker", TICK)
    resp = await http.get(f"/v1/jobs/{theirs['id']}/events", params={"token": token})
    assert error_of(resp, 404)["code"] == "job_not_found"
    resp = await http.get("/v1/events", params={"token": token, "job": theirs["id"]})
    assert error_of(resp, 404)["code"] == "job_not_found"
    await stranger.wait(theirs["id"])


async def test_forged_and_expired_tokens_are_refused(
    client: Client, stack: dict[str, Any], anon: Callable[[str], httpx.AsyncClient]
) -> None:
    job = await client.wait((await client.submit("ticker", TICK))["id"])
    url = f"/v1/jobs/{job['id']}/events"
    http = anon(str(client.http.base_url))
    scope, env = job_scope(job["id"]), stack["env"]

    # Control: a token minted here with the stack's secret is accepted, so the
    # refusals below are about the signature and the expiry, not about the secret.
    good = mint(env, "tenant-a", scope, int(time.time()) + 60)
    assert_whole_run(await sse.read(http, f"{url}?token={good}"), job["id"])

    body, _, signature = good.partition(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    other_tenant = _b64(json.dumps(["tenant-b", scope, int(time.time()) + 60]).encode())
    foreign = Authenticator(Settings(secret="some-other-secret")).issue("tenant-a", scope)[0]
    for forged in (f"{body}.{flipped}", f"{other_tenant}.{signature}", foreign, body, ""):
        resp = await http.get(url, params={"token": forged})
        assert error_of(resp, 401)["code"] == "invalid_token", forged

    expired = mint(env, "tenant-a", scope, int(time.time()) - 60)
    assert error_of(await http.get(url, params={"token": expired}), 401)["code"] == (
        "token_expired"
    )
    expired_tenant = mint(env, "tenant-a", TENANT_SCOPE, int(time.time()) - 60)
    resp = await http.get("/v1/events", params={"token": expired_tenant})
    assert error_of(resp, 401)["code"] == "token_expired"


async def test_tokens_are_not_credentials_for_other_endpoints(
    client: Client, anon: Callable[[str], httpx.AsyncClient]
) -> None:
    job = await client.submit("ticker", LONG)
    job_token = token_of(job["links"]["events"])
    tenant_token = (await client.http.post("/v1/stream-tokens")).json()["token"]
    http = anon(str(client.http.base_url))
    for token in (job_token, tenant_token):
        for method, path in [
            ("GET", "/v1/jobs"),
            ("GET", f"/v1/jobs/{job['id']}"),
            ("DELETE", f"/v1/jobs/{job['id']}"),
            ("POST", f"/v1/jobs/{job['id']}/retry"),
            ("POST", "/v1/stream-tokens"),
            ("GET", "/v1/job-types"),
        ]:
            resp = await http.request(method, path, params={"token": token})
            assert error_of(resp, 401)["code"] == "missing_credentials", (method, path)
    assert (await client.get(job["id"]))["status"] in {"queued", "running"}  # not cancelled
    assert (await client.http.delete(f"/v1/jobs/{job['id']}")).status_code in {200, 202}
    await client.wait(job["id"])


async def test_bearer_api_key_opens_both_stream_endpoints(client: Client) -> None:
    job = await client.submit("ticker", TICK)
    stream = await sse.read(client.http, f"/v1/jobs/{job['id']}/events")
    assert_whole_run(stream, job["id"])
    many = await sse.read(client.http, f"/v1/events?job={job['id']}")
    assert many.closed and many.events[0].kind == "snapshot"
    assert many.events[-1].kind == "completed" and many.of(job["id"]) == many.events

    running = await client.submit("ticker", LONG)
    seen = await read_tenant_stream_until_cancelled(
        client.http, "/v1/events", client, running["id"]
    )
    assert seen[0].kind == "snapshot" and seen[-1].kind == "cancelled"
    wrong = await client.http.get(
        f"/v1/jobs/{job['id']}/events", headers={"Authorization": "Bearer not-a-key"}
    )
    assert error_of(wrong, 401)["code"] == "invalid_credentials"


async def test_tokens_and_api_keys_never_reach_the_api_log(
    redis_server: RedisServer, stack: dict[str, Any], anon: Callable[[str], httpx.AsyncClient]
) -> None:
    key, bad_key = f"sk-log-{secrets.token_hex(12)}", f"sk-bad-{secrets.token_hex(12)}"
    # The stack's namespace, so the stack's worker runs the jobs this API process takes.
    env = stack_env(
        redis_server.url, stack["env"]["PUSHSVC_NAMESPACE"], api_keys=f"{key}=tenant-logs"
    )
    api = Api([], env).start()
    try:
        async with httpx.AsyncClient(
            base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=10
        ) as http:
            resp = await http.post("/v1/jobs", json={"type": "ticker", "payload": TICK})
            assert resp.status_code == 202, resp.text
            job = resp.json()
            tenant_token = (await http.post("/v1/stream-tokens")).json()["token"]
        job_token = token_of(job["links"]["events"])
        plain = anon(api.url)
        assert_whole_run(await sse.read(plain, job["links"]["events"]), job["id"])
        by_tenant = await sse.read(plain, f"/v1/jobs/{job['id']}/events?token={tenant_token}")
        assert_whole_run(by_tenant, job["id"])
        refused = await plain.get("/v1/jobs", headers={"Authorization": f"Bearer {bad_key}"})
        assert error_of(refused, 401)["code"] == "invalid_credentials"
        tampered = f"{job_token[:-1]}{'A' if job_token[-1] != 'A' else 'B'}"
        resp = await plain.get("/v1/events", params={"token": tampered})
        assert error_of(resp, 401)["code"] == "invalid_token"
        resp = await plain.get("/v1/jobs", params={"token": job_token})
        assert error_of(resp, 401)["code"] == "missing_credentials"

        # Access lines are written when each response ends, in the API process. The wait
        # allows a query string, so that a leak fails on the assertions below, not here.
        stream_line = re.compile(rf'"GET /v1/jobs/{job["id"]}/events[^"]*" 200')
        wait_until(lambda: len(stream_line.findall(api.output())) == 2, 10, "access lines")
        wait_until(lambda: re.search(r'"GET /v1/events[^"]*" 401', api.output()), 10, "401")
    finally:
        api.stop()
    log = api.output()
    for secret in (key, bad_key, job_token, tenant_token, tampered):
        assert secret not in log, f"{secret[:12]}... leaked into the API log"
    for token in (job_token, tenant_token):
        assert token.partition(".")[2] not in log  # not even the signature alone
    assert "token=" not in log
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    access = [e["event"] for e in lines if e["logger"] == "pushsvc.access"]
    assert sum(e.startswith(f'"GET /v1/jobs/{job["id"]}/events" 200') for e in access) == 2
    assert any(e.startswith('"GET /v1/jobs" 401') for e in access)
    assert any(e.startswith('"GET /v1/events" 401') for e in access)
