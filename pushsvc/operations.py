"""What each endpoint says of itself for the API document: ``@operation(...)`` on the
handler stores one frozen :class:`Operation` (id, tag, summary, parameters, request body,
responses as models, error types, security); ``openapi.py`` reads it back as it walks
``app.routes``, so a route and its documentation cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from .errors import ApiError
from .settings import Settings

JSON = "application/json"
SSE = "text/event-stream"
HTML = "text/html"
Schema = dict[str, Any]
TEXT: Schema = {"type": "string"}  # a page, a stream, a text body
# Who may call: an API key (the document's default), a key or a stream token, anyone.
Auth = Literal["key", "stream", "none"]
Endpoint = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")

ATTRIBUTE = "openapi_operation"  # where @operation keeps the declaration on its target


@dataclass(frozen=True)
class Header:
    """A response header."""

    name: str
    description: str


@dataclass(frozen=True)
class Param:
    """A parameter; ``component`` shares it under ``components/parameters``; a callable
    ``schema`` is given the settings (a limit the operator sets)."""

    where: Literal["query", "header", "path"]
    name: str
    description: str
    schema: Schema | Callable[[Settings], Schema] = field(
        default_factory=lambda: {"type": "string"}
    )
    component: str | None = None
    explode: bool = False  # a repeated query parameter: ``?job=a&job=b``


@dataclass(frozen=True)
class Reply:
    """One response: a JSON body given by a model, or ``media`` and ``schema`` (pages,
    streams, files), or no body. ``links``: the operations a client may follow next,
    with this body's ``id`` as their ``job_id``."""

    status: int
    description: str
    body: type[BaseModel] | None = None
    headers: tuple[Header, ...] = ()
    media: str = JSON
    schema: Schema | None = None
    links: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    """An endpoint's declaration. ``errors`` are the error types it answers besides
    those of every authenticated call (401, 429, 503, which the document adds)."""

    id: str
    tag: str
    summary: str
    replies: tuple[Reply, ...]
    errors: tuple[type[ApiError], ...] = ()
    params: tuple[Param, ...] = ()
    body: type[BaseModel] | None = None
    auth: Auth = "key"


def operation(
    op_id: str,
    tag: str,
    summary: str,
    *replies: Reply,
    errors: tuple[type[ApiError], ...] = (),
    params: tuple[Param, ...] = (),
    body: type[BaseModel] | None = None,
    auth: Auth = "key",
) -> Callable[[T], T]:
    """Declare what the decorated handler (or a mounted app) is, for the document."""
    declared = Operation(op_id, tag, summary, replies, errors, params, body, auth)

    def attach(target: T) -> T:
        setattr(target, ATTRIBUTE, declared)
        return target

    return attach


def public(
    op_id: str,
    tag: str,
    summary: str,
    body: type[BaseModel] | None = None,
    *,
    media: str = JSON,
    schema: Schema | None = None,
    more: tuple[Reply, ...] = (),
    errors: tuple[type[ApiError], ...] = (),
) -> Callable[[T], T]:
    """An endpoint anyone may call (no credentials), whose 200 is what ``summary`` says."""
    ok = Reply(200, summary, body, media=media, schema=schema)
    return operation(op_id, tag, summary, ok, *more, errors=errors, auth="none")


def schema_ref(model: type) -> Schema:
    """A reference to ``model``'s component (one the document's models reach)."""
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def declaration(target: object) -> Operation | None:
    """What ``target`` declared with :func:`operation`, if anything."""
    found = getattr(target, ATTRIBUTE, None)
    return found if isinstance(found, Operation) else None


def by_method(**handlers: Endpoint) -> Endpoint:
    """One endpoint for a path whose methods have handlers (and declarations) of their
    own: one Route per path, so a 405's Allow header names every method. HEAD is GET's."""

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    endpoint.handlers = handlers  # type: ignore[attr-defined]  # read by the document
    return endpoint


def method_handlers(endpoint: object) -> dict[str, object] | None:
    """The per-method handlers of a :func:`by_method` endpoint, else None."""
    handlers = getattr(endpoint, "handlers", None)
    return dict(handlers) if isinstance(handlers, dict) else None


# The path parameters routes name, once for every route that has them.
PATH_PARAMS = {
    "job_id": Param("path", "job_id", "the job's id", component="JobId"),
    "path": Param("path", "path", "a file"),
}
