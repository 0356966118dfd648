"""Per-model limits (pushsvc/model_limits.py, lua/model_limits.lua): two real workers
share them through Redis against a real model server that answers 429 past its own limit;
the settings' errors; what a waiting or cancelled call does (one worker's limiter in the
test's process: calls in tasks); the retry window; Redis not answering."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from pushsvc.llm import LLM
from pushsvc.model_limits import ModelLimiter
from pushsvc.settings import Settings

from .conftest import Client, ops_api, worker
from .procs import Proc, RedisServer, free_port, http_ok, wait_until

MODEL = "fake-1"


@contextmanager
def model_server(*args: str) -> Iterator[str]:
    """``pushsvc fake-llm`` with ``args`` (its own limit: ``--rpm N --rpm-window-s W``)."""
    port = free_port()
    proc = Proc(["fake-llm", "--port", str(port), "--tokens-per-s", "400", *args], {}).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/v1/models"), 20, "pushsvc fake-llm")
        yield url
    finally:
        proc.stop()


def model_stats(url: str) -> dict[str, int]:
    """What the model server served (``/_fake/stats``) and its limit did (``/_fake/limits``)."""
    stats: dict[str, int] = httpx.get(f"{url}/_fake/stats", timeout=5).json()
    stats.update(httpx.get(f"{url}/_fake/limits", timeout=5).json())
    return stats


@asynccontextmanager
async def limited_stack(
    server: RedisServer, redis: Redis, model: str, limits: str, workers: int = 2, **extra: str
) -> AsyncIterator[tuple[Client, dict[str, str]]]:
    """An API and ``workers`` worker processes on ``model`` under ``limits``."""
    settings = dict(
        llm_base_url=f"{model}/v1",
        llm_api_key="offline",
        llm_model=MODEL,
        model_limits=f"{MODEL}={limits}",
        **extra,
    )
    async with ops_api(server, redis, **settings) as (client, env):
        with ExitStack() as running:
            for _ in range(workers):
                running.enter_context(worker(env))
            yield client, env


def waits(log: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any] | None]:
    """The ``waiting`` values of a job's progress events, in order."""
    return [data.get("waiting") for kind, data in log if kind == "progress" and "waiting" in data]


@pytest.mark.timeout(10)
def test_settings_errors_name_the_setting_and_the_shape() -> None:
    limits = Settings(model_limits="gpt-4o-mini=rpm:500,tpm:200000,concurrency:50; a:b=rpm:2")
    assert limits.model_limits["gpt-4o-mini"].tpm == 200000
    assert limits.model_limits["a:b"].rpm == 2 and limits.model_limits["a:b"].window_s == 60
    for bad, says in [
        ("gpt-4o-mini", "must look like"),
        ("m=rpm", "must look like"),
        ("m=burst:3", "keys: concurrency, rpm, tpm, window_s"),
        ("m=rpm:0", "model 'm': rpm"),
        ("m=concurrency:many", "model 'm': concurrency"),
    ]:
        with pytest.raises(ValidationError, match="PUSHSVC_MODEL_LIMITS") as caught:
            Settings(model_limits=bad)
        assert says in str(caught.value), bad


@pytest.mark.timeout(120)
async def test_two_workers_stay_under_the_request_limit_and_say_why_they_wait(
    redis_server: RedisServer, redis: Redis
) -> None:
    """4 requests per 2 s for two workers, against a server that allows just that: every
    job completes, the server answered no 429, and waiting jobs said model_limit."""
    with model_server("--rpm", "4", "--rpm-window-s", "2") as model:
        async with limited_stack(redis_server, redis, model, "rpm:4,window_s:2") as (client, _):
            jobs = [
                (await client.submit("generate", {"prompt": f"[[tokens:3]] job {i}"}))["id"]
                for i in range(10)
            ]
            done = [await client.wait(j, timeout=60) for j in jobs]
            logs = [await client.log(j) for j in jobs]
        stats = model_stats(model)
    assert [j["status"] for j in done] == ["completed"] * 10, done
    assert stats["rate_limited"] == 0 and stats["requests"] == 10, stats
    waited = [w for log in logs for w in waits(log) if w is not None]
    assert waited and all(w["reason"] == "model_limit" for w in waited), waited
    assert all(isinstance(w["until"], float) for w in waited), waited
    for log in logs:  # a job that waited said so before its text, and cleared it then
        said = waits(log)
        if any(said):
            assert said[-1] is None, said
        first_text = next(i for i, (kind, _) in enumerate(log) if kind == "output")
        assert all(d.get("waiting") is None for k, d in log[first_text:] if k == "progress")


