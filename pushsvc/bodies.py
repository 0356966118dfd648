"""Request bodies: JSON read within a size and a nesting limit, as the handlers take it."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from .errors import BadRequest, PayloadTooLarge

# How deep a request body may nest. Ours nest 3 deep; past ~990 the parser itself fails
# (RecursionError), and well before that every recursive walk after it (validation,
# encoding, the log redactor) would, each nearer the interpreter's limit than the last.
MAX_DEPTH = 64


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, read no further than ``limit`` bytes, nested at most MAX_DEPTH
    deep; ``NaN`` and ``Infinity`` (Python's, not JSON's) are refused."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
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
