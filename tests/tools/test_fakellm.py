"""The offline model over real HTTP (uvicorn), driven only through the official openai client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletionChunk
from starlette.applications import Starlette

from pushsvc.tools.fakeask import STAMP, stamps
from pushsvc.tools.fakellm import create_fake_llm_app

from ..procs import wait_until

FAST = 2000.0  # tokens a second: tests that do not measure pacing should not wait for it


@contextmanager
def serving(app: Starlette) -> Iterator[str]:
    """uvicorn in a background thread, on a socket bound here (no free-port race)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, log_level="warning", ws="none", lifespan="off", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 10, "fake llm")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serving(create_fake_llm_app(tokens_per_s=FAST)) as url:
        yield url


def client_for(url: str, **kw: Any) -> openai.AsyncOpenAI:
    options: dict[str, Any] = {"api_key": "x", "max_retries": 0, "timeout": 10.0, **kw}
    return openai.AsyncOpenAI(base_url=f"{url}/v1", **options)


@pytest.fixture
async def llm(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client_for(base_url) as client:
        yield client


def user(text: str) -> list[Any]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def fresh(text: str = "") -> str:
    """A message no other test sends, so fault counters and answers are this test's own."""
    return f"{text} {uuid.uuid4().hex}".strip()


async def ask(llm: openai.AsyncOpenAI, text: str, **kw: Any) -> str:
    done = await llm.chat.completions.create(model="fake-1", messages=user(text), **kw)
    return done.choices[0].message.content or ""


async def chunks(llm: openai.AsyncOpenAI, text: str, **kw: Any) -> list[ChatCompletionChunk]:
    create = llm.chat.completions.create
    async with await create(model="fake-1", messages=user(text), stream=True, **kw) as stream:
        return [chunk async for chunk in stream]


def joined(received: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in received if c.choices)


async def stats_until(url: str, check: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """Poll the server's counters until ``check`` holds (they change in another thread)."""
    stats: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url) as http:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stats = (await http.get("/_fake/stats")).json()
            if check(stats):
                return stats
            await asyncio.sleep(0.02)
    raise AssertionError(f"stats never matched: {stats}")


async def test_models_list(llm: openai.AsyncOpenAI) -> None:
    page = await llm.models.list()
    assert [(m.id, m.object, m.owned_by) for m in page.data] == [("fake-1", "model", "pushsvc")]
    assert isinstance(page.data[0].created, int)


async def test_stream_arrives_in_order_and_joins_to_the_whole_answer(
    llm: openai.AsyncOpenAI,
) -> None:
    text = fresh("tell me a story")
    whole = await llm.chat.completions.create(model="fake-1", messages=user(text))
    received = await chunks(llm, text)

    answer = whole.choices[0].message.content or ""
    assert whole.object == "chat.completion" and whole.model == "fake-1"
    assert whole.choices[0].finish_reason == "stop"
    assert len(answer.split(" ")) == 40 and not answer.startswith(" ")
    assert whole.usage is not None and whole.usage.completion_tokens == 40
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 40
    assert joined(received) == answer
    pieces = [c.choices[0].delta.content for c in received if c.choices[0].delta.content]
    assert " ".join(p.strip() for p in pieces) == answer  # one word a chunk, in order
    assert len({c.id for c in received}) == 1


async def test_first_chunk_has_role_then_an_empty_delta_then_finish(
    llm: openai.AsyncOpenAI,
) -> None:
    received = await chunks(llm, fresh("[[tokens:6]]"))

    first, last = received[0].choices[0], received[-1].choices[0]
    assert (first.delta.role, first.delta.content, first.finish_reason) == ("assistant", "", None)
    assert (last.finish_reason, bool(last.delta.content)) == ("stop", True)
    empty = [
        i
        for i, c in enumerate(received)
        if c.choices[0].delta.model_dump(exclude_none=True) == {}
        and c.choices[0].finish_reason is None
    ]
    assert len(empty) == 1 and 1 < empty[0] < len(received) - 1
    assert all(c.choices[0].finish_reason is None for c in received[:-1])
    assert all(c.usage is None for c in received)


async def test_usage_chunk_comes_last_with_include_usage(llm: openai.AsyncOpenAI) -> None:
    received = await chunks(llm, fresh("[[tokens:5]]"), stream_options={"include_usage": True})

    assert received[-1].choices == []
    usage = received[-1].usage
    assert usage is not None and usage.completion_tokens == 5
    assert usage.total_tokens == usage.prompt_tokens + 5 and usage.prompt_tokens > 0
    assert all(c.usage is None and c.choices for c in received[:-1])
    assert received[-2].choices[0].finish_reason == "stop"


async def test_same_request_same_answer(llm: openai.AsyncOpenAI) -> None:
    text = fresh("hello")
    first, again, other = await asyncio.gather(
        ask(llm, text), ask(llm, text), ask(llm, fresh("hello"))
    )
    assert first == again
    assert other != first
    # Directives are not part of the seed: pacing a request does not change its words.
    assert await ask(llm, f"{text} [[rate:1000]]") == first


async def test_tokens_directive_and_max_tokens(llm: openai.AsyncOpenAI) -> None:
    text = fresh("[[tokens:7]]")
    seven = await ask(llm, text)
    cut = await llm.chat.completions.create(model="fake-1", messages=user(text), max_tokens=3)
    streamed = await chunks(llm, text, max_tokens=3)

    assert len(seven.split(" ")) == 7
    content = cut.choices[0].message.content or ""
    assert content.split(" ") == seven.split(" ")[:3]
    assert cut.choices[0].finish_reason == "length"
    assert joined(streamed) == content
    assert streamed[-1].choices[0].finish_reason == "length"
    assert await ask(llm, fresh("[[tokens:0]]")) == ""


@pytest.mark.timeout(20)
async def test_rate_directive_paces_tokens(llm: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    received = await chunks(llm, fresh("[[rate:40]] [[tokens:9]]"))
    elapsed = time.monotonic() - started

    assert len(joined(received).split(" ")) == 9
    assert elapsed >= 9 / 40 * 0.9  # a sleep between tokens; the server's default is faster


STATUS_FAULTS = [
    ("429", openai.RateLimitError, "rate_limit_exceeded"),
    ("500", openai.InternalServerError, None),
    ("503", openai.InternalServerError, "service_unavailable"),
    ("401", openai.AuthenticationError, "invalid_api_key"),
    ("400", openai.BadRequestError, None),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fault", "error", "code"), STATUS_FAULTS)
async def test_status_faults_raise_the_matching_openai_error(
    llm: openai.AsyncOpenAI,
    fault: str,
    error: type[openai.APIStatusError],
    code: str | None,
    stream: bool,
) -> None:
    with pytest.raises(error) as caught:
        await llm.chat.completions.create(
            model="fake-1", messages=user(fresh(f"[[fault:{fault}]]")), stream=stream
        )
    assert caught.value.status_code == int(fault)
    assert caught.value.code == code
    assert isinstance(caught.value.body, dict) and caught.value.body["message"]


async def test_rate_limit_sends_retry_after(llm: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as default:
        await ask(llm, fresh("[[fault:429]]"))
    with pytest.raises(openai.RateLimitError) as custom:
        await ask(llm, fresh("[[fault:429:after=2]]"))

    assert default.value.response.headers["retry-after"] == "1"
    assert custom.value.response.headers["retry-after"] == "2"
    assert default.value.type == "rate_limit_error"


async def test_times_fails_the_first_k_requests_then_recovers(llm: openai.AsyncOpenAI) -> None:
    text = fresh("[[fault:429:after=2:times=2]]")
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as caught:
            await ask(llm, text)
        assert caught.value.response.headers["retry-after"] == "2"

    assert await ask(llm, text) == await ask(llm, text) != ""
    # The budget belongs to this message: another one with the same directive fails anew.
    with pytest.raises(openai.RateLimitError):
        await ask(llm, fresh("[[fault:429:after=2:times=2]]"))


async def test_fault_header_wins_over_the_directive(llm: openai.AsyncOpenAI) -> None:
    text = fresh("[[fault:500]]")
    with pytest.raises(openai.BadRequestError):
        await ask(llm, text, extra_headers={"X-Fake-Fault": "400"})
    with pytest.raises(openai.AuthenticationError):
        await ask(llm, fresh("plain"), extra_headers={"X-Fake-Fault": "401"})
    text = fresh("plain")
    with pytest.raises(openai.InternalServerError):
        await chunks(llm, text, extra_headers={"X-Fake-Fault": "503:times=1"})
    assert joined(await chunks(llm, text, extra_headers={"X-Fake-Fault": "503:times=1"}))


async def test_bad_directives_are_refused(llm: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown fault"):
        await ask(llm, fresh("[[fault:teapot]]"))
    with pytest.raises(openai.BadRequestError, match="tokens"):
        await ask(llm, fresh("[[tokens:many]]"))
    for spec in ["429:after=-1", "500:times=x", "503:often=1"]:
        with pytest.raises(openai.BadRequestError, match="bad fault option"):
            await ask(llm, fresh(f"[[fault:{spec}]]"))


@pytest.mark.timeout(20)
async def test_drop_cuts_the_stream_without_done(llm: openai.AsyncOpenAI) -> None:
    got: list[ChatCompletionChunk] = []
    create = llm.chat.completions.create
    with pytest.raises(openai.APIConnectionError) as caught:
        stream = await create(model="fake-1", messages=user(fresh("[[fault:drop]]")), stream=True)
        async with stream:
            async for chunk in stream:
                got.append(chunk)

    assert not isinstance(caught.value, openai.APITimeoutError)
    assert got[0].choices[0].delta.role == "assistant"
    assert joined(got)  # some content arrived first
    assert all(c.choices[0].finish_reason is None for c in got)


@pytest.mark.timeout(20)
async def test_drop_without_stream_is_a_connection_error(llm: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError) as caught:
        await ask(llm, fresh("[[fault:drop]]"))
    assert not isinstance(caught.value, openai.APITimeoutError)


@pytest.mark.timeout(20)
async def test_stall_times_out_the_client(base_url: str) -> None:
    async with client_for(base_url, timeout=0.5) as llm:
        got: list[ChatCompletionChunk] = []
        with pytest.raises(openai.APITimeoutError):
            async with await llm.chat.completions.create(
                model="fake-1", messages=user(fresh("[[fault:stall]]")), stream=True
            ) as stream:
                async for chunk in stream:
                    got.append(chunk)
        with pytest.raises(openai.APITimeoutError):
            await ask(llm, fresh("[[fault:stall]]"))

    assert got[0].choices[0].delta.role == "assistant" and joined(got)


@pytest.mark.timeout(20)
async def test_closing_a_stalled_stream_counts_as_a_disconnect() -> None:
    with serving(create_fake_llm_app(tokens_per_s=FAST)) as url:
        async with client_for(url) as llm:
            assert joined(await chunks(llm, "fine"))
            stream = await llm.chat.completions.create(
                model="fake-1", messages=user("[[fault:stall]]"), stream=True
            )
            async with stream:
                first = await stream.__anext__()
                assert first.choices[0].delta.role == "assistant"
                await stats_until(url, lambda s: s["open_streams"] == 1)

            stats = await stats_until(url, lambda s: s["disconnects"] == 1)
    assert stats == {"requests": 2, "open_streams": 0, "completed_streams": 1, "disconnects": 1}


async def test_json_mode_gives_one_object_with_the_keys(llm: openai.AsyncOpenAI) -> None:
    text = fresh("describe a cat")
    plain = json.loads(await ask(llm, text, response_format={"type": "json_object"}))
    keyed_text = fresh("describe a cat\nJSON keys: title, summary, tags\nthanks")
    keyed = json.loads(await ask(llm, keyed_text))
    received = await chunks(llm, keyed_text)

    assert set(plain) == {"name", "description"}
    assert list(keyed) == ["title", "summary", "tags"]
    assert all(isinstance(v, str) and v for v in [*plain.values(), *keyed.values()])
    pieces = [c.choices[0].delta.content for c in received if c.choices[0].delta.content]
    assert len(pieces) >= 4 and all(len(p) <= 8 for p in pieces)
    assert json.loads(joined(received)) == keyed


async def test_malformed_json_does_not_parse(llm: openai.AsyncOpenAI) -> None:
    text = fresh("JSON keys: name, description\n[[fault:malformed]]")
    content = await ask(llm, text, response_format={"type": "json_object"})
    received = await chunks(llm, text)

    assert content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)
    assert joined(received) == content


async def test_required_api_key() -> None:
    with serving(create_fake_llm_app(tokens_per_s=FAST, api_key="sekret")) as url:
        async with (
            client_for(url, api_key="wrong") as wrong,
            client_for(url, api_key="sekret") as right,
        ):
            with pytest.raises(openai.AuthenticationError) as caught:
                await ask(wrong, "hi")
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
            assert caught.value.code == "invalid_api_key"
            assert await ask(right, "hi")
            assert [m.id for m in (await right.models.list()).data] == ["fake-1"]


async def raw_stream(url: str, text: str, **body: Any) -> bytes:
    """A streamed answer's body as the server sent it (no client in between)."""
    request = {"model": "fake-1", "messages": user(text), "stream": True, **body}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        resp = await http.post("/v1/chat/completions", json=request)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(
            "text/event-stream"
        )
        return resp.content


@pytest.mark.timeout(20)
@pytest.mark.parametrize("reason", ["length", "content_filter", "stop"])
async def test_finish_directive_sets_the_finish_reason(
    llm: openai.AsyncOpenAI, reason: str
) -> None:
    text = fresh("[[tokens:6]]")
    received = await chunks(llm, f"{text} [[finish:{reason}]]")
    whole = await llm.chat.completions.create(
        model="fake-1", messages=user(f"{text} [[finish:{reason}]]")
    )

    assert joined(received) == await ask(llm, text)  # the words stay the same
    assert received[-1].choices[0].finish_reason == reason
    assert whole.choices[0].finish_reason == reason


@pytest.mark.timeout(20)
async def test_finish_none_sends_no_finish_reason_but_done(
    llm: openai.AsyncOpenAI, base_url: str
) -> None:
    text = fresh("[[tokens:4]] [[finish:none]]")
    received = await chunks(llm, text)
    body = await raw_stream(base_url, text)

    assert len(joined(received).split(" ")) == 4
    assert all(c.choices[0].finish_reason is None for c in received)
    assert body.endswith(b"data: [DONE]\n\n")


@pytest.mark.timeout(20)
async def test_no_usage_sends_no_usage(llm: openai.AsyncOpenAI) -> None:
    text = fresh("[[tokens:5]] [[no_usage]]")
    received = await chunks(llm, text, stream_options={"include_usage": True})
    whole = await llm.chat.completions.create(model="fake-1", messages=user(text))

    assert all(c.usage is None and c.choices for c in received)
    assert received[-1].choices[0].finish_reason == "stop"
    assert whole.usage is None and whole.choices[0].message.content


@pytest.mark.timeout(20)
@pytest.mark.parametrize("at", [None, 0, 1, 100])
async def test_truncate_ends_the_stream_cleanly_without_finish_or_done(
    llm: openai.AsyncOpenAI, base_url: str, at: int | None
) -> None:
    spec = "truncate" if at is None else f"truncate:at={at}"
    text = fresh(f"[[tokens:6]] [[fault:{spec}]]")
    received = await chunks(llm, text, stream_options={"include_usage": True})  # no error
    body = await raw_stream(base_url, text)
    whole = await ask(llm, fresh("[[tokens:6]]"))

    sent = min(6, 3 if at is None else at)
    assert len([c for c in received if c.choices[0].delta.content]) == sent
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in received)
    assert b"[DONE]" not in body and b'"finish_reason":"stop"' not in body
    assert whole  # an answer without the fault is whole


@pytest.mark.timeout(20)
async def test_truncate_without_stream_is_a_short_answer_without_finish(
    llm: openai.AsyncOpenAI,
) -> None:
    cut = await llm.chat.completions.create(
        model="fake-1", messages=user(fresh("[[tokens:6]] [[fault:truncate:at=2]]"))
    )
    assert len((cut.choices[0].message.content or "").split(" ")) == 2
    assert cut.choices[0].finish_reason is None


IN_STREAM = [
    ("stream_429", "rate_limit_error", "rate_limit_exceeded"),
    ("stream_500", "server_error", None),
    ("stream_503", "server_error", "service_unavailable"),
    ("stream_401", "invalid_request_error", "invalid_api_key"),
    ("stream_400", "invalid_request_error", None),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("fault", "type_", "code"), IN_STREAM)
async def test_stream_errors_arrive_inside_a_200_stream(
    llm: openai.AsyncOpenAI, base_url: str, fault: str, type_: str, code: str | None
) -> None:
    text = fresh(f"[[fault:{fault}:at=2]]")
    got: list[ChatCompletionChunk] = []
    create = llm.chat.completions.create
    with pytest.raises(openai.APIError) as caught:
        async with await create(model="fake-1", messages=user(text), stream=True) as stream:
            async for chunk in stream:
                got.append(chunk)
    body = await raw_stream(base_url, text)

    error = caught.value
    assert not isinstance(error, openai.APIStatusError)  # no status: it came inside a 200
    assert (error.type, error.code) == (type_, code)
    assert len([c for c in got if c.choices[0].delta.content]) == 2
    assert body.rstrip().endswith(b"}}") and b"[DONE]" not in body
    last = json.loads(body.rstrip().rsplit(b"\n", 1)[-1].removeprefix(b"data: "))
    assert set(last) == {"error"} and last["error"]["message"]


@pytest.mark.timeout(20)
async def test_stream_rate_limit_says_when_to_try_again(llm: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIError, match="try again in 2s"):
        await chunks(llm, fresh("[[fault:stream_429:after=2]]"))
    # Without a stream it is the plain status (with Retry-After).
    with pytest.raises(openai.RateLimitError) as caught:
        await ask(llm, fresh("[[fault:stream_429:after=2]]"))
    assert caught.value.response.headers["retry-after"] == "2"


@pytest.mark.timeout(20)
async def test_bad_chunk_is_not_json(llm: openai.AsyncOpenAI) -> None:
    got: list[ChatCompletionChunk] = []
    create = llm.chat.completions.create
    text = fresh("[[fault:bad_chunk:at=1]]")
    with pytest.raises(json.JSONDecodeError):  # the SDK lets it out, not as an OpenAIError
        async with await create(model="fake-1", messages=user(text), stream=True) as stream:
            async for chunk in stream:
                got.append(chunk)
    assert len([c for c in got if c.choices[0].delta.content]) == 1
    with pytest.raises((json.JSONDecodeError, openai.APIResponseValidationError)):
        await ask(llm, fresh("[[fault:bad_chunk]]"))


@pytest.mark.timeout(20)
async def test_times_applies_to_the_new_faults(llm: openai.AsyncOpenAI) -> None:
    text = fresh("[[tokens:5]] [[fault:truncate:times=1]]")
    first, second = await chunks(llm, text), await chunks(llm, text)
    assert all(c.choices[0].finish_reason is None for c in first)
    assert second[-1].choices[0].finish_reason == "stop"
    assert joined(second) == await ask(llm, text)


@pytest.mark.timeout(20)
async def test_bad_new_directives_are_refused(llm: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="finish"):
        await ask(llm, fresh("[[finish:maybe]]"))
    with pytest.raises(openai.BadRequestError, match="bad fault option"):
        await ask(llm, fresh("[[fault:truncate:at=x]]"))


@pytest.mark.timeout(20)
async def test_stamp_ends_each_streamed_piece_with_its_write_time(
    llm: openai.AsyncOpenAI,
) -> None:
    text = fresh("[[tokens:6]]")
    before = time.time()
    received = await chunks(llm, f"{text} [[stamp]]")
    after = time.time()

    pieces = [c.choices[0].delta.content for c in received if c.choices[0].delta.content]
    written = [stamps(p) for p in pieces]
    assert all(len(w) == 1 for w in written)  # one stamp a piece, at its end
    times = [w[0] for w in written]
    assert before <= times[0] and times == sorted(times) and times[-1] <= after
    # The words stay those of the unstamped answer: the stamp only follows each piece.
    assert STAMP.sub("", joined(received)) == await ask(llm, text)
    assert stamps(await ask(llm, f"{text} [[stamp]]")) == []  # streams only