@pytest.mark.timeout(120)
async def test_concurrency_limit_holds_across_two_workers(
    redis_server: RedisServer, redis: Redis
) -> None:
    with model_server() as model:
        async with limited_stack(redis_server, redis, model, "concurrency:2") as (client, _):
            # Each answer streams for about a second, so the calls would overlap.
            prompt = "[[tokens:20]][[rate:20]] job {}"
            jobs = [
                (await client.submit("generate", {"prompt": prompt.format(i)}))["id"]
                for i in range(6)
            ]
            done = [await client.wait(j, timeout=60) for j in jobs]
        stats = model_stats(model)
    assert [j["status"] for j in done] == ["completed"] * 6, done
    assert stats["peak_streams"] == 2 and stats["requests"] == 6, stats


@pytest.mark.timeout(120)
async def test_a_killed_workers_slot_is_freed_after_its_expiry(
    redis_server: RedisServer, redis: Redis
) -> None:
    """The one slot is held by a call whose worker is SIGKILLed (it never releases it):
    another worker's call gets it once the slot's expiry (PUSHSVC_LEASE_S) has passed."""
    with model_server() as model:
        async with limited_stack(
            redis_server, redis, model, "concurrency:1", workers=0, lease_s="3"
        ) as (client, env):
            holders = client.keys.model_holders(MODEL)
            with worker(env) as first:
                stuck = await client.submit("generate", {"prompt": "[[tokens:2000]][[rate:5]] a"})
                await client.wait(stuck["id"], lambda j: bool(j["output"]), timeout=30)
                assert await redis.zcard(holders) == 1
                first.signal(signal.SIGKILL)
            cancel = await client.http.delete(f"/v1/jobs/{stuck['id']}")
            assert cancel.status_code == 202, cancel.text  # running: cancel requested
            with worker(env):
                job = await client.submit("generate", {"prompt": "[[tokens:3]] b"})
                done = await client.wait(job["id"], timeout=60)
    assert done["status"] == "completed", done
    assert done["result"]["text"]


@pytest.mark.timeout(60)
async def test_a_job_cancelled_while_it_waits_stops_waiting(
    redis_server: RedisServer, redis: Redis
) -> None:
    """2 requests a minute: the second job's call waits about a minute; DELETE ends it."""
    with model_server() as model:
        async with limited_stack(redis_server, redis, model, "rpm:2", workers=1) as (client, _):
            first = await client.submit("generate", {"prompt": "[[tokens:3]] one"})
            await client.wait(first["id"], timeout=30)
            second = await client.submit("generate", {"prompt": "[[tokens:3]] two"})
            waiting = await client.wait(second["id"], lambda j: bool(j.get("waiting")))
            assert waiting["waiting"]["reason"] == "model_limit"
            assert waiting["waiting"]["until"] > time.time() + 20
            resp = await client.http.delete(f"/v1/jobs/{second['id']}")
            assert resp.status_code == 202, resp.text  # running (waiting): cancel requested
            ended = await client.wait(second["id"], timeout=15)
        assert model_stats(model)["requests"] == 1
    assert ended["status"] == "cancelled", ended


@pytest.mark.timeout(30)
async def test_a_cancelled_reservation_is_given_back(redis_server: RedisServer) -> None:
    """The last call to reserve a start and leave before it gives the start back: the
    next call waits as long as it would have, not one window more."""
    turns: asyncio.Queue[str] = asyncio.Queue()
    async with limiter_on(redis_server.url, "rpm:2") as limiter:
        async with limiter.hold("m", 10, None):  # the bucket's one request
            pass
        (b,) = await waiting_calls(limiter, "b", turns)
        await b.cancel()
        (c,) = await waiting_calls(limiter, "c", turns)
        await c.cancel()
    until_b, until_c = b.told.result(), c.told.result()
    assert until_b is not None and until_c is not None, (until_b, until_c)
    assert until_b > time.time() + 20 and until_c - until_b < 1, (until_b, until_c)


