"""Property-based fuzzing of every endpoint's input: whatever a client sends,
the answer is never a 5xx, and every 4xx is the contract's JSON error.

Beside test_openapi.py's schemathesis run, which draws from the document (mostly valid
requests): this draws what no document describes (bodies nested thousands deep, lone
surrogates, strings past the body limit, wrong types, unknown fields, any text in any
query parameter or header) against a real API over HTTP. The API has no worker, so
what it accepts stays queued; streams are opened, their status and first bytes read,
and closed.

Sizing: 250 examples per endpoint group, about 1,500 requests, 15 s here and under a
minute on a busy 2-core machine. CI (``CI`` set) runs the same examples each time
(``derandomize``); elsewhere each run draws new ones. No example database either way: a
failure prints the request (the assertion's message) and a ``@reproduce_failure`` blob
(schemathesis' pytest plugin blanks hypothesis' own listing of the example; run this
file with ``-p no:schemathesis`` to see it), and a regression test then keeps it.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ..conftest import stack_env
from ..procs import Api, RedisServer

KEY = "key-a"
TYPES = ["ticker", "generate", "generate_items", "batch", "sleepy", "chatty"]
FIELDS = ["steps", "interval_ms", "prompt", "inputs", "template", "kind", "theme", "fields"]

FUZZ = settings(
    max_examples=250,
    print_blob=True,
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[Api]:
    """An API of its own namespace and no worker (nothing accepted ever runs)."""
    api = Api([], stack_env(redis_server.url, f"z{secrets.token_hex(3)}")).start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def http(api: Api) -> Iterator[httpx.Client]:
    timeout = httpx.Timeout(20, read=2)
    with httpx.Client(base_url=api.url, headers=_auth(KEY), timeout=timeout) as client:
        yield client


@pytest.fixture(scope="module")
def job_id(http: httpx.Client) -> str:
    """A real (queued) job of the fuzzing tenant, for ids drawn beside arbitrary ones."""
    body = {"type": "ticker", "payload": {"steps": 1}}
    resp = http.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def check(resp: httpx.Response) -> None:
    """Never a 5xx; a 4xx is ``{"error": {code, message, details}}``; JSON ends in \\n."""
    sent = resp.request
    what = (sent.method, str(sent.url)[:300], sent.content[:300], resp.status_code, resp.text[:500])
    assert resp.status_code < 500, what
    event(f"{resp.status_code}")  # --hypothesis-show-statistics: how far examples got
    if resp.status_code >= 400:
        assert resp.headers.get("content-type") == "application/json", what
        body = resp.json()
        assert set(body) == {"error"}, what
        assert set(body["error"]) == {"code", "message", "details"}, what
        assert isinstance(body["error"]["code"], str) and body["error"]["code"], what
    if resp.headers.get("content-type") == "application/json" and resp.content:
        assert resp.content.endswith(b"\n"), what


# -- what is drawn ------------------------------------------------------------------------

# Text of every kind: lone surrogates (they travel as JSON's \ud800 escapes), controls,
# wide and combining characters, fullwidth and other scripts' digits.
ANY_TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=30)
DIGITS = st.text(st.sampled_from("0123456789３٣²¹₃-+. _xe"), max_size=8)
# Query values: any text UTF-8 can carry (httpx percent-encodes it).
QUERY_TEXT = st.one_of(st.text(max_size=40), DIGITS, st.just(""))
# Header values HTTP allows (visible ASCII and obs-text, blanks between words). Control
# characters are refused by uvicorn's parser before the app sees the request (a plain-text
# 400 of the server's own), so they are not drawn.
FIELD_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.characters(
    min_codepoint=0x80, max_codepoint=0xFF
)
HEADER_TEXT = st.lists(st.text(FIELD_CHARS, min_size=1, max_size=16), max_size=3).map(
    lambda words: " ".join(words).encode("latin-1")
)

LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    ANY_TEXT,
    DIGITS,
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.one_of(st.sampled_from(FIELDS), ANY_TEXT), inner, max_size=4)
    ),
    max_leaves=12,
)
PAYLOADS = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4),
    st.dictionaries(ANY_TEXT, VALUES, max_size=3),
    VALUES,
)


@st.composite
def submit_bodies(draw: st.DrawFn) -> bytes:
    """What POST /v1/jobs may be sent: documents near and far from the contract, deep
    nesting, huge strings, bytes that are not JSON or not UTF-8."""
    kind = draw(st.sampled_from(["near", "near", "document", "document", "deep", "huge", "raw"]))
    if kind == "near":
        return json.dumps(draw(near_valid()), ensure_ascii=draw(st.booleans())).encode(
            "utf-8", "surrogatepass"
        )
    if kind == "deep":
        depth = draw(st.sampled_from([63, 64, 65, 200, 999, 1000, 1001, 5000]))
        opening = draw(st.sampled_from(["[", '{"a":', '{"type":"ticker","payload":{"x":[']))
        closing = {"[": "]", '{"a":': "}"}.get(opening, "]}}")
        return (opening * depth + "1" + closing * depth).encode()
    if kind == "huge":
        size = draw(st.sampled_from([100_001, 200_000, 262_100, 300_000]))
        field = draw(st.sampled_from(["prompt", "theme", "template", "x" * 1000]))
        body = {"type": draw(st.sampled_from(TYPES)), "payload": {field: "é" * (size // 2)}}
        return json.dumps(body, ensure_ascii=False).encode()
    if kind == "raw":
        return draw(st.binary(max_size=64))
    document: dict[str, Any] = {}
    if draw(st.integers(0, 5)):
        document["type"] = draw(st.one_of(st.sampled_from(TYPES), VALUES))
    if draw(st.integers(0, 4)):
        document["payload"] = draw(PAYLOADS)
    if draw(st.integers(0, 3)) == 0:
        document["priority"] = draw(st.one_of(st.sampled_from(["high", "low"]), VALUES))
    if draw(st.integers(0, 5)) == 0:
        document[draw(ANY_TEXT)] = draw(VALUES)
    shape = draw(st.integers(0, 4))
    top = [document] if shape == 3 else draw(VALUES) if shape == 4 else document
    ascii_only = draw(st.booleans())
    return json.dumps(top, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# A valid payload of each type (tests.jobtypes' too), for documents one change away.
VALID = {
    "ticker": {"steps": 1, "interval_ms": 0},
    "generate": {"prompt": "hi", "max_tokens": 8},
    "generate_items": {"kind": "npc", "theme": "sea", "fields": ["name"]},
    "batch": {"template": "say {input}", "inputs": ["a"]},
    "chatty": {"chunks": 1, "size": 1},
    "sleepy": {"seconds": 0.1},
}


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A valid document with at most one change: a field's value swapped for any value,
    a field dropped, an unknown one added, or the priority changed."""
    name = draw(st.sampled_from(sorted(VALID)))
    payload = dict(VALID[name])
    document: dict[str, Any] = {"type": name, "payload": payload}
    change = draw(st.sampled_from(["none", "value", "value", "drop", "add", "priority"]))
    if change == "value":
        payload[draw(st.sampled_from(sorted(payload)))] = draw(VALUES)
    elif change == "drop":
        del payload[draw(st.sampled_from(sorted(payload)))]
    elif change == "add":
        payload[draw(ANY_TEXT)] = draw(VALUES)
    elif change == "priority":
        document["priority"] = draw(st.one_of(st.sampled_from(["high", "normal", "low"]), VALUES))
    return document


