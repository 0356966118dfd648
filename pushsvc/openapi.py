"""The OpenAPI 3.1 document (``/openapi.json``), derived rather than kept beside the
routes: every route of the app, walked in order, says what it is with its handler's
``@operation`` (``operations.py``); JSON bodies are the models of ``models.py``, payload
schemas come from the job registry. The pages over it are in ``docs.py``.

Where we diverge from the libraries, and why:

- Not a generator such as spectree (documentation mode) or apispec: spectree documents
  JSON models only (no SSE streams, response headers, 304, the links the stateful
  schemathesis run follows, shared error responses), names components ``Model.<hash>``
  and wraps every handler to validate (``skip_validation`` still wraps). Payloads are
  validated jsonschema-first (``jobs.py``: held to the schema the registry publishes, no
  lax coercion), so the document only describes them; the models are pydantic's.
- Not Starlette's ``schemas.BaseSchemaGenerator.get_endpoints`` itself, only its idiom:
  it orders a route's methods as a set (the document would change order between
  processes), skips mounted apps, and reads YAML from docstrings where we keep a typed
  declaration.
- Not pydantic's JSON Schema as is: a model extending another documented one is
  ``allOf: [the base, its own fields]`` (a ``Job`` reads as a snapshot plus links;
  pydantic copies the base's fields in).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeGuard

from pydantic import BaseModel
from pydantic.json_schema import (
    GenerateJsonSchema,
    JsonSchemaMode,
    JsonSchemaValue,
    models_json_schema,
)
from pydantic_core import core_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from .errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from .jobs import Registry
from .models import Error, SubmitRequest
from .operations import (
    JSON,
    PATH_PARAMS,
    Operation,
    Param,
    Reply,
    Schema,
    declaration,
    method_handlers,
    public,
)
from .responses import JSONResponse
from .settings import Settings

REF = "#/components/schemas/{model}"
Refs = dict[tuple[type[Any], JsonSchemaMode], Schema]

# What each error type means to a client here, and the headers its answer carries.
ERRORS: dict[type[ApiError], tuple[str, tuple[str, ...]]] = {
    BadRequest: ("malformed JSON, bad cursor, event id or Idempotency-Key", ()),
    Unauthorized: ("no, bad or expired credentials", ("WWW-Authenticate",)),
    NotFound: ("unknown job, or a job of another tenant (never told apart)", ()),
    Conflict: ("the job is in the wrong state, or an Idempotency-Key was reused", ()),
    PayloadTooLarge: ("the body is over PUSHSVC_MAX_BODY_BYTES", ()),
    ValidationFailed: ("the body or a parameter does not match its schema", ()),
    RateLimited: ("too many requests; wait Retry-After seconds", ("Retry-After",)),
    Unavailable: ("Redis is unreachable (or streaming is off)", ("Retry-After",)),
}
# Every authenticated call may be refused, rate limited, and needs Redis.
AUTHENTICATED_ERRORS: tuple[type[ApiError], ...] = (Unauthorized, RateLimited, Unavailable)
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "stream": [{"apiKey": []}, {"streamToken": []}],
    "none": [],
}
TAGS = {
    "jobs": "submit, poll, cancel, retry",
    "streams": "Server-Sent Events and stream tokens",
    "ops": "health, readiness, metrics, stats",
    "web": "the browser console",
}
SECURITY_SCHEMES = {
    "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key"},
    "streamToken": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "a signed stream token (links.events, POST /v1/stream-tokens)",
    },
}


class Endpoint(NamedTuple):
    path: str  # as documented: ``/v1/jobs/{job_id}``, a mount's files ``/static/{path}``
    path_params: tuple[str, ...]
    method: str
    operation: Operation


def endpoints(routes: Iterable[BaseRoute]) -> Iterator[Endpoint]:
    """Every route's operations, in the order of the routes; a route without a
    declaration fails here (or leaves the document with ``include_in_schema=False``)."""
    for route in routes:
        if not getattr(route, "include_in_schema", True):
            continue
        if isinstance(route, Route):
            params = tuple(route.param_convertors)
            for method, handler in _handlers(route).items():
                yield Endpoint(route.path_format, params, method, _declared(handler, method, route))
        elif isinstance(route, Mount) and not route.routes:  # an app: its files, GET
            params = tuple(route.param_convertors)
            yield Endpoint(route.path_format, params, "get", _declared(route.app, "get", route))
        else:
            raise TypeError(f"cannot document a route of this kind: {route!r}")


def _handlers(route: Route) -> dict[str, object]:
    if route.methods is None:
        raise TypeError(f"{route.path}: give the route its methods to document them")
    served = sorted(m.lower() for m in route.methods if m != "HEAD")  # HEAD: GET's
    per_method = method_handlers(route.endpoint)
    if per_method is None:
        return {m: route.endpoint for m in served}
    handlers = {m.lower(): h for m, h in per_method.items()}
    if sorted(handlers) != served:
        raise ValueError(f"{route.path}: serves {served}, has handlers for {sorted(handlers)}")
    return handlers


def _declared(handler: object, method: str, route: BaseRoute) -> Operation:
    found = declaration(handler)
    if found is None:
        path = getattr(route, "path", route)
        raise LookupError(f"{method.upper()} {path} declares no @operation (operations.py)")
    if found.tag not in TAGS:
        raise ValueError(f"{found.id}: no tag {found.tag!r} in the document")
    return found


class DocumentSchema(GenerateJsonSchema):
    """pydantic's JSON Schema, but a response model that extends another one with fields
    is ``allOf`` the base and its own fields (the base stays one component)."""

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        full = super().model_schema(schema)
        base = schema["cls"].__bases__[0]
        if self.mode != "serialization" or not _has_fields(base):
            return full
        own = {k: v for k, v in full["properties"].items() if k not in base.model_fields}
        required = [name for name in full.get("required", ()) if name in own]
        extension = {"type": "object", "properties": own, "required": required}
        described: Schema = {k: full[k] for k in ("title", "description") if k in full}
        base_ref = self.generate_inner(base.__pydantic_core_schema__)
        return {"allOf": [base_ref, extension], **described}


def _has_fields(cls: type) -> TypeGuard[type[BaseModel]]:
    return issubclass(cls, BaseModel) and bool(cls.model_fields)


def _component_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _model_schemas(types: Registry, bodies: Iterable[type[BaseModel]]) -> tuple[Refs, Schema]:
    """The refs to every response model, request model and payload model, and their
    component schemas. One pass over all: two payload classes of the same name in
    different modules get distinct component names instead of overwriting each other."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((model, "serialization") for model in bodies),
        (SubmitRequest, "validation"),
        *((t.payload_model, "validation") for t in types.types.values()),
    ]
    refs, top = models_json_schema(
        list(dict.fromkeys(wanted)), ref_template=REF, schema_generator=DocumentSchema
    )
    schemas: Schema = top.get("$defs", {})
    # SubmitRequest's payload is any object to pydantic; the document says which one.
    submit = schemas.pop(refs[(SubmitRequest, "validation")]["$ref"].rsplit("/", 1)[1])
    payloads = {n: refs[(t.payload_model, "validation")] for n, t in types.types.items()}
    schemas.update(_submit_schemas(types, submit["properties"], payloads))
    found: Refs = {key: ref for key, ref in refs.items()}
    found[(SubmitRequest, "validation")] = {"$ref": REF.format(model="SubmitJob")}
    return found, schemas