@pytest.mark.timeout(30)
async def test_redis_not_answering_lets_the_call_go_ahead() -> None:
    """Fail open: a limiter whose Redis is down neither raises nor holds the call."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", model_limits="m=rpm:1")
    limiter = ModelLimiter(settings)
    told: list[str | None] = []

    async def on_wait(reason: str | None, until: float | None) -> None:
        told.append(reason)

    try:
        for _ in range(3):  # past the limit, were it kept
            async with limiter.hold("m", 10, on_wait):
                pass
        async with limiter.hold("unlimited-model", 10, on_wait):
            pass
    finally:
        await limiter.aclose()
    assert told == []


@asynccontextmanager
async def limiter_on(redis_url: str, limits: str) -> AsyncIterator[ModelLimiter]:
    """A worker's limiter for model ``m`` under ``limits``, in a namespace of its own."""
    settings = Settings(
        redis_url=redis_url, namespace=f"ml{time.time_ns()}", model_limits=f"m={limits}"
    )
    limiter = ModelLimiter(settings)
    try:
        yield limiter
    finally:
        await limiter.aclose()


class Call:
    """One call on model ``m`` in a task: it notes the first wait it is told of, puts its
    name in ``turns`` when it may start, and holds its place until ``end`` is set."""

    def __init__(self, limiter: ModelLimiter, name: str, turns: asyncio.Queue[str]) -> None:
        self.told: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self.end = asyncio.Event()
        self.task = asyncio.create_task(self._run(limiter, name, turns))

    async def _run(self, limiter: ModelLimiter, name: str, turns: asyncio.Queue[str]) -> None:
        async def on_wait(reason: str | None, until: float | None) -> None:
            if reason is not None and not self.told.done():
                self.told.set_result(until)

        async with limiter.hold("m", 10, on_wait):
            turns.put_nowait(name)
            await self.end.wait()

    async def cancel(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def waiting_calls(limiter: ModelLimiter, names: str, turns: asyncio.Queue[str]) -> list[Call]:
    """A call per letter of ``names``, each started once the one before was told to wait."""
    calls = []
    for name in names:
        calls.append(Call(limiter, name, turns))
        await asyncio.wait_for(asyncio.shield(calls[-1].told), 10)
    return calls


@pytest.mark.timeout(30)
async def test_cancelled_waits_do_not_idle_the_model(redis_server: RedisServer) -> None:
    """Bug: a cancelled wait gave its reserved start back only when it was the last one
    reserved, so after many waiting calls were cancelled (a mass DELETE) a new call still
    started behind all their starts (10 reserved at 60 rpm, 9 cancelled: 10 s idle). Now
    no call reserves further ahead than its reach: at 2 rpm (a start a minute), after 5
    waiting calls are cancelled, a new call starts within the minute, not in 5."""
    turns: asyncio.Queue[str] = asyncio.Queue()
    async with limiter_on(redis_server.url, "rpm:2") as limiter:
        async with limiter.hold("m", 10, None):  # the bucket's one request
            pass
        calls = await waiting_calls(limiter, "bcdef", turns)
        await asyncio.gather(*(c.cancel() for c in calls))
        (new,) = await waiting_calls(limiter, "g", turns)
        until = await new.told
        await new.cancel()
    assert until is not None and until < time.time() + 62, until - time.time()
    assert turns.empty()


@pytest.mark.timeout(30)
async def test_calls_waiting_for_a_start_out_of_reach_hold_no_slot(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Bug: a call took its concurrency slot before waiting for its start, however far
    off, so calls waiting on the request limit sat on the slots. Now only a call whose
    start is within reach (at 2 rpm, the next one) holds a slot while it waits."""
    turns: asyncio.Queue[str] = asyncio.Queue()
    async with limiter_on(redis_server.url, "rpm:2,concurrency:3") as limiter:
        holders = limiter.keys.model_holders("m")
        async with limiter.hold("m", 10, None):
            pass
        calls = await waiting_calls(limiter, "bcd", turns)
        holding = await redis.zcard(holders)
        await asyncio.gather(*(c.cancel() for c in calls))
        left = await redis.zcard(holders)
    assert (holding, left) == (1, 0)


@pytest.mark.timeout(30)
async def test_the_oldest_call_waiting_for_a_slot_gets_it_first(redis_server: RedisServer) -> None:
    """Bug: calls waiting for a concurrency slot each asked again at random moments, so a
    freed slot went to whichever asked first (a call could wait forever). Now the oldest
    waiting call is first in line: the slot goes to it, not to one of 5 newer calls."""
    turns: asyncio.Queue[str] = asyncio.Queue()
    async with limiter_on(redis_server.url, "concurrency:1") as limiter:
        holder = Call(limiter, "a", turns)
        assert await turns.get() == "a"
        calls = await waiting_calls(limiter, "bcdefg", turns)
        holder.end.set()
        after = await asyncio.wait_for(turns.get(), 10)
        await asyncio.gather(*(c.cancel() for c in calls), holder.task)
    assert after == "b"


@asynccontextmanager
async def answers_gate(port: int) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A TCP proxy to the Redis on ``port`` that passes its answers back only while the
    event is set: a command runs, and its answer is held back."""
    flowing = asyncio.Event()
    flowing.set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gated: bool) -> None:
        try:
            while data := await reader.read(65536):
                if gated:
                    await flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(
            pump(reader, upstream[1], False),
            pump(upstream[0], writer, True),
            return_exceptions=True,
        )

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", flowing
    finally:
        server.close()


@pytest.mark.timeout(30)
async def test_a_call_cancelled_while_its_grant_is_on_its_way_gives_the_slot_back(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Bug: a job cancelled while the acquire script was on its way kept the slot the
    script granted until ``lease_s`` expired (no one heard the answer). Now the call
    waits for the answer and gives the slot back: the script runs, its answer is held
    back, the call is cancelled, and once the answer arrives the slot is free."""
    turns: asyncio.Queue[str] = asyncio.Queue()
    async with answers_gate(redis_server.port) as (url, flowing):
        async with limiter_on(url, "concurrency:1") as limiter:
            holders = limiter.keys.model_holders("m")
            async with limiter.hold("m", 10, None):  # the script is loaded, a connection open
                pass
            flowing.clear()
            call = Call(limiter, "b", turns)
            while not await redis.zcard(holders):  # another process's state: nothing to await
                await asyncio.sleep(0.01)
            call.task.cancel()
            flowing.set()
            await asyncio.gather(call.task, return_exceptions=True)
            left = await redis.zcard(holders)
    assert left == 0 and turns.empty()


@pytest.mark.timeout(60)
async def test_a_wait_for_the_model_limit_leaves_the_retry_window_whole(
    redis_server: RedisServer,
) -> None:
    """Bug: PUSHSVC_LLM_RETRY_WINDOW_S counted the call's wait for its turn under the
    model's limit, so a call that waited longer than the window failed at its first 429.
    Now, with a 1 s window, a call that waits its turn (4 s at 2 requests per 4 s), gets a
    429, waits its turn again and completes."""
    heard: list[str | None] = []

    async def on_wait(reason: str | None, until: float | None) -> None:
        heard.append(reason)

    with model_server() as url:
        limits = {"model_limits": f"{MODEL}=rpm:2,window_s:4", "llm_retry_window_s": 1}
        llm = LLM(
            Settings(
                redis_url=redis_server.url,
                namespace=f"ml{time.time_ns()}",
                llm_model=MODEL,
                PUSHSVC_LLM_BASE_URL=f"{url}/v1",
                PUSHSVC_LLM_API_KEY="offline",
                **limits,
            )  # fmt: skip
        )
        try:
            await llm.complete([{"role": "user", "content": "[[tokens:3]] first"}])
            ask = "[[tokens:3]] second [[fault:429:after=0.2:times=1]]"
            done = await llm.complete([{"role": "user", "content": ask}], on_wait=on_wait)
        finally:
            await llm.aclose()
    assert done.text
    assert heard.count("model_limit") >= 2 and "rate_limited" in heard, heard