def ids(job_id: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(job_id),
        st.just(job_id.upper()),
        st.just(job_id.translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789"})),
        st.uuids().map(str),
        st.uuids(version=4).map(lambda u: "{" + str(u) + "}"),
        st.text(min_size=1, max_size=60),
        st.just("9" * 5000),
    )


HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "Idempotency-Key",
            "If-None-Match",
            "Last-Event-ID",
            "Accept",
            "Accept-Encoding",
            "Origin",
            "X-Forwarded-For",
            "Cookie",
            "Range",
            "Authorization",
        ]
    ),
    st.one_of(HEADER_TEXT, st.just(b""), st.just(f"Bearer {KEY}".encode())),
    max_size=3,
)
QUERY = st.dictionaries(
    st.one_of(
        st.sampled_from(["limit", "cursor", "status", "type", "job", "token", "last_event_id"]),
        st.text(max_size=10),
    ),
    QUERY_TEXT,
    max_size=4,
)
CONTENT_TYPES = st.sampled_from(
    [
        *["application/json"] * 6,
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
    ]
)


def _headers(drawn: dict[str, bytes], content_type: str | None = None) -> dict[str, bytes]:
    headers = {k: v for k, v in drawn.items()}
    headers.setdefault("Authorization", f"Bearer {KEY}".encode())
    if content_type is not None:
        headers["Content-Type"] = content_type.encode()
    return headers


