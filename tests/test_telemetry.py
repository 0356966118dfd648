"""A job's model calls in figures (pushsvc/telemetry.py): a call's meter, a job's totals
over many calls, the price table, and the call log's rows as /v1/stats sums them. The
calls themselves, over the offline model, are in test_llm.py and test_llm_jobs.py."""

from __future__ import annotations

import secrets

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from pushsvc.keys import Keys
from pushsvc.models import LLMTelemetry
from pushsvc.settings import Settings
from pushsvc.telemetry import CallLog, CallMeter, Price, Totals, price_of, summarize_calls


@pytest.mark.timeout(5)
def test_the_price_table_reads_and_refuses() -> None:
    prices = Settings(llm_prices=" gpt-4o-mini=0.15/0.60, llama3=0/0,").llm_prices
    assert prices == {"gpt-4o-mini": (0.15, 0.6), "llama3": (0.0, 0.0)}
    assert price_of(prices, "gpt-4o-mini") == Price(0.15, 0.6)
    assert price_of(prices, "unknown") is None
    assert Price(0.15, 0.6).cost(1_000_000, 500_000) == pytest.approx(0.45)
    for bad in ("gpt=0.15", "gpt=a/b", "=1/2", "gpt=-1/2", "gpt=inf/1"):
        with pytest.raises(ValidationError, match="PUSHSVC_LLM_PRICES must look like"):
            Settings(llm_prices=bad)


@pytest.mark.timeout(5)
def test_a_meter_estimates_while_streaming_then_takes_the_servers_usage() -> None:
    meter = CallMeter("m", Price(1000, 2000), prompt_chars=40, now=100.0)
    meter.delta(8, 100.5)  # the first token, half a second after the request
    meter.delta(32, 101.5)
    live = meter.view()
    assert LLMTelemetry.model_validate(live).ttft_s == 0.5
    assert (live["prompt_tokens"], live["completion_tokens"], live["estimated"]) == (10, 10, True)
    assert live["tokens_per_s"] == 10.0  # 10 tokens over the second since the first
    meter.finish(12, 9, estimated=False)
    final = meter.view()
    assert (final["prompt_tokens"], final["completion_tokens"], final["estimated"]) == (
        12,
        9,
        False,
    )
    assert final["cost_usd"] == pytest.approx((12 * 1000 + 9 * 2000) / 1e6)


@pytest.mark.timeout(5)
def test_totals_count_each_items_last_call_once() -> None:
    totals = Totals("m", None, now=0.0)
    call = {"prompt_tokens": 5, "completion_tokens": 4, "estimated": True}
    totals.update(0, call, 1.0)
    totals.update(1, {**call, "completion_tokens": 6}, 2.0)
    # Item 0 tried again: its new call replaces the old one, not added to it.
    view = totals.update(0, {**call, "completion_tokens": 3, "estimated": False}, 3.0)
    assert (view["prompt_tokens"], view["completion_tokens"]) == (10, 9)
    assert view["estimated"] is True and view["cost_usd"] is None  # item 1; no price
    assert view["ttft_s"] == 1.0 and totals.view(final=True)["tokens_per_s"] == 4.5


@pytest.mark.timeout(10)
async def test_the_call_log_sums_by_model(redis: Redis) -> None:
    keys = Keys(f"tl{secrets.token_hex(3)}")
    log = CallLog(redis, keys)

    def call(model: str, ttft: float, tokens: int, cost: float | None) -> dict[str, object]:
        return {
            "model": model,
            "ttft_s": ttft,
            "tokens_per_s": 50.0,
            "prompt_tokens": 3,
            "completion_tokens": tokens,
            "estimated": model == "m2",
            "cost_usd": cost,
        }

    for ttft, cost in ((0.2, 0.01), (0.4, 0.02), (0.9, None)):
        await log.record("generate", "t", call("m1", ttft, 10, cost))
    await log.record("generate", "t", call("m2", 0.1, 1, None))
    rows = [f for _, f in await redis.xrange(keys.llm_calls)]
    figures = summarize_calls(rows)
    assert list(figures) == ["m1", "m2"]
    m1 = figures["m1"]
    assert (m1["calls"], m1["ttft_p50_s"], m1["ttft_p95_s"]) == (3, 0.4, 0.9)
    assert (m1["completion_tokens"], m1["prompt_tokens"], m1["estimated_calls"]) == (30, 9, 0)
    assert m1["cost_usd"] == pytest.approx(0.03)  # the priced calls' cost
    assert figures["m2"]["cost_usd"] is None and figures["m2"]["estimated_calls"] == 1
