"""The exceptions pushsvc raises, and the JSON error shape they turn into.

PushsvcError                 code, message, details; never reaches a user as a 500
├── ApiError                 has an HTTP status
│   ├── BadRequest           400  malformed JSON, bad cursor or event id
│   ├── Unauthorized         401  no, bad or expired credentials
│   ├── Forbidden            403  a cross-site request to a keyless API
│   ├── NotFound             404  unknown job, or a job of another tenant
│   ├── RequestTimeout       408  the body did not arrive in time (connection closed)
│   ├── Conflict             409  the job is in the wrong state
│   ├── PayloadTooLarge      413
│   ├── UnsupportedMediaType 415  a body that is not application/json
│   ├── MisdirectedRequest   421  a Host name a keyless API does not answer to
│   ├── ValidationFailed     422  payload does not match the job type's model
│   ├── RateLimited          429  with retry_after_s
│   └── Unavailable          503  Redis unreachable
└── JobError                 raised inside a job: code, message, retryable
    ├── RetryableJobError    retried with backoff while attempts remain
    └── FatalJobError        fails the job at once

Error bodies quote the request back (a job id, a field name, a value in a schema
message): every string in one is clipped to ECHO_MAX characters (:func:`clip`), so a
200,000-character prompt does not come back in its 422.
"""

from __future__ import annotations

from typing import Any

ECHO_MAX = 200  # characters of any one string an error body carries
DETAILS_MAX = 50  # entries of a details list (one per problem) an error body carries


def clip(text: str, limit: int = ECHO_MAX) -> str:
    """``text``, or when longer than ``limit`` its head and tail around a marker that
    gives the original length, ``limit`` characters in all (the tail keeps what follows a
    quoted value: "... is too long")."""
    if len(text) <= limit:
        return text
    marker = f"…[{len(text)} characters]…"
    room = max(limit - len(marker), 2)
    tail = room // 4
    return f"{text[: room - tail]}{marker}{text[len(text) - tail :]}"


def clipped(value: Any) -> Any:
    """``value`` (JSON-like) with every string in it clipped, keys included."""
    if isinstance(value, str):
        return clip(value)
    if isinstance(value, dict):
        return {clipped(k): clipped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clipped(v) for v in value]
    return value


class PushsvcError(Exception):
    code = "error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        """The JSON error shape, each string clipped (see :func:`clip`)."""
        error = {"code": self.code, "message": self.message, "details": self.details}
        return {"error": clipped(error)}


class ApiError(PushsvcError):
    status_code = 500
    headers: dict[str, str] | None = None


class BadRequest(ApiError):
    status_code, code = 400, "bad_request"


class Unauthorized(ApiError):
    status_code, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ApiError):
    status_code, code = 403, "forbidden"


class NotFound(ApiError):
    status_code, code = 404, "not_found"


class Conflict(ApiError):
    status_code, code = 409, "conflict"


class RequestTimeout(ApiError):
    """The body did not arrive in time; the connection is closed after the answer (the
    rest of the body, if it comes, is not read as another request)."""

    status_code, code = 408, "request_timeout"
    headers = {"Connection": "close"}


class PayloadTooLarge(ApiError):
    status_code, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status_code, code = 415, "unsupported_media_type"


class MisdirectedRequest(ApiError):
    status_code, code = 421, "misdirected_request"


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
