"""The exceptions pushsvc raises, and the JSON error shape they turn into.

PushsvcError                 code, message, details; never reaches a user as a 500
├── ApiError                 has an HTTP status
│   ├── BadRequest           400  malformed JSON, bad cursor or event id
│   ├── Unauthorized         401  no, bad or expired credentials
│   ├── NotFound             404  unknown job, or a job of another tenant
│   ├── Conflict             409  the job is in the wrong state
│   ├── PayloadTooLarge      413
│   ├── ValidationFailed     422  payload does not match the job type's model
│   ├── RateLimited          429  with retry_after_s
│   └── Unavailable          503  Redis unreachable
└── JobError                 raised inside a job: code, message, retryable
    ├── RetryableJobError    retried with backoff while attempts remain
    └── FatalJobError        fails the job at once
"""

from __future__ import annotations

from typing import Any


class PushsvcError(Exception):
    code = "error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class ApiError(PushsvcError):
    status_code = 500
    headers: dict[str, str] | None = None


class BadRequest(ApiError):
    status_code, code = 400, "bad_request"


class Unauthorized(ApiError):
    status_code, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class NotFound(ApiError):
    status_code, code = 404, "not_found"


class Conflict(ApiError):
    status_code, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status_code, code = 413, "payload_too_large"


class ValidationFailed(ApiError):
    status_code, code = 422, "validation_error"


class RateLimited(ApiError):
    status_code, code = 429, "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.headers = {"Retry-After": str(max(1, retry_after_s))}


class Unavailable(ApiError):
    status_code, code = 503, "unavailable"
    headers = {"Retry-After": "1"}


class JobError(PushsvcError):
    """Raised by job functions; ``retryable`` decides whether another attempt is made."""

    code = "job_error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        retry_after_s: float | None = None,
        details: Any = None,
        result: Any = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        if retryable is not None:
            self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.result = result  # partial results, kept on the failed job

    def info(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class RetryableJobError(JobError):
    code, retryable = "retryable_error", True


class FatalJobError(JobError):
    code, retryable = "fatal_error", False