# -- the endpoints --------------------------------------------------------------------------


@pytest.mark.timeout(120)
@FUZZ
@given(body=submit_bodies(), headers=HEADERS, content_type=CONTENT_TYPES)
def test_submit(
    http: httpx.Client, body: bytes, headers: dict[str, bytes], content_type: str
) -> None:
    check(http.post("/v1/jobs", content=body, headers=_headers(headers, content_type)))


@pytest.mark.timeout(120)
@FUZZ
@given(query=QUERY, headers=HEADERS)
def test_list(http: httpx.Client, query: dict[str, str], headers: dict[str, bytes]) -> None:
    check(http.get("/v1/jobs", params=query, headers=_headers(headers)))


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data(), headers=HEADERS, body=st.one_of(st.just(b""), st.binary(max_size=32)))
def test_one_job(
    http: httpx.Client, job_id: str, data: st.DataObject, headers: dict[str, bytes], body: bytes
) -> None:
    target = quote(data.draw(ids(job_id)), safe="")
    method, path = data.draw(
        st.sampled_from([("GET", ""), ("DELETE", ""), ("POST", "/retry"), ("GET", "")])
    )
    content = body if method == "POST" else None
    resp = http.request(
        method, f"/v1/jobs/{target}{path}", content=content, headers=_headers(headers)
    )
    check(resp)


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data(), query=QUERY, headers=HEADERS)
def test_streams(
    http: httpx.Client,
    job_id: str,
    data: st.DataObject,
    query: dict[str, str],
    headers: dict[str, bytes],
) -> None:
    one = data.draw(st.booleans())
    if one:
        url = f"/v1/jobs/{quote(data.draw(ids(job_id)), safe='')}/events"
    else:
        url = "/v1/events"
        named = data.draw(
            st.lists(st.one_of(st.just(job_id), st.uuids().map(str), QUERY_TEXT), max_size=3)
        )
        query = {**query, **({"job": named} if named else {})}
    sent = _headers(headers)
    if data.draw(st.booleans()):
        sent.pop("Authorization")  # EventSource sends none: the token (if any) must do
    with http.stream("GET", url, params=query, headers=sent) as resp:
        if resp.status_code == 200:
            event("stream")
            assert resp.headers["content-type"].startswith("text/event-stream")
            try:
                first = next(resp.iter_raw(), b"")
            except httpx.ReadTimeout:
                first = b""  # a stream for a job the store does not hold waits in silence
            assert not first or first.startswith((b"id:", b"event:", b":", b"retry:", b"data:"))
            return
        resp.read()
    check(resp)


@pytest.mark.timeout(120)
@FUZZ
@given(
    body=st.one_of(st.binary(max_size=64), submit_bodies()),
    headers=HEADERS,
    content_type=CONTENT_TYPES,
)
def test_stream_tokens(
    http: httpx.Client, body: bytes, headers: dict[str, bytes], content_type: str
) -> None:
    check(http.post("/v1/stream-tokens", content=body, headers=_headers(headers, content_type)))


@pytest.mark.timeout(120)
@FUZZ
@given(
    path=st.sampled_from(
        ["/v1/job-types", "/v1/stats", "/healthz", "/readyz", "/openapi.json", "/v1/jobs"]
    ),
    method=st.sampled_from(["GET", "HEAD", "PUT", "PATCH", "OPTIONS", "DELETE"]),
    query=QUERY,
    headers=HEADERS,
)
def test_other_paths_and_methods(
    http: httpx.Client, path: str, method: str, query: dict[str, str], headers: dict[str, bytes]
) -> None:
    resp = http.request(method, path, params=query, headers=_headers(headers))
    assert resp.status_code < 500, (method, path, resp.status_code, resp.text[:300])
    if method != "HEAD":
        check(resp)


def test_the_fuzzed_job_is_still_there(http: httpx.Client, job_id: str) -> None:
    """The fuzzing may have cancelled and retried it, nothing worse."""
    assert http.get(f"/v1/jobs/{job_id}").json()["status"] in {"queued", "cancelled"}
    assert uuid.UUID(job_id).version == 4
