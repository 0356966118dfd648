"""The built-in ``ticker`` job type (pushsvc/ticker.py): its payload schema and its
registration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pushsvc.jobs import registry
from pushsvc.ticker import TickerPayload, _should_fail


@pytest.mark.timeout(10)
def test_payload_defaults_and_bounds() -> None:
    assert TickerPayload().model_dump() == {
        "steps": 10,
        "interval_ms": 100,
        "fail_at_step": None,
        "fail_retryable": False,
        "fail_attempts": None,
    }
    bad = [{"steps": 0}, {"steps": 10001}, {"interval_ms": -1}, {"fail_at_step": 0}, {"x": 1}]
    for payload in bad:
        with pytest.raises(ValidationError):
            TickerPayload.model_validate(payload)


@pytest.mark.timeout(10)
def test_ticker_is_registered_with_its_schema() -> None:
    ticker = registry.get("ticker")
    assert ticker is not None and ticker.max_attempts == 3 and ticker.timeout_s == 3600
    assert ticker.schema_errors({"steps": 2, "interval_ms": 0}) == []
    assert [e["loc"] for e in ticker.schema_errors({"steps": "two"})] == [["payload", "steps"]]


@pytest.mark.timeout(10)
def test_fail_attempts_limits_the_failing_attempts() -> None:
    assert _should_fail(5, None)
    assert _should_fail(2, 2) and not _should_fail(3, 2)
