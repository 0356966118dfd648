"""What a herd of requests costs the other tenants (``bench neighbours``' herd):
the pieces made cheaper keep their behaviour.

- JSON bodies with megabytes of text (a job's output) are encoded a slice at a time
  (``responses.json_response``): the same bytes and headers as ``responses.JSONResponse``
  (Starlette's, ending with a newline).
- The log redactor runs its patterns only on text that holds what they need: the same
  lines as running every pattern on every string.
- Stream responses write without a cancel scope per write: same frames, same ends.
- The API process leaves its startup heap out of the collector's full passes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
from typing import Any

import pytest

from pushsvc import responses
from pushsvc.logs import _AUTH_HEADER, _BEARER, _QUERY_TOKEN, _TOKEN, REDACTED, Redactor
from pushsvc.responses import (
    LARGE_TEXT,
    TEXT_SLICE,
    EventStream,
    JSONParts,
    JSONResponse,
    json_response,
)

from ..conftest import Client
from ..sse import events

# Text a JSON encoder escapes (quotes, backslashes, controls), wide characters, and
# characters it does not (U+2028, non-ASCII): at every slice boundary somewhere.
ALPHABET = 'ab "\\\n\t\r\x00\x01\x1f\x7fé€😀\u2028/<>&'


def _body(resp: Any) -> bytes:
    return b"".join(resp.parts) if isinstance(resp, JSONParts) else bytes(resp.body)


@pytest.mark.parametrize("seed", range(12))
async def test_json_with_large_text_is_the_bytes_and_headers_jsonresponse_makes(seed: int) -> None:
    rnd = random.Random(seed)
    size = rnd.choice([10, LARGE_TEXT - 1, LARGE_TEXT, TEXT_SLICE + 7, 3 * TEXT_SLICE])
    big = "".join(rnd.choice(ALPHABET) for _ in range(size))
    content = {
        "id": "x",
        "output": big,
        "result": {"text": big[: LARGE_TEXT + 5], "n": [1, 2.5, None, True]},
        "jobs": [{"output": big[::-1]}, {"output": ""}],
        "links": {"self": "/v1/jobs/x"},
    }
    for status, headers in ((200, None), (202, {"Location": "/v1/jobs/x", "ETag": '"3.e"'})):
        want = JSONResponse(content, status, headers)
        got = await json_response(content, status, headers)
        assert _body(got) == want.body
        assert got.status_code == want.status_code
        assert got.raw_headers == want.raw_headers  # content-length included, same order
        assert isinstance(got, JSONParts) == (size >= LARGE_TEXT)


async def test_large_text_is_encoded_while_other_tasks_run() -> None:
    """10 MiB of text: no stretch of the encoding holds the loop for long."""
    text = ('The answer, "in short": it depends.\n' * 300_000)[: 10 * 2**20]
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            started = loop.time()
            await asyncio.sleep(0)
            gaps.append(loop.time() - started)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    resp = await json_response({"output": text})
    done.set()
    await task
    assert json.loads(_body(resp)) == {"output": text}
    assert len(gaps) >= len(text) // TEXT_SLICE  # it ran between slices
    assert all(len(part) <= 2 * responses.PART_BYTES for part in resp.parts)  # type: ignore[attr-defined]


async def test_a_job_with_a_large_output_reads_whole_over_http(client: Client) -> None:
    chunks, size = 120, 1000  # 120 KB of output: past LARGE_TEXT
    job = await client.submit("chatty", {"chunks": chunks, "size": size})
    done = await client.wait(job["id"])
    expected = "".join(f"<{i}>".ljust(size, ".") for i in range(chunks))
    assert done["output"] == expected
    resp = await client.http.get(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert int(resp.headers["content-length"]) == len(resp.content)
    assert resp.headers["etag"] == f'"{done["seq"]}.{done["epoch"]}"'
    assert resp.json()["output"] == expected
    listed = await client.http.get("/v1/jobs", params={"limit": 100})
    mine = [j for j in listed.json()["jobs"] if j["id"] == job["id"]]
    assert mine and mine[0]["output"] == expected
    head = await client.http.head(f"/v1/jobs/{job['id']}")
    assert head.status_code == 200 and head.content == b""


def _every_pattern(secrets: list[str], value: str) -> str:
    """The redactor as it was: every pattern on every string."""
    for secret in secrets:
        value = value.replace(secret, REDACTED)
    value = _QUERY_TOKEN.sub(rf"\1{REDACTED}", value)
    value = _BEARER.sub(rf"\1{REDACTED}", value)
    value = _AUTH_HEADER.sub(rf"\1{REDACTED}", value)
    return _TOKEN.sub(REDACTED, value)


def test_redactor_masks_what_running_every_pattern_masks() -> None:
    redactor = Redactor(["sekrit-key-123", "abc"])
    pieces = [
        "token=", "TOKEN=", "?stream_token=", "Bearer ", "bearer\t", "BEARER", "basic ",
        "Authorization: ", "authorıZation=", 'aUtHoRiZaTiOn"="', "x" * 17, ".", "-", "_",
        "a.b", "abcdefghijklmnopq.", "rstuvwxyz01234567", " ", "&", '"', "'", "=", ":",
        "\n", "sekrit-key-123", "abc", "é", "\u212a", "ſ", "eyJ" + "h" * 20,
    ]  # fmt: skip
    rnd = random.Random(11)
    changed = 0
    for _ in range(30_000):
        value = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 9)))
        masked = redactor.text(value)
        assert masked == _every_pattern(redactor.secrets, value), value
        changed += masked != value
    assert changed > 1000  # the sample did exercise the patterns


def test_redacted_keys_are_remembered_and_still_masked() -> None:
    redactor = Redactor(["hunter2hunter2"])
    line = {"hunter2hunter2": "x", "token=abcdef": 1, "event": "e"}
    for _ in range(3):
        assert redactor(None, "info", dict(line)) == {
            REDACTED: "x",
            f"token={REDACTED}": 1,
            "event": "e",
        }


async def test_stream_writes_take_no_cancel_scope_each_and_end_as_before() -> None:
    """Frames go out as plain sends; the closing chunk ends the body."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never leaves
        return {}

    async def body() -> Any:
        yield b"retry: 1000\n\n"
        yield memoryview(b"id: 1.e\nevent: status\ndata: {}\n\n")  # not bytes: converted

    drain = responses.Drain()
    stream = EventStream(body(), drain, headers={"Cache-Control": "no-cache"})
    scopes = 0
    real = responses.anyio.move_on_after

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal scopes
        scopes += 1
        return real(*args, **kwargs)

    responses.anyio.move_on_after = counting  # type: ignore[assignment]
    try:
        await stream({"type": "http", "method": "GET"}, receive, send)  # type: ignore[arg-type]
    finally:
        responses.anyio.move_on_after = real  # type: ignore[assignment]
    assert scopes == 0
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 3
    assert sent[0]["status"] == 200
    assert [m.get("body") for m in sent[1:]] == [
        b"retry: 1000\n\n",
        b"id: 1.e\nevent: status\ndata: {}\n\n",
        b"",
    ]
    assert [m.get("more_body") for m in sent[1:]] == [True, True, False]
    assert not stream.active and stream._response_complete


