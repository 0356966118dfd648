"""A model server that is down when a job calls it, and comes back: the call is tried
again within ``PUSHSVC_LLM_RETRY_WINDOW_S``, inside the attempt, with the real server
process stopped and started again on its port."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.asyncio import Redis

from .conftest import make_client, model_answer, stack_env
from .procs import Api, Proc, RedisServer, free_port, http_ok, wait_until

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
    ``upstream_unreachable`` after 2.4 s, its attempts spent in the meantime."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    ns = f"rs{secrets.token_hex(3)}"
    env = stack_env(
        redis_server.url,
        ns,
        llm_base_url=url,
        llm_api_key="offline",
        llm_model="fake-1",
        llm_retry_window_s="30",
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
