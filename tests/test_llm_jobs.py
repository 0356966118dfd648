"""How each way a model call ends shows on a job, for ``generate``, ``generate_items`` and
``batch`` (truncated streams, in-stream errors, malformed chunks, finish_reason): real
fake-llm, worker, API and Redis processes.

A retryable outcome is checked where it is classified, on the ``status`` event of the
retry it caused; a job's final ``error`` is never retryable (no attempt remains).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from .conftest import Client, make_client, model_answer, stack_env
from .procs import Api, Proc, RedisServer
from .sse import Stream, read

RETRYABLE = [  # (fault, the code each failed try gets)
    ("truncate", "upstream_truncated"),
    ("stream_429:after=1", "rate_limited"),
    ("stream_500", "upstream_error"),
    ("stream_503", "upstream_error"),
    ("bad_chunk", "upstream_malformed"),
]
FATAL = [("stream_401", "upstream_auth_failed"), ("stream_400", "upstream_bad_request")]
FINISHES = [  # (directives, max_tokens, finish_reason, truncated)
    ("", 512, "stop", False),
    ("[[finish:length]]", 512, "length", True),
    ("[[finish:content_filter]]", 512, "content_filter", True),
    ("", 7, "length", True),  # cut by max_tokens
    ("[[no_usage]]", 512, "stop", False),
    ("[[finish:none]]", 512, None, False),  # no finish_reason, but [DONE]: whole
]


@pytest.fixture
def model(llm_stack: dict[str, str]) -> str:
    return llm_stack["model"]


async def run(llm: Client, type_: str, payload: dict[str, Any]) -> dict[str, Any]:
    job = await llm.submit(type_, payload)
    return await llm.wait(job["id"], timeout=40)


async def retries(llm: Client, job_id: str) -> list[dict[str, Any]]:
    """The errors of the attempts that were retried, from the job's ``status`` events."""
    log = await llm.log(job_id)
    return [
        d["error"] for k, d in log if k == "status" and d["status"] == "queued" and d.get("error")
    ]


def tag() -> str:
    return secrets.token_hex(4)  # each test's own prompts: fault budgets and answers apart


# -- generate ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("directives", "max_tokens", "finish", "truncated"), FINISHES)
async def test_generate_reports_how_the_answer_ended(
    llm: Client, model: str, directives: str, max_tokens: int, finish: str | None, truncated: bool
) -> None:
    """Bug: finish_reason was dropped, so an answer cut by ``length`` looked complete."""
    prompt = f"tides {tag()} [[tokens:12]] {directives}"
    done = await run(llm, "generate", {"prompt": prompt, "max_tokens": max_tokens})

    assert (done["status"], done["attempt"], done["error"]) == ("completed", 1, None)
    result = done["result"]
    assert result["text"] == done["output"]
    assert result["text"] == await model_answer(model, prompt, max_tokens=max_tokens)
    assert (result["finish_reason"], result["truncated"]) == (finish, truncated)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fault", "code"), RETRYABLE)
async def test_generate_retries_a_broken_stream_and_completes(
    llm: Client, model: str, fault: str, code: str
) -> None:
    """Bugs: a stream cut short completed with half the text; an error inside a 200 stream
    failed at once whatever it said; a malformed chunk ended as ``internal_error``."""
    prompt = f"retry {tag()} [[tokens:20]] [[fault:{fault}:times=1]]"
    done = await run(llm, "generate", {"prompt": prompt})

    assert (done["status"], done["attempt"], done["error"]) == ("completed", 2, None)
    assert done["result"]["text"] == done["output"] == await model_answer(model, prompt)
    assert (done["result"]["finish_reason"], done["result"]["truncated"]) == ("stop", False)
    [error] = await retries(llm, done["id"])
    assert (error["code"], error["retryable"]) == (code, True)
    if code == "rate_limited":  # the hint inside the stream is honoured
        retry = [d for k, d in await llm.log(done["id"]) if k == "status" and d.get("error")]
        assert retry[0]["retry_in_s"] >= 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fault", "code"), [("truncate", "upstream_truncated"), ("bad_chunk", "upstream_malformed")]
)
async def test_generate_fails_when_the_stream_stays_broken(
    llm: Client, fault: str, code: str
) -> None:
    done = await run(llm, "generate", {"prompt": f"broken {tag()} [[fault:{fault}]]"})

    assert (done["status"], done["attempt"], done["max_attempts"]) == ("failed", 3, 3)
    assert (done["error"]["code"], done["error"]["retryable"]) == (code, False)
    assert [(e["code"], e["retryable"]) for e in await retries(llm, done["id"])] == [
        (code, True)
    ] * 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fault", "code"), FATAL)