async def test_a_failed_write_closes_the_body_and_marks_the_send_interrupted() -> None:
    closed = asyncio.Event()

    async def body() -> Any:
        try:
            while True:
                yield b"data: x\n\n"
        finally:
            closed.set()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("the peer went away")

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    stream = EventStream(body(), responses.Drain())
    with pytest.raises(OSError):
        await stream({"type": "http", "method": "GET"}, receive, send)  # type: ignore[arg-type]
    assert closed.is_set() and stream._send_interrupted


async def test_streams_of_a_running_api_still_send_their_frames(client: Client) -> None:
    job = await client.submit("chatty", {"chunks": 5, "size": 10})
    await client.wait(job["id"])
    kinds = [e.kind async for e in events(client.http, f"/v1/jobs/{job['id']}/events")]
    assert kinds[0] == "snapshot" and kinds[-1] == "completed"


def test_the_first_startup_of_a_process_freezes_its_heap_and_later_ones_do_not() -> None:
    from pushsvc import app

    thresholds = gc.get_threshold()
    app._frozen = False
    try:
        app._freeze_startup_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        young, middle, full = gc.get_threshold()
        assert (young, middle) == thresholds[:2] and full >= app.FULL_PASS_EVERY
        app._freeze_startup_heap()  # once per process
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()  # the test process goes on collecting what it made
        gc.set_threshold(*thresholds)
        app._frozen = True


def test_the_hint_pattern_matches_as_the_patterns_do() -> None:
    from pushsvc.logs import _CREDENTIAL_HINT

    for text in ("x TOKEN=1", "BeArEr\u00a0x", "AUTHORIZATION", "authorızation"):
        needs = any(p.search(text) for p in (_QUERY_TOKEN, _BEARER, _AUTH_HEADER))
        assert not needs or _CREDENTIAL_HINT.search(text), text
    assert re.search(_CREDENTIAL_HINT, "plain text. nothing here") is None
