"""LLM jobs over the official openai client, against the offline model over real HTTP."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx2
import openai
import pytest

from pushsvc.errors import JobError
from pushsvc.llm import LLM, classify
from pushsvc.models import LLMTelemetry
from pushsvc.settings import Settings

from .conftest import Client, model_answer
from .sse import read


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
    assert (done["result"]["finish_reason"], done["result"]["truncated"]) == ("stop", False)
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
    assert done["result"]["answers"] == [
        {"index": i, "finish_reason": "stop", "truncated": False} for i in range(5)
    ]
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
    assert all((o["finish_reason"], o["truncated"]) == ("stop", False) for o in result["outputs"])
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


# -- the model-call layer itself (pushsvc.llm), against the fake-llm process ------------


@pytest.fixture
async def model(model_url: str) -> AsyncIterator[LLM]:
    client = LLM(Settings(PUSHSVC_LLM_BASE_URL=model_url, llm_model="fake-1"))
    yield client
    await client.aclose()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("directives", "finish", "truncated"),
    [
        ("", "stop", False),
        ("[[finish:length]]", "length", True),
        ("[[finish:content_filter]]", "content_filter", True),
        ("[[no_usage]]", "stop", False),
        # No finish_reason, but the server said [DONE]: a whole answer from a lax server.
        ("[[finish:none]]", None, False),
    ],
)
async def test_complete_gives_the_whole_answer_and_how_it_ended(
    model: LLM, model_url: str, directives: str, finish: str | None, truncated: bool
) -> None:
    prompt = f"how did it end {secrets.token_hex(4)} [[tokens:12]] {directives}"
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    done = await model.complete([{"role": "user", "content": prompt}], on_delta=on_delta)
    assert done.text == "".join(deltas) == await model_answer(model_url, prompt)
    assert (done.finish_reason, done.truncated) == (finish, truncated)
    assert done.model == "fake-1"
    if "no_usage" not in directives:
        assert done.usage.completion_tokens == 12 and not done.usage.estimated
    else:  # counted from the characters (about 4 a token), never the chunks, and marked
        assert done.usage.estimated
        assert done.usage.completion_tokens == -(-len(done.text) // 4) != 12
        assert done.usage.prompt_tokens == -(-len(prompt) // 4)


@pytest.mark.timeout(30)
async def test_complete_cut_by_max_tokens_is_truncated(model: LLM, model_url: str) -> None:
    prompt = f"long {secrets.token_hex(4)} [[tokens:30]]"
    done = await model.complete([{"role": "user", "content": prompt}], max_tokens=7)
    assert done.text == await model_answer(model_url, prompt, max_tokens=7)
    assert (done.finish_reason, done.truncated) == ("length", True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("fault", "code", "retryable", "hint"),
    [
        ("truncate", "upstream_truncated", True, None),
        ("truncate:at=100", "upstream_truncated", True, None),  # all the text, never finished
        ("bad_chunk", "upstream_malformed", True, None),
        ("stream_429:after=2", "rate_limited", True, 2.0),
        ("stream_500", "upstream_error", True, None),
        ("stream_503", "upstream_error", True, None),
        ("stream_401", "upstream_auth_failed", False, None),
        ("stream_400", "upstream_bad_request", False, None),
        ("429:after=3", "rate_limited", True, 3.0),
        ("drop", "upstream_unreachable", True, None),
    ],
)
async def test_complete_classifies_what_the_wire_did(
    model: LLM, fault: str, code: str, retryable: bool, hint: float | None
) -> None:
    """Bugs: a stream cut short was a whole answer, an error inside a 200 stream was always
    fatal ``upstream_error``, a malformed chunk was an ``internal_error``."""
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    prompt = f"broken {secrets.token_hex(4)} [[tokens:8]] [[fault:{fault}]]"
    with pytest.raises(JobError) as caught:
        await model.complete([{"role": "user", "content": prompt}], on_delta=on_delta)
    error = caught.value
    assert (error.code, error.retryable, error.retry_after_s) == (code, retryable, hint)
    if fault.startswith(("truncate", "bad_chunk", "stream_")):
        assert deltas  # the text before the fault was streamed, then the call failed


def _in_stream(body: dict[str, Any]) -> openai.APIError:
    request = httpx2.Request("POST", "http://model/v1/chat/completions")
    return openai.APIError(str(body.get("message", "")), request, body=body)


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("body", "code", "retryable", "hint"),
    [
        # OpenAI's own wording
        (
            {
                "type": "rate_limit_error",
                "code": "rate_limit_exceeded",
                "message": "Rate limit reached. Please try again in 1.5s.",
            },
            "rate_limited",
            True,
            1.5,
        ),
        ({"type": "server_error", "code": None}, "upstream_error", True, None),
        (
            {"type": "invalid_request_error", "code": "invalid_api_key"},
            "upstream_auth_failed",
            False,
            None,
        ),
        (
            {"type": "invalid_request_error", "code": "context_length_exceeded"},
            "upstream_bad_request",
            False,
            None,
        ),
        ({"type": "insufficient_quota"}, "rate_limited", True, None),
        # vLLM: the status as an int code; LiteLLM: as a string, with its exception names
        (
            {"object": "error", "type": "BadRequestError", "code": 400},
            "upstream_bad_request",
            False,
            None,
        ),
        (
            {"type": "None", "code": "429", "message": "try again in 200ms"},
            "rate_limited",
            True,
            0.2,
        ),
        ({"type": "AuthenticationError"}, "upstream_auth_failed", False, None),
        ({"type": "permission_error"}, "upstream_permission_denied", False, None),
        ({"type": "not_found_error"}, "model_not_found", False, None),
        ({"type": "overloaded_error"}, "upstream_error", True, None),
        ({"status": 503, "message": "down"}, "upstream_error", True, None),
        # Nothing to go by: the request was accepted, so the failure is the server's.
        ({"message": "boom"}, "upstream_error", True, None),
    ],
)
def test_errors_inside_a_stream_map_like_their_http_status(
    body: dict[str, Any], code: str, retryable: bool, hint: float | None
) -> None:
    error = classify(_in_stream(body))
    assert (error.code, error.retryable, error.retry_after_s) == (code, retryable, hint)


@pytest.mark.timeout(5)
def test_http_retry_hints() -> None:
    request = httpx2.Request("POST", "http://model/v1/chat/completions")

    def limited(headers: dict[str, str]) -> float | None:
        response = httpx2.Response(429, headers=headers, request=request)
        return classify(
            openai.RateLimitError("slow down", response=response, body=None)
        ).retry_after_s

    assert limited({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert limited({"retry-after": "2"}) == 2.0
    assert limited({"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"}) is None


# -- telemetry and waits (pushsvc/telemetry.py) ---------------------------------------------

PRICES = {"fake-1": (1000.0, 2000.0)}  # USD per million tokens: a few tokens cost cents


def priced_llm(model_url: str, **settings: Any) -> tuple[LLM, list[dict[str, Any]]]:
    """An LLM on the offline model with a price for ``fake-1``, and the calls it observed."""
    observed: list[dict[str, Any]] = []
    s = Settings(PUSHSVC_LLM_BASE_URL=model_url, llm_model="fake-1", llm_prices=PRICES)
    return LLM(s.model_copy(update=settings), observed.append), observed


@pytest.mark.timeout(30)
@pytest.mark.parametrize("usage", [True, False])
async def test_complete_reports_telemetry_while_the_text_streams(
    model_url: str, usage: bool
) -> None:
    llm, observed = priced_llm(model_url)
    views: list[dict[str, Any]] = []

    async def on_telemetry(view: dict[str, Any]) -> None:
        views.append(view)

    prompt = f"meter me {secrets.token_hex(4)} [[tokens:40]] [[rate:80]]"
    prompt += "" if usage else " [[no_usage]]"
    try:
        done = await llm.complete([{"role": "user", "content": prompt}], on_telemetry=on_telemetry)
    finally:
        await llm.aclose()
    final = done.telemetry
    assert views[-1] == final and observed == [final]
    assert LLMTelemetry.model_validate(final).model == "fake-1"
    streaming = views[:-1]
    counts = [v["completion_tokens"] for v in streaming]
    assert counts == sorted(counts) and counts[0] < counts[-1]  # rising as text arrives
    assert all(v["estimated"] for v in streaming)  # counted from characters meanwhile
    assert any(v["tokens_per_s"] for v in streaming) and final["tokens_per_s"] > 0
    assert final["ttft_s"] > 0
    assert (final["prompt_tokens"], final["completion_tokens"]) == (
        done.usage.prompt_tokens,
        done.usage.completion_tokens,
    )
    assert final["estimated"] is (not usage)
    if usage:
        assert final["completion_tokens"] == 40
    cost = (final["prompt_tokens"] * 1000 + final["completion_tokens"] * 2000) / 1e6
    assert final["cost_usd"] == pytest.approx(cost)


@pytest.mark.timeout(30)
async def test_a_model_without_a_price_has_no_cost(model_url: str) -> None:
    llm, observed = priced_llm(model_url)
    try:
        done = await llm.complete(
            [{"role": "user", "content": "free [[tokens:5]]"}], model="unpriced-model"
        )
    finally:
        await llm.aclose()
    assert done.telemetry["model"] == "unpriced-model" and done.telemetry["cost_usd"] is None
    assert observed == [done.telemetry]


@pytest.mark.timeout(30)
async def test_a_429_wait_says_rate_limited_until_the_retry_then_clears(model_url: str) -> None:
    llm, _ = priced_llm(model_url, llm_retry_window_s=20)
    told: list[tuple[str, Any]] = []

    async def on_wait(reason: str | None, until: float | None) -> None:
        told.append(("wait", (reason, until)))

    async def on_delta(text: str) -> None:
        told.append(("delta", text))

    prompt = f"limited {secrets.token_hex(4)} [[tokens:5]] [[fault:429:after=2:times=1]]"
    asked = time.time()
    try:
        done = await llm.complete(
            [{"role": "user", "content": prompt}], on_wait=on_wait, on_delta=on_delta
        )
    finally:
        await llm.aclose()
    assert done.text
    (kind, (reason, until)), cleared, first = told[:3]
    assert (kind, reason) == ("wait", "rate_limited")
    assert asked + 2 <= until <= time.time()  # Retry-After's floor, and it did wait until then
    assert cleared == ("wait", (None, None)) and first[0] == "delta"  # cleared as text flows
    assert [t for t in told if t[0] == "wait"] == told[:2]


@pytest.mark.timeout(30)
async def test_a_server_error_wait_claims_no_rate_limit(model_url: str) -> None:
    llm, _ = priced_llm(model_url, llm_retry_window_s=20)
    told: list[Any] = []

    async def on_wait(reason: str | None, until: float | None) -> None:
        told.append((reason, until))

    prompt = f"flaky {secrets.token_hex(4)} [[tokens:5]] [[fault:503:times=1]]"
    try:
        done = await llm.complete([{"role": "user", "content": prompt}], on_wait=on_wait)
    finally:
        await llm.aclose()
    assert done.text and told == []
