"""Honest progress: a streamed answer's progress and ETA from its expected length (the
model's recent answers) and the rate its text arrives at; checked on the gauge, then on
``generate`` jobs against the offline model paced like a real one."""

from __future__ import annotations

import secrets

import pytest

from pushsvc.progress import FIRST_GUESS_TOKENS, AnswerLengths, Gauge

from .conftest import Client
from .sse import read


def test_expected_length_is_the_hint_else_recent_answers_else_a_typical_one() -> None:
    lengths = AnswerLengths()
    assert lengths.expected("m", None, 512) == FIRST_GUESS_TOKENS * 4  # not max_tokens
    assert lengths.expected("m", None, 10) == 40  # never past max_tokens
    for chars in (100, 300, 200):
        lengths.record("m", chars)
    assert lengths.expected("m", None, 512) == 200  # the median
    assert lengths.expected("other", None, 512) == FIRST_GUESS_TOKENS * 4  # per model
    assert lengths.expected("m", 30, 512) == 120  # the caller's hint wins


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
    job = await llm.submit("generate", {"prompt": prompt})
    stream = await read(llm.http, f"/v1/jobs/{job['id']}/events", timeout=30)
    done = await llm.get(job["id"])
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
