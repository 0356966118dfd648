"""A model server that is down when a job calls it and comes back (the call is tried
again within ``PUSHSVC_LLM_RETRY_WINDOW_S``, inside the attempt), that is slow past the
whole call's deadline, or that stalls: real processes, the real server stopped and
started again on its port."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from pushsvc.settings import Settings

from ..conftest import Client, make_client, model_answer, stack_env
from ..procs import Api, Proc, RedisServer, free_port, http_ok, wait_until

PROMPT = "[[tokens:40]] the harbour at dawn"


async def until_in_log(proc: Proc, text: str, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while text not in proc.output():
            await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_a_model_server_coming_back_is_ridden_out_within_the_attempt(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Was: a server killed and restarted 2 s later left ``generate`` failed
    ``upstream_unreachable`` after 2.4 s, its attempts spent in the meantime. The window
    is the job type's own here (the global one is 0)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    ns = f"rs{secrets.token_hex(3)}"
    env = stack_env(
        redis_server.url,
        ns,
        llm_base_url=url,
        llm_api_key="offline",
        llm_model="fake-1",
        llm_retry_window_s="0",
        llm_retry_windows="generate=30",
    )
    model = Proc(["fake-llm", "--port", str(port), "--tokens-per-s", "400"], {})
    worker = Proc(["worker"], env).start()
    api = Api([], env).start()
    client = make_client(api.url, "key-a", redis, ns)
    try:
        job = await client.submit("generate", {"prompt": PROMPT})
        await until_in_log(worker, "trying again")  # the call failed: nothing listens
        model.start()
        await asyncio.to_thread(wait_until, lambda: http_ok(f"{url}/models"), 20, "fake-llm")
        final = await client.wait(job["id"], timeout=40)
        assert final["status"] == "completed", final
        assert final["attempt"] == 1 and final["error"] is None
        assert final["output"] == await model_answer(url, PROMPT)
    finally:
        await client.http.aclose()
        api.stop()
        worker.stop()
        model.stop()


def test_retry_windows_per_job_type_are_read_from_the_environment() -> None:
    settings = Settings(llm_retry_windows="generate=30, batch=2.5")  # type: ignore[arg-type]
    assert settings.llm_retry_windows == {"generate": 30.0, "batch": 2.5}
    for bad in ("generate", "generate=soon", "=3", "batch=-1", "batch=inf"):
        with pytest.raises(ValidationError):
            Settings(llm_retry_windows=bad)  # type: ignore[arg-type]


async def run_one(
    redis_server: RedisServer,
    redis: Redis,
    model_url: str,
    type_: str,
    payload: dict[str, Any],
    **settings: str,
) -> dict[str, Any]:
    """One job on a worker with ``settings``, to its end."""
    ns = f"ls{secrets.token_hex(3)}"
    env = stack_env(
        redis_server.url,
        ns,
        llm_base_url=model_url,
        llm_api_key="offline",
        llm_model="fake-1",
        **settings,
    )
    worker = Proc(["worker"], env).start()
    api = Api([], env).start()
    client: Client = make_client(api.url, "key-a", redis, ns)
    try:
        job = await client.submit(type_, payload)
        return await client.wait(job["id"], timeout=40)
    finally:
        await client.http.aclose()
        api.stop()
        worker.stop()


@pytest.mark.timeout(60)
async def test_a_call_past_its_whole_deadline_fails_and_is_not_retried(
    redis_server: RedisServer, redis: Redis, model_url: str
) -> None:
    """Was: ``PUSHSVC_LLM_TIMEOUT_S`` bounded each read, not the call: a slow server kept
    a job running for minutes. A call that streamed past it would only do so again."""
    slow = {"prompt": f"{secrets.token_hex(4)} [[tokens:200]] [[rate:20]]"}  # 10 s
    final = await run_one(redis_server, redis, model_url, "generate", slow, llm_timeout_s="2")
    assert final["status"] == "failed" and final["attempt"] == 1, final
    assert final["error"]["code"] == "upstream_timeout"
    assert final["error"]["retryable"] is False
    assert 0 < len(final["output"]) < len(await model_answer(model_url, slow["prompt"]))


@pytest.mark.timeout(60)
async def test_a_stalled_stream_ends_within_the_first_token_timeout(
    redis_server: RedisServer, redis: Redis, model_url: str
) -> None:
    stalled = {"prompt": f"{secrets.token_hex(4)} [[fault:stall]]"}
    final = await run_one(
        redis_server, redis, model_url, "generate", stalled, llm_first_token_timeout_s="1"
    )
    assert final["status"] == "failed" and final["attempt"] == final["max_attempts"], final
    assert final["error"]["code"] == "upstream_timeout"


@pytest.mark.timeout(60)
async def test_generate_items_sends_max_tokens(
    redis_server: RedisServer, redis: Redis, model_url: str
) -> None:
    """Was: ``generate_items`` sent no ``max_tokens``: on llama.cpp an item ran to the
    context limit. Five tokens cut every item's JSON (``length``)."""
    payload = {"kind": "ship", "theme": "harbour", "count": 1, "max_tokens": 5}
    final = await run_one(redis_server, redis, model_url, "generate_items", payload)
    assert final["status"] == "failed", final
    assert final["error"]["code"] == "too_many_failures", final["error"]
    [error] = final["result"]["errors"]
    assert error["code"] == "malformed_item" and "cut: length" in error["message"], error
