"""Pydantic models at the edges: the job snapshot, the submit body, statuses."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

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


class JobSnapshot(BaseModel):
    """What ``GET /v1/jobs/{id}`` returns and the ``snapshot`` event carries."""

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
    seq: int = 0
    epoch: str = Field("", description="the history ``seq`` counts in; see stream positions")


class SubmitRequest(BaseModel):
    """The body of ``POST /v1/jobs``; ``payload`` is validated by the type's own model."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=100)
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = Priority.NORMAL
