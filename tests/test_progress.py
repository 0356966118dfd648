"""Honest progress: a streamed answer's progress and ETA from its expected length (the
model's recent answers) and the rate its text arrives at; checked on the gauge, then on
``generate`` jobs against the offline model paced like a real one."""

from __future__ import annotations

import secrets

import pytest
from redis.asyncio import Redis

from pushsvc.keys import Keys
from pushsvc.progress import FIRST_GUESS_TOKENS, HISTORY, AnswerLengths, Gauge

from .conftest import Client, make_client, stack_env
from .procs import Api, Proc, RedisServer, free_port
from .sse import read


@pytest.mark.timeout(20)
async def test_expected_length_is_the_hint_else_recent_answers_else_a_typical_one(
    redis: Redis,
) -> None:
    lengths = AnswerLengths(redis, Keys(f"al{secrets.token_hex(3)}"))
    assert await lengths.expected("t", "m", None, 512) == FIRST_GUESS_TOKENS * 4  # not max
    assert await lengths.expected("t", "m", None, 10) == 40  # never past max_tokens
    for chars in (100, 300, 200):
        await lengths.record("t", "m", chars)
    assert await lengths.expected("t", "m", None, 512) == 200  # the median
    assert await lengths.expected("t", "other", None, 512) == FIRST_GUESS_TOKENS * 4
    assert await lengths.expected("t2", "m", None, 512) == FIRST_GUESS_TOKENS * 4  # per type
    assert await lengths.expected("t", "m", 30, 512) == 120  # the caller's hint wins
    for _ in range(HISTORY):  # only the recent ones count
        await lengths.record("t", "m", 1000)
    assert await lengths.expected("t", "m", None, 512) == 1000
    # Another worker process (its own object) starts from what this one saw.
    assert await AnswerLengths(redis, lengths._keys).expected("t", "m", None, 512) == 1000


@pytest.mark.timeout(20)
async def test_without_redis_the_process_remembers_its_own_answers() -> None:
    gone = Redis(port=free_port(), socket_connect_timeout=1)
    lengths = AnswerLengths(gone, Keys("al"))
    await lengths.record("t", "m", 300)  # logged, not raised
    assert await lengths.expected("t", "m", None, 512) == 300
    await gone.aclose()


def test_a_steady_stream_rises_smoothly_and_its_eta_is_the_time_left() -> None:
    gauge = Gauge(1000)
    seen = [gauge.add(10, t / 10) for t in range(100)]  # 100 chars/s for 10 s
    pcts = [pct for pct, _ in seen]
    assert pcts == sorted(pcts) and pcts[49] == pytest.approx(50) and max(pcts) <= 99
    assert seen[0][1] is None  # no rate from one chunk
    _, eta = seen[29]  # 3 s in, 7 s left
    assert eta == pytest.approx(7.0, rel=0.05)


def test_an_answer_longer_than_expected_nears_the_end_without_reaching_it() -> None:
    gauge = Gauge(100)
    pct, eta = 0.0, None
    for t in range(50):
        pct, eta = gauge.add(10, t / 10)
    assert 90 < pct <= 99 and eta is not None and eta < 1


@pytest.mark.timeout(60)
async def test_a_second_answer_of_a_model_gets_smooth_progress_and_a_true_eta(
    llm: Client,
) -> None:
    """Was: progress was chunks / max_tokens (512): the first job showed 1 % and "about
    1 min left", then jumped to 100 % after 1.4 s. Now the worker expects the length of
    the model's recent answers and measures the rate: 60 tokens at 20 a second."""
    prompt = f"{secrets.token_hex(4)} a paced answer [[tokens:60]] [[rate:20]]"
    first = await llm.submit("generate", {"prompt": prompt})
    await read(llm.http, f"/v1/jobs/{first['id']}/events", timeout=30)
    await assert_smooth_with_a_true_eta(llm, prompt)


@pytest.mark.timeout(90)
async def test_a_fresh_worker_starts_from_the_answers_other_workers_saw(
    redis_server: RedisServer, redis: Redis, llm_stack: dict[str, str]
) -> None:
    """Was: the lengths were kept per worker process, so a new worker's first answer
    was a guess (20 %, then 100 %). They are in Redis: the first job runs on one worker,
    which stops; the second runs on a worker that never saw an answer."""
    ns = f"fw{secrets.token_hex(3)}"
    env = stack_env(
        redis_server.url,
        ns,
        llm_base_url=llm_stack["model"],
        llm_api_key="offline",
        llm_model="fake-1",
    )
    api = Api([], env).start()
    client = make_client(api.url, "key-a", redis, ns)
    prompt = f"{secrets.token_hex(4)} a paced answer [[tokens:60]] [[rate:20]]"
    try:
        worker = Proc(["worker"], env).start()
        first = await client.submit("generate", {"prompt": prompt})
        assert (await client.wait(first["id"], timeout=30))["status"] == "completed"
        worker.stop()
        worker = Proc(["worker"], env).start()
        await assert_smooth_with_a_true_eta(client, prompt)
        worker.stop()
    finally:
        await client.http.aclose()
        api.stop()


async def assert_smooth_with_a_true_eta(client: Client, prompt: str) -> None:
    """A ``generate`` of ``prompt`` rises steadily to near 100 % and, midway, says how
    long is left within 30 %."""
    job = await client.submit("generate", {"prompt": prompt})
    stream = await read(client.http, f"/v1/jobs/{job['id']}/events", timeout=30)
    done = await client.get(job["id"])
    assert done["status"] == "completed"
    ended = stream.events[-1].data["ts"]
    ticks = [e.data for e in stream.events if e.kind == "progress"]
    pcts = [t["progress"] for t in ticks if t["stage"] == "generating"]
    assert pcts == sorted(pcts) and max(pcts) >= 90, pcts  # smooth, to near the end
    mid = [t for t in ticks if t["stage"] == "generating" and 30 <= t["progress"] <= 70]
    assert mid, pcts
    for tick in mid:  # the time it said was left, against the time that was
        left = ended - tick["ts"]
        assert tick["eta_s"] == pytest.approx(left, rel=0.3, abs=0.3), (tick, left)