async def test_generate_fails_at_once_on_a_fatal_error_inside_the_stream(
    llm: Client, fault: str, code: str
) -> None:
    done = await run(llm, "generate", {"prompt": f"fatal {tag()} [[fault:{fault}]]"})

    assert (done["status"], done["attempt"]) == ("failed", 1)
    assert (done["error"]["code"], done["error"]["retryable"]) == (code, False)
    assert await retries(llm, done["id"]) == []


# -- generate_items ------------------------------------------------------------------------


def items_payload(theme: str, count: int = 3, **kw: Any) -> dict[str, Any]:
    return {"kind": "persona", "theme": theme, "count": count, "parallel": 3, **kw}


async def model_items(model: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    """The model's answers to the prompts ``generate_items`` sends (llm_jobs.generate_items)."""
    out = []
    for i in range(p["count"]):
        prompt = (
            f"Create {p['kind']} number {i + 1} of {p['count']} for this theme: {p['theme']}\n"
            "Answer with one JSON object.\nJSON keys: name, description"
        )
        text = await model_answer(model, prompt, response_format={"type": "json_object"})
        out.append(json.loads(text))
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fault", "code"), RETRYABLE)
async def test_items_retry_each_broken_answer(
    llm: Client, model: str, fault: str, code: str
) -> None:
    # Every item's first call breaks (each item's prompt has its own budget); its own
    # retries mend it, inside the one attempt.
    payload = items_payload(f"{tag()} [[fault:{fault}:times=1]]")
    done = await run(llm, "generate_items", payload)

    assert (done["status"], done["attempt"], done["error"]) == ("completed", 1, None)
    result = done["result"]
    assert (result["failed"], result["skipped"], result["errors"]) == (0, 0, [])
    assert result["items"] == await model_items(model, payload)
    assert result["answers"] == [
        {"index": i, "finish_reason": "stop", "truncated": False} for i in range(3)
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fault", "code", "retryable"),
    [
        ("truncate", "upstream_truncated", True),
        ("bad_chunk", "upstream_malformed", True),
        ("stream_401", "upstream_auth_failed", False),
        ("stream_400", "upstream_bad_request", False),
    ],
)
async def test_items_failures_within_the_tolerance_complete_the_job(
    llm: Client, fault: str, code: str, retryable: bool
) -> None:
    """Bug: one fatal or malformed answer failed the whole job (``result: null``)."""
    payload = items_payload(f"{tag()} [[fault:{fault}]]", failure_tolerance=1.0)
    done = await run(llm, "generate_items", payload)

    assert (done["status"], done["attempt"], done["error"]) == ("completed", 1, None)
    result = done["result"]
    assert (result["items"], result["answers"], result["failed"]) == ([], [], 3)
    assert [(e["index"], e["code"], e["retryable"]) for e in result["errors"]] == [
        (i, code, retryable) for i in range(3)
    ]


@pytest.mark.timeout(60)
async def test_items_past_the_tolerance_fail_with_what_failed(llm: Client) -> None:
    payload = items_payload(f"{tag()} [[fault:stream_401]]", count=4, failure_tolerance=0.25)
    done = await run(llm, "generate_items", payload)

    # Two failures decide it: the items still running then are stopped, not retried.
    assert (done["status"], done["attempt"]) == ("failed", 1)
    assert (done["error"]["code"], done["error"]["retryable"]) == ("too_many_failures", False)
    assert "upstream_auth_failed" in done["error"]["message"]
    result = done["result"]
    assert result["failed"] >= 2 and result["failed"] + result["skipped"] == 4
    assert {e["code"] for e in result["errors"]} == {"upstream_auth_failed"}


@pytest.mark.timeout(60)
async def test_items_report_how_each_answer_ended(llm: Client, model: str) -> None:
    payload = items_payload(f"{tag()} [[finish:length]]", count=2)
    done = await run(llm, "generate_items", payload)

    assert (done["status"], done["error"]) == ("completed", None)
    assert done["result"]["items"] == await model_items(model, payload)
    assert done["result"]["answers"] == [
        {"index": i, "finish_reason": "length", "truncated": True} for i in range(2)
    ]


# -- batch ---------------------------------------------------------------------------------


def batch_payload(inputs: list[str], **kw: Any) -> dict[str, Any]:
    return {"template": "Summarize: {input}", "inputs": inputs, "parallel": 5, **kw}


async def model_outputs(model: str, inputs: list[str]) -> list[str]:
    return [await model_answer(model, f"Summarize: {i}", max_tokens=256) for i in inputs]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fault", "code", "retryable"),
    [(f, c, True) for f, c in RETRYABLE] + [(f, c, False) for f, c in FATAL],
)
async def test_batch_counts_a_broken_item_against_the_tolerance(
    llm: Client, model: str, fault: str, code: str, retryable: bool
) -> None:
    """Bug: one in-stream error or malformed chunk failed the whole batch, within its
    tolerance; a cut-short item counted as succeeded with half its text."""
    good = [f"good {i} {tag()}" for i in range(4)]
    bad = f"bad {tag()} [[fault:{fault}]]"
    done = await run(llm, "batch", batch_payload([*good[:2], bad, *good[2:]]))

    assert (done["status"], done["attempt"], done["error"]) == ("completed", 1, None)
    result = done["result"]
    assert (result["failed"], result["skipped"]) == (1, 0)
    [error] = result["errors"]
    assert (error["index"], error["code"], error["retryable"]) == (2, code, retryable)
    texts = await model_outputs(model, good)
    assert result["outputs"] == [
        {"input": i, "output": t, "finish_reason": "stop", "truncated": False}
        for i, t in zip(good, texts, strict=True)
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fault", "code"), RETRYABLE)
async def test_batch_retries_a_broken_item(llm: Client, model: str, fault: str, code: str) -> None:
    inputs = [f"item {i} {tag()} [[fault:{fault}:times=1]]" for i in range(3)]
    done = await run(llm, "batch", batch_payload(inputs))

    assert (done["status"], done["attempt"], done["error"]) == ("completed", 1, None)
    result = done["result"]
    assert (result["failed"], result["errors"]) == (0, [])
    assert [o["output"] for o in result["outputs"]] == await model_outputs(model, inputs)
    assert {(o["finish_reason"], o["truncated"]) for o in result["outputs"]} == {("stop", False)}


@pytest.mark.timeout(60)
async def test_batch_past_the_tolerance_with_fatal_errors_fails_at_once(llm: Client) -> None:
    inputs = [f"ok {tag()}"] * 3 + [f"bad {i} {tag()} [[fault:stream_400]]" for i in range(2)]
    done = await run(llm, "batch", batch_payload(inputs, failure_tolerance=0.2))

    assert (done["status"], done["attempt"]) == ("failed", 1)
    assert (done["error"]["code"], done["error"]["retryable"]) == ("too_many_failures", False)
    assert [e["code"] for e in done["result"]["errors"]] == ["upstream_bad_request"] * 2


@pytest.mark.timeout(60)
async def test_batch_past_the_tolerance_with_retryable_errors_is_retried(llm: Client) -> None:
    inputs = [f"cut {i} {tag()} [[fault:truncate]]" for i in range(2)]
    done = await run(llm, "batch", batch_payload(inputs, failure_tolerance=0.0))

    assert (done["status"], done["attempt"], done["max_attempts"]) == ("failed", 2, 2)
    assert (done["error"]["code"], done["error"]["retryable"]) == ("too_many_failures", False)
    [error] = await retries(llm, done["id"])
    assert (error["code"], error["retryable"]) == ("too_many_failures", True)
    assert {e["code"] for e in done["result"]["errors"]} == {"upstream_truncated"}


@pytest.mark.timeout(60)
async def test_batch_reports_how_each_output_ended(llm: Client, model: str) -> None:
    inputs = [
        f"whole {tag()} [[tokens:5]]",
        f"filtered {tag()} [[tokens:5]] [[finish:content_filter]]",
        f"long {tag()} [[tokens:40]]",  # cut by max_tokens
    ]
    done = await run(llm, "batch", batch_payload(inputs, max_tokens=10))

    assert (done["status"], done["error"]) == ("completed", None)
    outputs = done["result"]["outputs"]
    assert [o["output"] for o in outputs] == [
        await model_answer(model, f"Summarize: {i}", max_tokens=10) for i in inputs
    ]
    assert [(o["finish_reason"], o["truncated"]) for o in outputs] == [
        ("stop", False),
        ("content_filter", True),
        ("length", True),
    ]


# -- live model telemetry and rate-limit waits ---------------------------------------------

PRICE_IN, PRICE_OUT = 1000.0, 2000.0  # USD per million tokens: cents for a few tokens


def cost_of(llm: dict[str, Any]) -> float:
    return (llm["prompt_tokens"] * PRICE_IN + llm["completion_tokens"] * PRICE_OUT) / 1e6


@pytest.fixture(scope="module")
def priced_stack(redis_server: RedisServer, model_url: str) -> Iterator[dict[str, str]]:
    """A worker and an API on the offline model with a price for ``fake-1`` and a retry
    window (so a 429 is waited out inside the attempt, as in production)."""
    env = stack_env(
        redis_server.url,
        f"llmt{secrets.token_hex(3)}",
        llm_base_url=model_url,
        llm_api_key="offline",
        llm_model="fake-1",
        llm_prices=f"fake-1={PRICE_IN:g}/{PRICE_OUT:g}",
        llm_retry_window_s="20",
    )
    worker = Proc(["worker"], env).start()
    api = Api([], env).start()
    yield {"api": api.url, "ns": env["PUSHSVC_NAMESPACE"]}
    api.stop()
    worker.stop()


@pytest.fixture
async def priced(priced_stack: dict[str, str], redis: Redis) -> AsyncIterator[Client]:
    c = make_client(priced_stack["api"], "key-a", redis, priced_stack["ns"])
    yield c
    await c.http.aclose()


def llm_of(stream: Stream) -> list[dict[str, Any]]:
    """The ``llm`` of every progress event that had one, in order."""
    return [e.data["llm"] for e in stream.events if e.kind == "progress" and e.data["llm"]]


async def test_generate_shows_live_telemetry_and_a_final_cost(priced: Client) -> None:
    prompt = f"meter {tag()} [[tokens:60]] [[rate:150]]"
    job = await priced.submit("generate", {"prompt": prompt, "expected_tokens": 60})
    stream = await read(priced.http, f"/v1/jobs/{job['id']}/events")
    done = await priced.get(job["id"])
    assert done["status"] == "completed"
    live = llm_of(stream)
    # Counted from characters while the text streams (rising), then the server's usage.
    tokens = [t["completion_tokens"] for t in live if t["estimated"]]
    assert tokens == sorted(tokens) and len(set(tokens)) > 3
    assert live[0]["estimated"] and live[0]["model"] == "fake-1"
    final = done["result"]["llm"]
    assert done["llm"] == live[-1] == final  # the snapshot and the last event agree
    usage = done["result"]["usage"]
    assert (final["prompt_tokens"], final["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert final["completion_tokens"] == 60 and final["estimated"] is False
    assert final["ttft_s"] > 0 and final["tokens_per_s"] > 0
    assert final["cost_usd"] == pytest.approx(cost_of(final))


async def test_a_provider_429_shows_rate_limited_until_its_retry_then_clears(
    priced: Client,
) -> None:
    prompt = f"limited {tag()} [[tokens:20]] [[fault:429:after=2:times=1]]"
    job = await priced.submit("generate", {"prompt": prompt})
    stream = await read(priced.http, f"/v1/jobs/{job['id']}/events")
    kinds = [(e.kind, e.data.get("waiting")) for e in stream.events]
    said = next(i for i, (k, w) in enumerate(kinds) if k == "progress" and w)
    waiting, at = stream.events[said].data["waiting"], stream.events[said].data["ts"]
    assert waiting["reason"] == "rate_limited"
    assert 1.5 < waiting["until"] - at <= 8  # Retry-After (2 s) ahead, within the backoff cap
    cleared = next(i for i, (k, w) in enumerate(kinds[said:], said) if k == "progress" and not w)
    first_text = next(i for i, (k, _) in enumerate(kinds) if k == "output")
    assert said < cleared < first_text  # no text while waiting; cleared before it flows
    done = await priced.get(job["id"])
    assert done["status"] == "completed" and done["attempt"] == 1 and done["waiting"] is None


@pytest.mark.parametrize("type_", ["batch", "generate_items"])
async def test_many_calls_report_their_totals(priced: Client, type_: str) -> None:
    payload = (
        batch_payload([f"t{i} {tag()}" for i in range(3)], template="{input} [[tokens:10]]")
        if type_ == "batch"
        else items_payload(f"totals {tag()}")
    )
    job = await priced.submit(type_, payload)
    stream = await read(priced.http, f"/v1/jobs/{job['id']}/events")
    done = await priced.get(job["id"])
    assert done["status"] == "completed"
    final = done["result"]["llm"]
    assert done["llm"] == final and final["model"] == "fake-1"
    if type_ == "batch":
        assert final["completion_tokens"] == 30  # 3 answers of 10 tokens
    assert final["prompt_tokens"] > 0 and final["estimated"] is False
    assert final["ttft_s"] > 0 and final["tokens_per_s"] > 0
    assert final["cost_usd"] == pytest.approx(cost_of(final))
    # Live totals while the answers stream (estimates for the calls still running), then
    # the final totals.
    live = llm_of(stream)
    assert len({t["completion_tokens"] for t in live}) > 3 and live[-1] == final
