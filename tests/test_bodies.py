"""Bad input is a 4xx JSON error, never a 500, and answers stay small: deep
nesting, numbers in other scripts, echoed values, the trailing newline, and what DELETE
says of a running job."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from pushsvc.errors import ECHO_MAX, clip
from pushsvc.responses import LARGE_TEXT, JSONParts, json_response

from .conftest import error_of, stack_env
from .procs import Api, Proc, RedisServer

KEY = {"Authorization": "Bearer key-a"}
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def lone_api(redis_server: RedisServer) -> Iterator[Api]:
    """An API of its own namespace and no worker: what is submitted stays queued."""
    api = Api([], stack_env(redis_server.url, f"b{secrets.token_hex(3)}")).start()
    yield api
    api.stop()


@pytest.fixture
async def http(lone_api: Api) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=lone_api.url, headers=KEY, timeout=20) as client:
        yield client


async def _post(http: httpx.AsyncClient, body: bytes | str) -> httpx.Response:
    return await http.post("/v1/jobs", content=body, headers=JSON_TYPE)


def _nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "body",
    [
        _nested(5000),
        '{"a":' * 5000 + "1" + "}" * 5000,
        '{"type": "ticker", "payload": {"steps": 1}, "x": ' + _nested(3000) + "}",
        '{"type": "ticker", "payload": {"steps": ' + _nested(65) + "}}",
    ],
    ids=["array-5000", "object-5000", "field-3000", "payload-65"],
)
async def test_a_body_nested_too_deep_is_a_400(http: httpx.AsyncClient, body: str) -> None:
    """Bug: a body nested past ~1,000 levels raised RecursionError in read_json: a 500."""
    assert error_of(await _post(http, body), 400)["code"] == "json_too_deep"


@pytest.mark.timeout(30)
async def test_nesting_up_to_the_limit_is_validated_as_usual(http: httpx.AsyncClient) -> None:
    body = '{"type": "ticker", "payload": {"steps": ' + _nested(62) + "}}"  # 64 in all
    assert error_of(await _post(http, body), 422)["code"] == "validation_error"
    many = {"type": "batch", "payload": {"template": "{input}", "inputs": [[]] * 70}}
    assert error_of(await _post(http, json.dumps(many)), 422)["code"] == "validation_error"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_not_json(http: httpx.AsyncClient, constant: str) -> None:
    body = '{"type": "generate", "payload": {"prompt": "hi", "temperature": ' + constant + "}}"
    assert error_of(await _post(http, body), 400)["code"] == "invalid_json"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("limit", ["３", "٣", "²", " 5", "5 ", "+5", "5.0", "1_0", "0x10"])
async def test_limit_takes_ascii_digits_only(http: httpx.AsyncClient, limit: str) -> None:
    """Was: pydantic's lax int took " 5", "+5", "5.0" and "1_0" as numbers."""
    resp = await http.get("/v1/jobs", params={"limit": limit})
    assert error_of(resp, 422)["code"] == "validation_error"
    assert (await http.get("/v1/jobs", params={"limit": "5"})).status_code == 200


@pytest.mark.timeout(30)
async def test_numbers_in_other_scripts_are_refused_everywhere(http: httpx.AsyncClient) -> None:
    job = (await _post(http, json.dumps({"type": "ticker", "payload": {"steps": 1}}))).json()
    events = f"/v1/jobs/{job['id']}/events"
    for value in ("３", "３.abc", "1.ａ"):
        resp = await http.get(events, params={"last_event_id": value})
        assert error_of(resp, 400)["code"] == "bad_event_id", value
        resp = await http.get(events, headers={"Last-Event-ID": value.encode()})
        assert error_of(resp, 400)["code"] == "bad_event_id", value
    cursor = base64.urlsafe_b64encode('[１２, "x"]'.encode()).decode()
    for bad in (cursor, "３", "ＷzEsIngiXQ"):
        resp = await http.get("/v1/jobs", params={"cursor": bad})
        assert error_of(resp, 400)["code"] == "bad_cursor", bad
    # uuid.UUID takes fullwidth hex digits, braces, "urn:uuid:" and capitals: none is an id
    # this API issued, so none finds (or, in a recovering store, waits for) a job.
    wide = job["id"].translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789"})
    for other in (wide, "{" + job["id"] + "}", f"urn:uuid:{job['id']}", job["id"].upper()):
        for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/retry")):
            resp = await http.request(method, f"/v1/jobs/{other}{path}")
            assert error_of(resp, 404)["code"] == "job_not_found", (other, method)
    assert (await http.get(f"/v1/jobs/{job['id']}")).status_code == 200


def test_clip_keeps_head_tail_and_the_length() -> None:
    assert clip("x" * ECHO_MAX) == "x" * ECHO_MAX
    clipped = clip("a" * 199_990 + "' is too long")
    assert len(clipped) == ECHO_MAX
    assert "[200003 characters]" in clipped and clipped.endswith("' is too long")


