"""LLM jobs over the official openai client, against the offline model over real HTTP."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from .conftest import Client, make_client, model_answer, stack_env
from .procs import Api, Proc, RedisServer
from .sse import read


@pytest.fixture(scope="module")
def llm_stack(redis_server: RedisServer, model_url: str) -> Iterator[dict[str, str]]:
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


async def _stats(model_url: str) -> dict[str, int]:
    async with httpx.AsyncClient() as http:
        stats: dict[str, int] = (await http.get(model_url[:-3] + "/_fake/stats")).json()
        return stats


def statuses(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [d for k, d in events if k == "status"]


async def test_generate_streams_the_whole_text_in_order(
    llm: Client, llm_stack: dict[str, str]
) -> None:
    prompt = "Tell me about tides [[tokens:60]]"
    job = await llm.submit("generate", {"prompt": prompt, "max_tokens": 200, "expected_tokens": 60})
    stream = await read(llm.http, f"/v1/jobs/{job['id']}/events")
    done = await llm.get(job["id"])
    streamed = "".join(e.data["delta"] for e in stream.events if e.kind == "output")
    assert done["status"] == "completed" and stream.events[-1].kind == "completed"
    assert streamed == done["result"]["text"] == done["output"]
    assert streamed == await model_answer(llm_stack["model"], prompt, max_tokens=200)
    assert done["result"]["model"] == "fake-1"
    assert done["result"]["usage"]["completion_tokens"] == 60
    progress = [e.data["progress"] for e in stream.events if e.kind == "progress"]
    assert any(0 < p < 100 for p in progress) and progress == sorted(progress)
    stages = [e.data["stage"] for e in stream.events if e.kind == "progress"]
    assert "generating" in stages and stages[-1] == "finalizing"


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("429:times=1", "rate_limited"),
        ("500:times=1", "upstream_error"),
        ("drop:times=1", "upstream_unreachable"),
    ],
)
async def test_retryable_model_errors_are_retried(llm: Client, fault: str, code: str) -> None:
    prompt = f"retry me {secrets.token_hex(4)} [[fault:{fault}]]"
    done = await llm.wait((await llm.submit("generate", {"prompt": prompt}))["id"])
    assert done["status"] == "completed" and done["attempt"] == 2
    retry = statuses(await llm.log(done["id"]))[1]
    assert retry["status"] == "queued" and retry["error"]["code"] == code
    if fault.startswith("429"):
        assert retry["retry_in_s"] >= 1  # the server's Retry-After is honoured


@pytest.mark.parametrize(
    ("fault", "code"), [("401", "upstream_auth_failed"), ("400", "upstream_bad_request")]
)
async def test_auth_and_bad_request_errors_fail_at_once(llm: Client, fault: str, code: str) -> None:
    done = await llm.wait((await llm.submit("generate", {"prompt": f"x [[fault:{fault}]]"}))["id"])
    assert done["status"] == "failed" and done["attempt"] == 1
    assert done["error"]["code"] == code and done["error"]["retryable"] is False


@pytest.mark.timeout(60)
async def test_cancel_closes_the_upstream_stream(llm: Client, llm_stack: dict[str, str]) -> None:
    before = (await _stats(llm_stack["model"]))["disconnects"]
    job = await llm.submit("generate", {"prompt": f"{secrets.token_hex(4)} [[fault:stall]]"})
    await llm.wait(job["id"], lambda j: j["status"] == "running")
    opened = await _until(llm_stack["model"], lambda s: s["open_streams"] > 0)
    assert opened
    resp = await llm.http.delete(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 202
    assert (await llm.wait(job["id"]))["status"] == "cancelled"
    after = await _until(llm_stack["model"], lambda s: s["disconnects"] > before)
    assert after["disconnects"] > before  # the model saw its client go away


async def _until(model_url: str, check: Any) -> dict[str, int]:
    """Wait for the model server's own counters (another process: nothing to await)."""
    async with asyncio.timeout(10):
        while not check(stats := await _stats(model_url)):
            await asyncio.sleep(0.05)
    return stats


async def test_generate_items_validates_and_publishes_each_item(llm: Client) -> None:
    payload = {
        "kind": "persona",
        "theme": "a lighthouse town",
        "count": 5,
        "fields": ["age", "motto"],
        "parallel": 3,
    }
    job = await llm.submit("generate_items", payload)
    stream = await read(llm.http, f"/v1/jobs/{job['id']}/events")
    done = await llm.get(job["id"])
    assert done["status"] == "completed" and done["result"]["failed"] == 0
    items = done["result"]["items"]
    assert len(items) == 5
    assert all(set(i) == {"name", "description", "age", "motto"} for i in items)
    lines = [json.loads(line) for line in done["output"].splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(5))
    first_item = next(i for i, e in enumerate(stream.events) if e.kind == "output")
    assert first_item < len(stream.events) - 1  # items land before the job ends
    progress = [e.data["progress"] for e in stream.events if e.kind == "progress"]
    # One step per finished item (items finishing together may share one merged update).
    assert progress and all(p % 20 == 0 for p in progress) and progress[-1] == 100
    assert progress == sorted(progress)


async def test_malformed_items_are_retried(llm: Client) -> None:
    payload = {
        "kind": "faction",
        "theme": f"{secrets.token_hex(4)} [[fault:malformed:times=1]]",
        "count": 3,
    }
    done = await llm.wait((await llm.submit("generate_items", payload))["id"])
    assert done["status"] == "completed" and len(done["result"]["items"]) == 3


@pytest.mark.parametrize(("bad", "status"), [(1, "completed"), (2, "failed")])
async def test_batch_partial_success_within_tolerance(llm: Client, bad: int, status: str) -> None:
    inputs = [f"good {i}" for i in range(5 - bad)] + [f"bad {i} [[fault:500]]" for i in range(bad)]
    payload = {"template": "Summarize: {input}", "inputs": inputs, "failure_tolerance": 0.2}
    done = await llm.wait((await llm.submit("batch", payload))["id"], timeout=40)
    assert done["status"] == status
    result = done["result"]
    assert result["failed"] == bad and len(result["outputs"]) == 5 - bad
    assert all(o["output"] for o in result["outputs"])
    assert [e["code"] for e in result["errors"]] == ["upstream_error"] * bad
    if status == "failed":
        assert done["error"]["code"] == "too_many_failures"


@pytest.mark.parametrize(
    ("type_", "payload"),
    [
        ("generate", {"prompt": ""}),
        ("generate", {"prompt": "x", "temperature": 3}),
        ("generate_items", {"kind": "x", "theme": "y", "count": 51}),
        ("generate_items", {"kind": "x", "theme": "y", "fields": ["Bad Name"]}),
        ("batch", {"template": "no placeholder", "inputs": ["a"]}),
        ("batch", {"template": "{input}", "inputs": ["a"] * 1001}),
    ],
)
async def test_llm_payloads_are_validated(llm: Client, type_: str, payload: dict[str, Any]) -> None:
    resp = await llm.http.post("/v1/jobs", json={"type": type_, "payload": payload})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"][0]["loc"][0] == "payload"
