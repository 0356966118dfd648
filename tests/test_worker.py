"""Job lifecycle through real API and worker processes: runs, retries, timeouts, crashes,
and the per-tenant running limit."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from redis.asyncio import Redis

from pushsvc.models import TERMINAL

from .conftest import Client, make_client, ops_api, stack_env, worker
from .procs import Proc, RedisServer


async def test_ticker_runs_to_completed(client: Client) -> None:
    job = await client.submit("ticker", {"steps": 5, "interval_ms": 20})
    assert job["status"] == "queued" and job["attempt"] == 1 and job["seq"] == 1
    done = await client.wait(job["id"])
    assert done["status"] == "completed"
    assert done["result"] == {"steps": 5}
    assert done["progress"] == 100
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    events = await client.log(job["id"])
    seqs = [data["seq"] for _, data in events]
    assert seqs == list(range(1, len(seqs) + 1)) and seqs[-1] == done["seq"]
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["snapshot", "status"] and kinds[-1] == "completed"
    progress = [d["progress"] for k, d in events if k == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100


async def test_a_running_attempt_holds_its_lease_until_it_ends(client: Client) -> None:
    """The worker takes an attempt's lease before its start transition and drops it after
    its last one (leases are the queue's keys, written in calls of their own)."""
    job = await client.submit("ticker", {"steps": 20, "interval_ms": 50})
    await client.wait(job["id"], lambda j: j["status"] == "running")
    raw = await client.redis.hget(client.keys.job(client.tenant, job["id"]), "arq_id")
    assert raw is not None
    leases, arq_id = client.keys.leases, raw.decode()
    assert await client.redis.zscore(leases, arq_id) is not None
    assert (await client.wait(job["id"]))["status"] == "completed"
    async with asyncio.timeout(10):  # dropped just after the terminal event
        while await client.redis.zscore(leases, arq_id) is not None:
            await asyncio.sleep(0.02)


async def test_an_attempt_whose_start_the_store_lost_unseen_is_delivered_again(
    client: Client,
) -> None:
    """Defence in depth: the store shows the job queued for the running attempt again,
    with nothing else changed (a loss the epochs did not see: a start made on a server
    that then lost it). The worker's next write is refused and the attempt stops; its
    delivery is then handed back to arq, and the attempt runs again to its end. Was: arq
    counted the delivery done, and the job waited, queued, for ever. As for a loss the
    epochs saw, the tenant starts new histories."""
    job = await client.submit("ticker", {"steps": 30, "interval_ms": 50})
    running = await client.wait(job["id"], lambda j: j["status"] == "running" and j["progress"])
    key = client.keys.job(client.tenant, job["id"])
    async with client.redis.pipeline(transaction=True) as pipe:  # the start, undone
        pipe.hset(key, "status", "queued").hdel(key, "owner")
        await pipe.execute()
    done = await client.wait(job["id"])
    assert done["status"] == "completed" and done["result"] == {"steps": 30}
    assert done["attempt"] == 1 and done["progress"] == 100
    # Streams may hold positions of what was lost: the tenant's histories start anew.
    assert done["epoch"] != running["epoch"]


async def test_retryable_error_retries_then_succeeds(client: Client) -> None:
    payload = {
        "steps": 3,
        "interval_ms": 1,
        "fail_at_step": 2,
        "fail_retryable": True,
        "fail_attempts": 1,
    }
    job = await client.submit("ticker", payload)
    done = await client.wait(job["id"])
    assert done["status"] == "completed" and done["attempt"] == 2
    log = await client.log(job["id"])
    changes = [(k, d["status"], d["attempt"]) for k, d in log if k in ("status", "snapshot")]
    # The second attempt starts as a whole snapshot: any SSE client starts its text anew.
    assert changes == [
        ("snapshot", "queued", 1),
        ("status", "running", 1),
        ("status", "queued", 2),
        ("snapshot", "running", 2),
    ]
    assert done["error"] is None  # the attempt that succeeded leaves no error
    statuses = [d for k, d in log if k == "status"]
    assert statuses[1]["error"]["code"] == "ticker_failure"
    assert statuses[1]["retry_in_s"] >= 0
    restart = [d for k, d in log if k == "snapshot"][-1]
    assert "reset" not in restart and restart["output"] == ""  # nothing was lost


async def test_retries_stop_after_max_attempts(client: Client) -> None:
    payload = {"steps": 2, "interval_ms": 1, "fail_at_step": 1, "fail_retryable": True}
    done = await client.wait((await client.submit("ticker", payload))["id"])
    assert done["status"] == "failed"
    assert done["attempt"] == done["max_attempts"] == 3
    assert done["error"] == {
        "code": "ticker_failure",
        "retryable": False,  # no attempt remains: the job will not be retried
        "message": "ticker failed at step 1 as asked",
    }


async def test_non_retryable_error_fails_at_once(client: Client) -> None:
    payload = {"steps": 3, "interval_ms": 1, "fail_at_step": 2, "fail_retryable": False}
    done = await client.wait((await client.submit("ticker", payload))["id"])
    assert done["status"] == "failed" and done["attempt"] == 1
    assert done["error"]["code"] == "ticker_failure" and done["error"]["retryable"] is False
    assert done["progress"] < 100


async def test_job_past_its_timeout_fails(client: Client) -> None:
    done = await client.wait((await client.submit("sleepy", {"seconds": 30}))["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "timeout"
    assert done["finished_at"] - done["started_at"] < 30


async def test_cancel_running_job(client: Client) -> None:
    job = await client.submit("ticker", {"steps": 1000, "interval_ms": 50})
    await client.wait(job["id"], lambda j: j["progress"] > 0)
    resp = await client.http.delete(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 202, resp.text
    done = await client.wait(job["id"])
    assert done["status"] == "cancelled" and done["progress"] < 100
    events = await client.log(job["id"])
    assert events[-1][0] == "cancelled"
    assert any(d.get("cancel_requested") for k, d in events if k == "status")


async def test_cancel_finished_job_is_409(client: Client) -> None:
    done = await client.wait((await client.submit("ticker", {"steps": 1, "interval_ms": 0}))["id"])
    resp = await client.http.delete(f"/v1/jobs/{done['id']}")
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "invalid_state"
    assert resp.json()["error"]["details"] == {"status": "completed"}


async def test_retry_endpoint_reruns_a_failed_job(client: Client) -> None:
    failed = await client.wait((await client.submit("first_run_fails", {}))["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "first_run"
    resp = await client.http.post(f"/v1/jobs/{failed['id']}/retry")
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "queued" and resp.json()["error"] is None
    done = await client.wait(failed["id"])
    assert done["status"] == "completed" and done["result"] == {"run": 2}


async def test_retry_of_a_running_or_completed_job_is_409(client: Client) -> None:
    job = await client.submit("ticker", {"steps": 1, "interval_ms": 0})
    await client.wait(job["id"])
    resp = await client.http.post(f"/v1/jobs/{job['id']}/retry")
    assert resp.status_code == 409


async def _kill_worker_mid_job(
    client: Client, redis_server: RedisServer, namespace: str, type_: str, payload: dict[str, Any]
) -> dict[str, Any]:
    env = stack_env(redis_server.url, namespace, lease_s="1")
    doomed = Proc(["worker"], env).start()
    try:
        job = await client.submit(type_, payload)
        await client.wait(job["id"], lambda j: j["progress"] > 0)
        doomed.signal(signal.SIGKILL)
    finally:
        doomed.stop()
    rescuer = Proc(["worker"], env).start()
    try:
        return await client.wait(job["id"], lambda j: j["status"] in TERMINAL, timeout=30)
    finally:
        rescuer.stop()


async def test_worker_sigkill_mid_job_reruns_it(
    isolated: tuple[Client, RedisServer, str],
) -> None:
    client, server, ns = isolated
    done = await _kill_worker_mid_job(
        client, server, ns, "ticker", {"steps": 30, "interval_ms": 50}
    )
    assert done["status"] == "completed" and done["attempt"] == 2
    statuses = [d for k, d in await client.log(done["id"]) if k == "status"]
    assert statuses[1]["status"] == "queued" and statuses[1]["error"]["code"] == "worker_lost"


async def test_worker_sigkill_with_no_attempts_left_fails_clearly(
    isolated: tuple[Client, RedisServer, str],
) -> None:
    client, server, ns = isolated
    done = await _kill_worker_mid_job(client, server, ns, "fragile", {"steps": 40})
    assert done["status"] == "failed"
    assert done["error"]["code"] == "worker_lost" and done["error"]["retryable"] is False


async def test_result_that_is_not_json_fails_clearly(client: Client) -> None:
    """Regression: a non-JSON result used to leave the job running with no lease."""
    done = await client.wait((await client.submit("bad_result", {}))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_result"


async def test_timeout_inside_the_job_is_retryable_not_the_job_timeout(client: Client) -> None:
    """Regression: any TimeoutError raised by job code was reported as the job's timeout."""
    done = await client.wait((await client.submit("inner_timeout", {}))["id"])
    assert done["status"] == "completed" and done["result"] == {"attempt": 2}
    statuses = [d for k, d in await client.log(done["id"]) if k == "status"]
    assert statuses[1]["error"]["code"] == "upstream_timeout"


async def test_worker_sigterm_hands_the_job_on_without_using_an_attempt(
    isolated: tuple[Client, RedisServer, str],
) -> None:
    """Regression: a deploy (SIGTERM) consumed an attempt, failing single-attempt jobs."""
    client, server, ns = isolated
    env = stack_env(server.url, ns)
    first = Proc(["worker"], env).start()
    job = await client.submit("fragile", {"steps": 30, "interval_ms": 50})
    await client.wait(job["id"], lambda j: j["progress"] > 0)
    first.stop()  # SIGTERM
    second = Proc(["worker"], env).start()
    try:
        done = await client.wait(job["id"], timeout=30)
    finally:
        second.stop()
    assert done["status"] == "completed" and done["attempt"] == 1
    statuses = [d for k, d in await client.log(job["id"]) if k == "status"]
    assert statuses[1]["error"]["code"] == "worker_shutdown"


async def test_tenant_running_limit_queues_the_rest_without_starving_others(
    redis_server: RedisServer, redis: Redis
) -> None:
    async with ops_api(redis_server, redis, tenant_max_running="1", throttle_delay_s="0.2") as (
        a,
        env,
    ):
        b = make_client(a.http.base_url.__str__(), "key-b", redis, env["PUSHSVC_NAMESPACE"])
        try:
            slow = {"steps": 5, "interval_ms": 100}
            mine = [(await a.submit("ticker", slow))["id"] for _ in range(3)]
            theirs = (await b.submit("ticker", slow))["id"]
            with worker(env, worker_concurrency="4"):
                done_a = [await a.wait(j, timeout=30) for j in mine]
                done_b = await b.wait(theirs, timeout=30)
        finally:
            await b.http.aclose()
    spans = sorted((j["started_at"], j["finished_at"]) for j in done_a)
    assert all(
        s2 >= f1 for (_, f1), (s2, _) in zip(spans, spans[1:], strict=False)
    )  # one at a time
    assert done_b["started_at"] < spans[-1][0]  # tenant b did not wait behind all of a's