@pytest.mark.timeout(30)
async def test_error_bodies_echo_at_most_a_few_hundred_characters(
    http: httpx.AsyncClient,
) -> None:
    """Bug: a 200,000-character prompt came back whole in its 422 (jsonschema's message
    quotes the value), and so did a 10,000-character job id in its 404."""
    prompt = "p" * 200_000
    resp = await _post(http, json.dumps({"type": "generate", "payload": {"prompt": prompt}}))
    error = error_of(resp, 422)
    assert len(resp.content) < 2 * ECHO_MAX + 500, len(resp.content)
    (detail,) = error["details"]
    assert detail["loc"] == ["payload", "prompt"] and len(detail["msg"]) <= ECHO_MAX
    assert "[200002 characters]" in detail["msg"] and detail["msg"].endswith("is too long")

    field = "f" * 100_000  # an unknown field: its name comes back in loc and msg
    resp = await _post(http, json.dumps({"type": "ticker", "payload": {field: 1}}))
    error_of(resp, 422)
    assert len(resp.content) < 4 * ECHO_MAX + 500, len(resp.content)

    long_id = "9" * 10_000
    resp = await http.get(f"/v1/jobs/{long_id}")
    assert len(error_of(resp, 404)["message"]) <= ECHO_MAX
    assert f"[{len(repr(long_id)) + len('no job ')} characters]" in resp.json()["error"]["message"]


@pytest.mark.timeout(30)
async def test_an_error_lists_at_most_fifty_problems(http: httpx.AsyncClient) -> None:
    """Was: 50,000 wrong items were 50,000 entries, each quoting its item (megabytes)."""
    body = {"type": "batch", "payload": {"template": "{input}", "inputs": [1] * 50_000}}
    resp = await _post(http, json.dumps(body))
    assert len(error_of(resp, 422)["details"]) <= 50
    assert len(resp.content) < 20_000


@pytest.mark.timeout(30)
async def test_every_json_body_ends_with_a_newline(http: httpx.AsyncClient) -> None:
    """Bug: JSON bodies ended at the closing brace; curl's output ran into the prompt."""
    submitted = await _post(http, json.dumps({"type": "ticker", "payload": {"steps": 1}}))
    job_id = submitted.json()["id"]
    answers = [
        submitted,
        await http.get(f"/v1/jobs/{job_id}"),
        await http.get("/v1/jobs"),
        await http.get("/v1/job-types"),
        await http.get("/v1/stats"),
        await http.post("/v1/stream-tokens"),
        await http.get("/openapi.json"),
        await http.get("/healthz"),
        await http.get("/readyz"),
        await http.delete(f"/v1/jobs/{job_id}"),
        await http.post(f"/v1/jobs/{job_id}/retry"),
        await http.get(f"/v1/jobs/{uuid.uuid4()}"),  # 404
        await http.get("/v2/nothing"),  # Starlette's 404
        await http.put("/v1/jobs"),  # 405
        await _post(http, b"{"),  # 400
        await http.get("/v1/jobs", headers={"Authorization": "Bearer nope"}),  # 401
    ]
    for resp in answers:
        assert resp.headers["content-type"] == "application/json", resp.url
        assert resp.content.endswith(b"}\n"), (resp.url, resp.status_code, resp.content[-20:])
        assert int(resp.headers["content-length"]) == len(resp.content)
        json.loads(resp.content)


async def test_large_json_bodies_end_with_a_newline_too() -> None:
    content = {"output": "x" * (LARGE_TEXT + 1), "n": 1}
    resp = await json_response(content)
    assert isinstance(resp, JSONParts)
    body = b"".join(resp.parts)
    assert body.endswith(b"}\n") and json.loads(body) == content
    assert resp.headers["content-length"] == str(len(body))


@pytest.mark.timeout(60)
async def test_cancelling_a_running_job_says_cancel_requested(
    lone_api: Api, http: httpx.AsyncClient
) -> None:
    """Bug: DELETE of a running job answered 202 with ``"status": "running"`` alone, as if
    nothing had happened; it says ``cancel_requested`` now, the second time too."""
    worker = Proc(["worker"], lone_api.env).start()
    try:
        body = {"type": "ticker", "payload": {"steps": 1000, "interval_ms": 20}}
        job = (await _post(http, json.dumps(body))).json()
        await _until_running(http, job["id"])
        # Paused, the worker cannot act on the cancel: the job stays running meanwhile.
        worker.signal(signal.SIGSTOP)
        try:
            for _ in range(2):
                resp = await http.delete(f"/v1/jobs/{job['id']}")
                assert resp.status_code == 202, resp.text
                answer = resp.json()
                assert answer["status"] == "running" and answer["cancel_requested"] is True
        finally:
            worker.signal(signal.SIGCONT)
        await _until(http, job["id"], lambda j: j["status"] == "cancelled")
    finally:
        worker.stop()


async def _until_running(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    return await _until(http, job_id, lambda j: j["status"] == "running" and j["progress"] > 0)


async def _until(
    http: httpx.AsyncClient, job_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Follow the job's stream until ``done(job)`` holds (the stream's snapshot and events
    applied, as the Python client does)."""
    from pushsvc.job_view import apply_event

    from .sse import events

    job: dict[str, Any] = {}
    async with asyncio.timeout(30):
        async for event in events(http, f"/v1/jobs/{job_id}/events"):
            job = apply_event(job, event.kind, event.data)
            if done(job):
                return job
    raise AssertionError(f"the stream ended first: {job}")
