"""Request bodies: JSON read within a size and a nesting limit, as the handlers take it,
and the submit body checked against its job type."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .errors import DETAILS_MAX, BadRequest, PayloadTooLarge, RequestTimeout, ValidationFailed
from .jobs import JobType, Registry
from .models import SubmitRequest

# How deep a request body may nest. Ours nest 3 deep; past ~990 the parser itself fails
# (RecursionError), and well before that every recursive walk after it (validation,
# encoding, the log redactor) would, each nearer the interpreter's limit than the last.
MAX_DEPTH = 64


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request: Request, limit: int, timeout_s: float) -> Any:
    """The body as JSON, read no further than ``limit`` bytes and within ``timeout_s``,
    nested at most MAX_DEPTH deep; ``NaN`` and ``Infinity`` (Python's, not JSON's) are
    refused."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over {limit} bytes")
    try:
        async with asyncio.timeout(timeout_s):
            body = await _read(request, limit)
    except TimeoutError:
        raise RequestTimeout(f"the request's body did not arrive within {timeout_s:g} s") from None
    try:
        value = json.loads(body, parse_constant=_not_a_number)
    except RecursionError as exc:
        raise _too_deep() from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    # Only a body with that many brackets can nest that deep: most are never walked.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth_over(value, MAX_DEPTH):
        raise _too_deep()
    return value


async def _read(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_deep() -> BadRequest:
    return BadRequest(f"the body nests deeper than {MAX_DEPTH} levels", code="json_too_deep")


def _depth_over(value: Any, limit: int) -> bool:
    """Does ``value`` nest lists and objects more than ``limit`` deep? (No recursion.)"""
    todo: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                todo.append((child, depth + 1))
    return False


def validation_details(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """pydantic's errors, without the input (the error body would echo it back), the
    first DETAILS_MAX of them."""
    return [
        {"loc": [*prefix, *map(str, e["loc"])], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)[:DETAILS_MAX]
    ]


def parse_submit(raw: Any, types: Registry) -> tuple[SubmitRequest, JobType[Any], BaseModel]:
    try:
        req = SubmitRequest.model_validate(raw)
    except ValidationError as exc:
        raise ValidationFailed(
            "the request body is invalid", details=validation_details(exc)
        ) from exc
    job_type = types.get(req.type)
    if job_type is None:
        raise ValidationFailed(
            f"unknown job type {req.type!r}",
            code="unknown_job_type",
            details={"known": sorted(types.types)},
        )
    schema_errors = job_type.schema_errors(req.payload)
    if schema_errors:  # held to the published schema: no silent coercion ("3" -> 3)
        raise ValidationFailed(
            f"the payload does not match the {req.type!r} job type", details=schema_errors
        )
    try:
        payload = job_type.payload_model.model_validate(req.payload)
    except ValidationError as exc:
        raise ValidationFailed(
            f"the payload does not match the {req.type!r} job type",
            details=validation_details(exc, ("payload",)),
        ) from exc
    return req, job_type, payload
