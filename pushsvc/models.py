"""Pydantic models at the edges: statuses, the job snapshot, the submit body, and every
JSON response body (the API document's schemas are these models)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class ErrorInfo(BaseModel):
    code: str
    message: str
    retryable: bool = False


def _epoch_optional(schema: dict[str, Any]) -> None:
    # A ``snapshot`` event leaves ``epoch`` out: its SSE id carries the position whole.
    if "epoch" in schema.get("required", ()):
        schema["required"].remove("epoch")


class Waiting(BaseModel):
    """Why an attempt is not moving, and until when (epoch seconds; ``null``: unknown)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    reason: Literal["backoff", "tenant_limit", "rate_limited", "model_limit"]
    until: float | None = None


class LLMTelemetry(BaseModel):
    """What the model call of the current attempt is doing (updated while text streams)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    model: str
    ttft_s: float | None = Field(None, description="seconds from the request to the first token")
    tokens_per_s: float | None = Field(None, description="answer tokens a second since the first")
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    estimated: bool = Field(False, description="token counts estimated from characters")
    cost_usd: float | None = Field(None, description="from PUSHSVC_LLM_PRICES; null: no price")


class JobSnapshot(BaseModel):
    """What ``GET /v1/jobs/{id}`` returns and the ``snapshot`` event carries."""

    # Dumped whole: every field is in a response (the document says required).
    model_config = ConfigDict(
        json_schema_serialization_defaults_required=True, json_schema_extra=_epoch_optional
    )

    id: str
    type: str
    status: JobStatus
    progress: float = 0.0
    stage: str | None = None
    message: str | None = None
    output: str = ""
    result: Any = None
    error: ErrorInfo | None = None
    attempt: int = 1
    max_attempts: int = 1
    priority: Priority = Priority.NORMAL
    created_at: float = Field(description="epoch seconds")
    started_at: float | None = None
    finished_at: float | None = None
    eta_s: float | None = None
    queue_position: int | None = Field(
        None, description="a queued attempt's place in line: 1 starts next (null: not in line)"
    )
    starts_in_s: float | None = Field(
        None, description="seconds until the queued attempt starts, at the measured start rate"
    )
    waiting: Waiting | None = None
    llm: LLMTelemetry | None = None
    seq: int = 0
    epoch: str = Field("", description="the history ``seq`` counts in; see stream positions")


class SubmitRequest(BaseModel):
    """The body of ``POST /v1/jobs``; ``payload`` is validated by the type's own model."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=100)
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = Priority.NORMAL


# -- response bodies: always dumped whole, so every field is required in the document --

BODY = ConfigDict(json_schema_serialization_defaults_required=True)


class JobLinks(BaseModel):
    model_config = BODY

    self: str
    events: str = Field(description="the job's stream, with a job-scoped token")
    events_expires_at: int


class Job(JobSnapshot):
    """A snapshot with its links: what the job endpoints answer."""

    links: JobLinks


class CancelRequested(Job):
    """A running job whose cancel is under way: it ends `cancelled` when its task stops."""

    cancel_requested: Literal[True] = True


class JobPage(BaseModel):
    model_config = BODY

    jobs: list[Job]
    next_cursor: str | None


class JobTypeInfo(BaseModel):
    model_config = BODY

    name: str
    description: str
    timeout_s: float
    max_attempts: int
    payload_schema: dict[str, Any]


class JobTypes(BaseModel):
    model_config = BODY

    types: list[JobTypeInfo]


class StreamToken(BaseModel):
    model_config = BODY

    token: str
    expires_at: int
    events_url: str


class Stats(BaseModel):
    """queue depth, running, throughput, success rate, durations, alerts"""

    model_config = BODY

    window_s: float
    at: float
    overall: dict[str, Any]
    types: dict[str, dict[str, Any]]
    workers: int
    alerts: list[dict[str, Any]]


class Health(BaseModel):
    model_config = BODY

    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    model_config = BODY

    status: Literal["ok", "unavailable"]
    redis: bool


class ErrorFields(BaseModel):
    model_config = BODY

    code: str
    message: str
    details: Any


class Error(BaseModel):
    """The body of every error answer."""

    model_config = BODY

    error: ErrorFields
