"""``pushsvc.answers``: an event stream's data lines and one answer's chunks, read as the
official client would read them (its errors included). The whole call, against a real
OpenAI-compatible server and every way it can end: tests/test_llm.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import openai
import pytest

from pushsvc.answers import Answer, sse_data
from pushsvc.errors import JobError

REQUEST = httpx2.Request("POST", "http://model.test/v1/chat/completions")


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def _data(*lines: str) -> list[str]:
    return [d async for d in sse_data(_lines(*lines))]


async def test_event_data_is_read_as_the_event_stream_format_says() -> None:
    got = await _data(
        ": a comment",
        "data: one",
        "",
        "event: message",
        "data:two",  # no space after the colon
        "data:  three",  # one space is the separator, the next is data
        "",
        "id: 7",
        "",  # an event without data: nothing
        "data: last",  # the body ends without the blank line
    )
    assert got == ["one", "two\n three", "last"]


def test_a_chunk_gives_its_text_finish_reason_model_and_usage() -> None:
    answer = Answer("four")
    text = answer.add({"model": "m", "choices": [{"delta": {"content": "hi "}}]}, REQUEST)
    end = {"choices": [{"delta": {}, "finish_reason": "stop"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    assert text == "hi " and answer.add(end, REQUEST) == "" and answer.add(usage, REQUEST) == ""
    done = answer.finish()
    assert (done.text, done.model, done.finish_reason) == ("hi ", "m", "stop")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 2)
    assert not done.usage.estimated


def test_lax_chunks_are_read_and_usage_is_estimated_when_none_comes() -> None:
    """What servers leave out: ``choices`` in a keep-alive, ``delta`` in a finish chunk,
    ``content`` in a role chunk, usage altogether."""
    answer = Answer("a prompt of twenty-four")
    for chunk in ({}, {"choices": [{"delta": {"role": "assistant"}}]}, {"choices": [{}]}):
        assert answer.add(chunk, REQUEST) == ""
    answer.add({"choices": [{"delta": {"content": "x" * 40}, "finish_reason": "length"}]}, REQUEST)
    done = answer.finish()
    assert done.truncated and done.usage.estimated and done.usage.completion_tokens == 10


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        "[1, 2]",
        '{"choices": {"a": 1}}',
        '{"choices": ["x"]}',
        '{"choices": [{"delta": {"content": 5}}]}',
    ],
)
def test_a_malformed_chunk_is_a_retryable_upstream_malformed(data: str) -> None:
    with pytest.raises(JobError) as caught:
        Answer()._take(data, REQUEST)
    assert caught.value.code == "upstream_malformed" and caught.value.retryable


def test_an_error_inside_the_stream_is_the_clients_api_error_with_its_body() -> None:
    body = {"message": "slow down", "type": "rate_limit_error"}
    with pytest.raises(openai.APIError) as caught:
        Answer()._take('{"error": {"message": "slow down", "type": "rate_limit_error"}}', REQUEST)
    assert caught.value.message == "slow down" and caught.value.body == body
    assert not isinstance(caught.value, openai.APIStatusError)


def test_a_stream_that_just_stops_is_truncated_unless_it_said_done() -> None:
    cut = Answer()
    cut.add({"choices": [{"delta": {"content": "half"}}]}, REQUEST)
    with pytest.raises(JobError) as caught:
        cut.finish()
    assert caught.value.code == "upstream_truncated" and caught.value.retryable
    lax = Answer()
    lax.add({"choices": [{"delta": {"content": "whole"}}]}, REQUEST)
    lax.saw_done = True  # [DONE] without a finish_reason: a lax server's whole answer
    assert lax.finish().text == "whole" and lax.finish().finish_reason is None