def _submit_schemas(types: Registry, submit: Schema, payloads: dict[str, Schema]) -> Schema:
    """``SubmitJob``: one variant per registered type, told apart by ``type``."""
    variants: dict[str, Schema] = {}
    mapping: dict[str, str] = {}
    for name, job_type in sorted(types.types.items()):
        component = _component_name(f"Submit.{name}")
        payload_required = bool(job_type.payload_model.model_json_schema().get("required"))
        variants[component] = {
            "type": "object",
            "description": job_type.description or f"a {name!r} job",
            "properties": {
                "type": {"const": name},
                "payload": payloads[name],
                "priority": submit["priority"],
            },
            "required": ["type", "payload"] if payload_required else ["type"],
            "additionalProperties": False,
        }
        mapping[name] = REF.format(model=component)
    variants["SubmitJob"] = {
        "description": "The body of POST /v1/jobs; `payload` follows the type's schema.",
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "type", "mapping": mapping},
    }
    return variants


class _Builder:
    """Turns declarations into the document's operations, collecting the shared
    parameters as it meets them."""

    def __init__(self, refs: Refs, settings: Settings) -> None:
        self.refs, self.settings = refs, settings
        self.parameters: dict[str, Schema] = {}

    def param(self, p: Param) -> Schema:
        schema = p.schema(self.settings) if callable(p.schema) else dict(p.schema)
        out: Schema = {"in": p.where, "name": p.name, "schema": schema}
        out["description"] = p.description
        if p.where == "path":
            out["required"] = True
        if p.explode:
            out |= {"style": "form", "explode": True}
        if p.component is None:
            return out
        if self.parameters.setdefault(p.component, out) != out:
            raise ValueError(f"two parameters are called {p.component!r}")
        return {"$ref": f"#/components/parameters/{p.component}"}

    def operation(self, op: Operation) -> Schema:
        out: Schema = {"operationId": op.id, "tags": [op.tag], "summary": op.summary}
        if op.params:
            out["parameters"] = [self.param(p) for p in op.params]
        if op.body is not None:
            schema = self.refs[(op.body, "validation")]
            out["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
        if op.auth in SECURITY:
            out["security"] = SECURITY[op.auth]
        kinds = set(op.errors) | (set(AUTHENTICATED_ERRORS) if op.auth != "none" else set())
        errors = {
            str(kind.status_code): {"$ref": f"#/components/responses/{_error_name(kind)}"}
            for kind in sorted(kinds, key=lambda kind: kind.status_code)
        }
        out["responses"] = {**{str(r.status): self.reply(r) for r in op.replies}, **errors}
        return out

    def reply(self, r: Reply) -> Schema:
        out: Schema = {"description": r.description}
        if r.body is not None:
            out["content"] = {JSON: {"schema": self.refs[(r.body, "serialization")]}}
        elif r.schema is not None:
            out["content"] = {r.media: {"schema": dict(r.schema)}}
        if r.headers:
            out["headers"] = {h.name: _header(h.description) for h in r.headers}
        if r.links:
            follow = {"job_id": "$response.body#/id"}
            out["links"] = {i: {"operationId": i, "parameters": follow} for i in r.links}
        return out


def _error_name(kind: type[ApiError]) -> str:
    if kind not in ERRORS:
        raise LookupError(f"{kind.__name__} is not among the document's ERRORS")
    return kind.__name__


def _header(description: str) -> Schema:
    return {"description": description, "schema": {"type": "string"}}


def _error_responses(refs: Refs) -> Schema:
    """One shared response per error type: the ``Error`` body, its headers."""
    responses: Schema = {}
    for kind, (description, headers) in ERRORS.items():
        responses[kind.__name__] = {
            "description": description,
            "content": {JSON: {"schema": refs[(Error, "serialization")]}},
        }
        if headers:
            responses[kind.__name__]["headers"] = {h: _header(h) for h in headers}
    return responses


def _paths(found: list[Endpoint], builder: _Builder) -> Schema:
    """The path items; a path's parameters (its route names them) are the item's."""
    paths: Schema = {}
    for path, params, method, op in found:
        if path not in paths and params:
            paths[path] = {"parameters": [builder.param(_path_param(p)) for p in params]}
        paths.setdefault(path, {})[method] = builder.operation(op)
    return paths


def _path_param(name: str) -> Param:
    if name not in PATH_PARAMS:
        raise LookupError(f"a route names {{{name}}}: say what it is in PATH_PARAMS")
    return PATH_PARAMS[name]


def openapi_document(
    types: Registry, settings: Settings | None = None, *, routes: Sequence[BaseRoute]
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (``app.ROUTES``, or a running app's); payloads
    follow ``types``' models; limits the operator sets come from ``settings``."""
    settings = settings or Settings.model_construct()  # the defaults, not the environment
    found = list(endpoints(routes))
    # Error: the body of the shared error responses, which no operation names itself.
    bodies = [r.body for *_, op in found for r in op.replies if r.body is not None] + [Error]
    refs, schemas = _model_schemas(types, bodies)
    builder = _Builder(refs, settings)
    paths = _paths(found, builder)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pushsvc",
            "version": "1",
            "description": "Long-running LLM jobs whose progress is pushed over SSE.",
        },
        "security": [{"apiKey": []}],
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": _error_responses(refs),
            "parameters": builder.parameters,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def served_document(request: Request) -> dict[str, Any]:
    """The document of the app serving ``request``."""
    svc = request.app.state.services
    return openapi_document(svc.types, svc.settings, routes=request.app.routes)


@public("openapi", "ops", "This document", schema={"type": "object"})
async def openapi_endpoint(request: Request) -> Response:
    """``GET /openapi.json``."""
    return JSONResponse(served_document(request))


routes: list[BaseRoute] = [Route("/openapi.json", openapi_endpoint, methods=["GET"])]
