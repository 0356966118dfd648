"""Job types: the ``@job_type`` decorator, the registry, and each type's payload checks.
``JobContext`` (context.py) is re-exported: job modules import both from here (README)."""

from __future__ import annotations

import functools
import importlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from jsonschema import Draft202012Validator, ValidationError
from pydantic import BaseModel

from .backoff import FullJitterBackoff
from .context import JobContext as JobContext  # re-exported: job modules import it from here
from .errors import DETAILS_MAX, ECHO_MAX, clip
from .settings import Settings

P = TypeVar("P", bound=BaseModel)
JobFunc = Callable[[JobContext, Any], Awaitable[Any]]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, for retryable errors only."""

    base_s: float = 1.0
    max_s: float = 60.0

    def backoff(self, settings: Settings) -> FullJitterBackoff:
        """The type's policy scaled by ``retry_base_s`` and capped at ``retry_max_s``."""
        cap = min(self.max_s, settings.retry_max_s)
        return FullJitterBackoff(cap=cap, base=self.base_s * settings.retry_base_s)


@dataclass(frozen=True)
class JobType(Generic[P]):  # noqa: B903
    name: str
    func: JobFunc
    payload_model: type[P]
    timeout_s: float
    max_attempts: int
    retry: RetryPolicy
    description: str = ""

    @functools.cached_property
    def _validator(self) -> Draft202012Validator:
        return Draft202012Validator(self.payload_model.model_json_schema())

    def schema_errors(self, payload: Any) -> list[dict[str, Any]]:
        """Where ``payload`` breaks the type's published JSON Schema (empty: it fits), or
        holds text that is not Unicode (a lone surrogate, which JSON's ``\\ud800`` can
        carry: no model call or store could take it later)."""
        # The first DETAILS_MAX: 100,000 wrong items are 100,000 errors, each quoting one.
        found = [
            {
                "loc": ["payload", *(_printable(str(p)) for p in e.absolute_path)],
                "msg": _printable(_message(e)),
                "type": e.validator,
            }
            for e in itertools.islice(self._validator.iter_errors(payload), DETAILS_MAX)
        ]
        return found + [
            {"loc": ["payload", *path], "msg": "not valid Unicode text", "type": "unicode"}
            for path in _broken_text(payload, [])[: DETAILS_MAX - len(found)]
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "timeout_s": self.timeout_s,
            "max_attempts": self.max_attempts,
            "payload_schema": self.payload_model.model_json_schema(),
        }


def _message(error: ValidationError) -> str:
    """jsonschema's message with the value it quotes clipped: ``'<200,000 characters>' is
    too long`` keeps its head, its length and what it says of it."""
    message = str(error.message)
    if len(message) <= ECHO_MAX:
        return message
    quoted = repr(error.instance)
    if quoted not in message:
        return message  # clipped whole, with the other strings of the error body
    room = ECHO_MAX - (len(message) - len(quoted))
    return message.replace(quoted, clip(quoted, max(room, ECHO_MAX // 4)))


def _broken_text(value: Any, path: list[str]) -> list[list[str]]:
    """The paths of strings (keys too) in a parsed JSON value that UTF-8 cannot encode."""
    if isinstance(value, str):
        return [] if _encodes(value) else [path]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _broken_text(v, [*path, str(i)])]
    if isinstance(value, dict):
        found = [[*path, _printable(k)] for k in value if not _encodes(k)]
        inner = (_broken_text(v, [*path, _printable(k)]) for k, v in value.items())
        return found + [p for paths in inner for p in paths]
    return []


def _printable(text: str) -> str:
    """``text`` as an error may quote it: a lone surrogate as its escape."""
    return text if _encodes(text) else text.encode("utf-8", "backslashreplace").decode()


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Registry:
    types: dict[str, JobType[Any]] = field(default_factory=dict)

    def add(self, job_type: JobType[Any]) -> None:
        if job_type.name in self.types:
            raise ValueError(f"job type {job_type.name!r} is registered twice")
        self.types[job_type.name] = job_type

    def get(self, name: str) -> JobType[Any] | None:
        return self.types.get(name)


# The registry decorated functions join; like a route table, it is filled at import time.
registry = Registry()

# The built-in types, loaded like any module named in ``PUSHSVC_JOB_MODULES``.
BUILTIN_MODULES = ("pushsvc.ticker", "pushsvc.llm_jobs")


def summary(doc: str | None) -> str:
    """A job type's description: its docstring's first paragraph, on one line (its first
    line alone cut sentences mid-way)."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(first.split())


def load_job_modules(settings: Settings) -> Registry:
    """Fill the registry an entry point serves: the built-in types, then the settings'
    ``job_modules``; each module registers its types (``@job_type``) as it is imported."""
    for name in (*BUILTIN_MODULES, *settings.job_modules):
        importlib.import_module(name)
    return registry


def job_type(
    name: str,
    *,
    payload: type[BaseModel],
    timeout_s: float = 300.0,
    max_attempts: int = 3,
    retry: RetryPolicy | None = None,
    target: Registry | None = None,
) -> Callable[[JobFunc], JobFunc]:
    """Register ``async def fn(ctx, payload)`` as the job type ``name``."""

    def decorate(func: JobFunc) -> JobFunc:
        (target or registry).add(
            JobType(
                name=name,
                func=func,
                payload_model=payload,
                timeout_s=timeout_s,
                max_attempts=max_attempts,
                retry=retry or RetryPolicy(),
                description=summary(func.__doc__),
            )
        )
        return func

    return decorate
