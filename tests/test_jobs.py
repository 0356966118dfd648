"""Job types (pushsvc/jobs.py): ``@job_type`` registration, the registry, schema errors
(clipped, and lone surrogates caught) and the retry policy's scaling."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from pushsvc.errors import ECHO_MAX
from pushsvc.jobs import Registry, RetryPolicy, job_type
from pushsvc.settings import Settings


class Payload(BaseModel):
    text: str
    count: int = 1


def make_registry() -> Registry:
    target = Registry()

    @job_type("echo", payload=Payload, timeout_s=5, max_attempts=2, target=target)
    async def echo(ctx: object, payload: Payload) -> str:
        """Says it back.

        More words that the description leaves out."""
        return payload.text

    return target


@pytest.mark.timeout(10)
def test_the_decorator_registers_a_described_type() -> None:
    echo = make_registry().get("echo")
    assert echo is not None and (echo.timeout_s, echo.max_attempts) == (5, 2)
    described = echo.describe()
    assert described["description"] == "Says it back."
    assert described["payload_schema"]["required"] == ["text"]
    assert make_registry().get("other") is None


@pytest.mark.timeout(10)
def test_a_name_registers_once() -> None:
    target = make_registry()
    with pytest.raises(ValueError, match="registered twice"):
        target.add(target.types["echo"])


@pytest.mark.timeout(10)
def test_schema_errors_name_the_place_and_clip_the_value() -> None:
    echo = make_registry().types["echo"]
    assert echo.schema_errors({"text": "hi"}) == []
    (error,) = echo.schema_errors({"text": 5})
    assert error["loc"] == ["payload", "text"] and error["type"] == "type"
    (long,) = echo.schema_errors({"text": "t", "count": "9" * 100_000})
    assert len(long["msg"]) <= ECHO_MAX + 50


@pytest.mark.timeout(10)
def test_a_lone_surrogate_is_not_text() -> None:
    echo = make_registry().types["echo"]
    (error,) = echo.schema_errors({"text": "a\ud800b"})
    assert error == {"loc": ["payload", "text"], "msg": "not valid Unicode text", "type": "unicode"}


@pytest.mark.timeout(10)
def test_the_retry_policy_is_scaled_and_capped_by_the_settings() -> None:
    settings = Settings(retry_base_s=0.5, retry_max_s=10)
    backoff = RetryPolicy(base_s=2.0, max_s=30.0).backoff(settings)
    first = [backoff.compute(0) for _ in range(200)]  # full jitter up to 2.0 * 0.5
    late = [backoff.compute(20) for _ in range(200)]  # up to min(30, 10)
    assert max(first) <= 1.0 < 2 * max(first)
    assert max(late) <= 10.0 < 2 * max(late)
