"""The error tree and its JSON shape (pushsvc/errors.py): codes, statuses, headers, and
the clipping of what an error body quotes back."""

from __future__ import annotations

import pytest

from pushsvc import errors
from pushsvc.errors import (
    DETAILS_MAX,
    ECHO_MAX,
    FatalJobError,
    JobError,
    NotFound,
    PushsvcError,
    RateLimited,
    RetryableJobError,
    Unauthorized,
    clip,
)


@pytest.mark.timeout(10)
def test_to_dict_has_the_contract_shape() -> None:
    err = NotFound("no job 'x'", code="job_not_found", details={"id": "x"})
    assert err.to_dict() == {
        "error": {"code": "job_not_found", "message": "no job 'x'", "details": {"id": "x"}}
    }
    assert PushsvcError("boom").to_dict()["error"]["code"] == "error"


@pytest.mark.timeout(10)
def test_every_string_in_an_error_body_is_clipped() -> None:
    long = "x" * 200_000
    body = errors.ValidationFailed(long, details=[{long: long}]).to_dict()["error"]
    assert len(body["message"]) == ECHO_MAX
    ((key, value),) = body["details"][0].items()
    assert len(key) == len(value) == ECHO_MAX
    assert "[200000 characters]" in body["message"]


@pytest.mark.timeout(10)
def test_clip_keeps_short_text_and_the_head_and_tail_of_long_text() -> None:
    assert clip("short") == "short"
    text = "HEAD" + "m" * 1000 + "TAIL"
    clipped = clip(text, 60)
    assert len(clipped) == 60
    assert clipped.startswith("HEAD") and clipped.endswith("TAIL")
    assert DETAILS_MAX > 0


@pytest.mark.timeout(10)
def test_each_api_error_has_its_own_status_and_code() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type)]
    api = [c for c in classes if issubclass(c, errors.ApiError) and c is not errors.ApiError]
    statuses = {c.status_code for c in api}
    assert len(statuses) == len(api) and all(400 <= s < 600 for s in statuses)
    assert len({c.code for c in api}) == len(api)


@pytest.mark.timeout(10)
def test_headers_of_auth_and_rate_limits() -> None:
    assert Unauthorized("x").headers == {"WWW-Authenticate": "Bearer"}
    assert RateLimited("slow down", retry_after_s=7).headers == {"Retry-After": "7"}
    assert RateLimited("slow down", retry_after_s=0).headers == {"Retry-After": "1"}


@pytest.mark.timeout(10)
def test_job_errors_say_whether_they_are_retried() -> None:
    assert RetryableJobError("x").info() == {
        "code": "retryable_error",
        "message": "x",
        "retryable": True,
    }
    assert FatalJobError("x").retryable is False
    assert JobError("x").retryable is False
    err = JobError("x", code="c", retryable=True, result={"partial": 1})
    assert err.info()["retryable"] is True and err.result == {"partial": 1}
