"""The OpenAPI 3.1 document of every endpoint (``/openapi.json``), the API reference over
it (``/docs``: Swagger UI, served from the ``swagger-ui-bundle-v2`` package, no other
origin) and a plain HTML view (``/docs/plain``, no scripts); payload schemas come from the
job registry.
"""

from __future__ import annotations

import html
import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from .jobs import Registry
from .models import JobSnapshot, SubmitRequest
from .responses import JSONResponse
from .settings import Settings
from .web import PAGE_HEADERS, Assets, swagger_ui_dir, web_dir

REF = "#/components/schemas/{model}"
JSON = "application/json"
SSE = "text/event-stream"
Schema = dict[str, Any]

# (status, component name, description, headers) of the shared error responses.
ERRORS: list[tuple[int, str, str, tuple[str, ...]]] = [
    (400, "BadRequest", "malformed JSON, bad cursor, event id or Idempotency-Key", ()),
    (401, "Unauthorized", "no, bad or expired credentials", ("WWW-Authenticate",)),
    (404, "NotFound", "unknown job, or a job of another tenant (never told apart)", ()),
    (409, "Conflict", "the job is in the wrong state, or an Idempotency-Key was reused", ()),
    (413, "PayloadTooLarge", "the body is over PUSHSVC_MAX_BODY_BYTES", ()),
    (422, "ValidationFailed", "the body or a parameter does not match its schema", ()),
    (429, "RateLimited", "too many requests; wait Retry-After seconds", ("Retry-After",)),
    (503, "Unavailable", "Redis is unreachable (or streaming is off)", ("Retry-After",)),
]
ERROR_NAMES = {status: name for status, name, _, _ in ERRORS}
# Every /v1 endpoint authenticates, may be rate limited, and needs Redis.
V1_ERRORS = (401, 429, 503)


def _ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def _obj(required: list[str] | None = None, **properties: Schema) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    schema["required"] = list(properties) if required is None else required
    return schema


def _json(schema: Schema, description: str, **headers: Schema) -> Schema:
    response: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _header(description: str, schema: Schema | None = None) -> Schema:
    return {"description": description, "schema": schema or {"type": "string"}}


def _errors(*statuses: int) -> dict[str, Schema]:
    return {
        str(s): {"$ref": f"#/components/responses/{ERROR_NAMES[s]}"}
        for s in sorted({*statuses, *V1_ERRORS})
    }


def _component_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _model_schemas(types: Registry) -> tuple[Schema, dict[str, Schema], dict[str, Schema]]:
    """Component schemas of our models and every payload model, and the refs to them.

    One pydantic pass over all models: two payload classes of the same name in different
    modules get distinct component names instead of overwriting each other.
    """
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (JobSnapshot, "serialization"),
        (SubmitRequest, "validation"),
    ]
    wanted += [(t.payload_model, "validation") for t in types.types.values()]
    refs, top = models_json_schema(wanted, ref_template=REF)
    components: dict[str, Schema] = top.get("$defs", {})
    snapshot = components[refs[(JobSnapshot, "serialization")]["$ref"].rsplit("/", 1)[1]]
    # A snapshot is always dumped whole: every field is present in a response. A
    # ``snapshot`` event leaves ``epoch`` out: its SSE id carries the position whole.
    snapshot["required"] = [p for p in snapshot["properties"] if p != "epoch"]
    submit = components.pop(refs[(SubmitRequest, "validation")]["$ref"].rsplit("/", 1)[1])
    payloads = {n: refs[(t.payload_model, "validation")] for n, t in types.types.items()}
    return submit["properties"], payloads, components


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


def _shapes() -> dict[str, Schema]:
    """The hand-written response shapes."""
    string, integer, number = {"type": "string"}, {"type": "integer"}, {"type": "number"}
    nullable_string = {"type": ["string", "null"]}
    links = _obj(self=string, events=string, events_expires_at=integer)
    links["properties"]["events"]["description"] = "the job's stream, with a job-scoped token"
    error = _obj(["code", "message", "details"], code=string, message=string, details={})
    return {
        "JobLinks": links,
        "Job": {"allOf": [_ref("JobSnapshot"), _obj(links=_ref("JobLinks"))]},
        "JobPage": _obj(jobs={"type": "array", "items": _ref("Job")}, next_cursor=nullable_string),
        "Error": _obj(error=error),
        "StreamToken": _obj(token=string, expires_at=integer, events_url=string),
        "JobTypeInfo": _obj(
            name=string,
            description=string,
            timeout_s=number,
            max_attempts=integer,
            payload_schema={"type": "object"},
        ),
        "JobTypes": _obj(types={"type": "array", "items": _ref("JobTypeInfo")}),
        "Stats": {
            "type": "object",
            "description": "queue depth, running, throughput, success rate, durations, alerts",
            "properties": {
                "window_s": number,
                "at": number,
                "overall": {"type": "object"},
                "types": {"type": "object", "additionalProperties": {"type": "object"}},
                "workers": integer,
                "alerts": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Health": _obj(status={"const": "ok"}),
        "Ready": _obj(status={"enum": ["ok", "unavailable"]}, redis={"type": "boolean"}),
    }


def _components(types: Registry) -> Schema:
    submit, payloads, schemas = _model_schemas(types)
    schemas.update(_submit_schemas(types, submit, payloads))
    schemas.update(_shapes())
    responses = {
        name: _json(_ref("Error"), description, **{h: _header(h) for h in headers})
        for _, name, description, headers in ERRORS
    }
    return {
        "schemas": schemas,
        "responses": responses,
        "parameters": _parameters(),
        "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key"},
            "streamToken": {
                "type": "apiKey",
                "in": "query",
                "name": "token",
                "description": "a signed stream token (links.events, POST /v1/stream-tokens)",
            },
        },
    }


def _param(where: str, name: str, schema: Schema, description: str, **more: Any) -> Schema:
    return {"in": where, "name": name, "schema": schema, "description": description, **more}


def _parameters() -> dict[str, Schema]:
    param = _param
    event_id = {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}
    return {
        "JobId": param("path", "job_id", {"type": "string"}, "the job's id", required=True),
        "Token": param("query", "token", {"type": "string"}, "a stream token (EventSource)"),
        "LastEventIdQuery": param("query", "last_event_id", event_id, "resume after this event id"),
        "LastEventIdHeader": param(
            "header", "Last-Event-ID", event_id, "resume after this event id (EventSource)"
        ),
    }


def _param_ref(name: str) -> Schema:
    return {"$ref": f"#/components/parameters/{name}"}


STREAM_PARAMS = [
    _param_ref("Token"),
    _param_ref("LastEventIdQuery"),
    _param_ref("LastEventIdHeader"),
]
STREAM_SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}, {"streamToken": []}]


def _stream_responses(*errors: int) -> dict[str, Schema]:
    return {
        "200": {
            "description": "the stream: `snapshot` first, then every event once, in order",
            "content": {SSE: {"schema": {"type": "string"}}},
        },
        "204": {"description": "resumed after the end: nothing more will come"},
        **_errors(400, 404, *errors),
    }


def _job_response(description: str) -> Schema:
    return _json(_ref("Job"), description, Location=_header("/v1/jobs/{id}"))


def _op(op_id: str, tag: str, summary: str, responses: dict[str, Schema], **extra: Any) -> Schema:
    return {
        "operationId": op_id,
        "tags": [tag],
        "summary": summary,
        **extra,
        "responses": responses,
    }


def _submit_op() -> Schema:
    created = _job_response("accepted: the job, queued")
    # What can be done with the new job next (stateful tests follow these too).
    created["links"] = {
        op_id: {"operationId": op_id, "parameters": {"job_id": "$response.body#/id"}}
        for op_id in ("getJob", "cancelJob", "retryJob")
    }
    created["headers"]["Idempotent-Replayed"] = _header("`true` when a retry returned the job")
    key = {"type": "string", "minLength": 1, "maxLength": 255}
    idempotency = _param(
        "header", "Idempotency-Key", key, "the same key and body return the same job (else 409)"
    )
    return _op(
        "submitJob",
        "jobs",
        "Submit a job: validates the payload against its type, enqueues it",
        {"202": created, **_errors(400, 409, 413, 422)},
        parameters=[idempotency],
        requestBody={"required": True, "content": {JSON: {"schema": _ref("SubmitJob")}}},
    )


def _list_op(list_limit_max: int) -> Schema:
    def query(name: str, schema: Schema, description: str) -> Schema:
        return _param("query", name, schema, description)

    limit = {"type": "integer", "minimum": 1, "maximum": list_limit_max, "default": 50}
    return _op(
        "listJobs",
        "jobs",
        "The tenant's jobs, newest first",
        {"200": _json(_ref("JobPage"), "one page"), **_errors(400, 422)},
        parameters=[
            query("status", _ref("JobStatus"), "only jobs in this state"),
            query("type", {"type": "string"}, "only jobs of this type"),
            query("limit", limit, "page size"),
            query("cursor", {"type": "string"}, "opaque: `next_cursor` of the previous page"),
        ],
    )


def _get_op() -> Schema:
    etag = _header("the job's event sequence, quoted")
    poll = _header("seconds a poller should wait (while the job is not finished)")
    found = _json(_ref("Job"), "the snapshot", ETag=etag, **{"Retry-After": poll})
    unchanged = {"description": "unchanged since If-None-Match", "headers": {"ETag": etag}}
    if_none_match = _param(
        "header", "If-None-Match", {"type": "string"}, "an earlier ETag: 304 while unchanged"
    )
    return _op(
        "getJob",
        "jobs",
        "The job's snapshot (the polling fallback)",
        {"200": found, "304": unchanged, **_errors(404)},
        parameters=[if_none_match],
    )


def _job_paths(list_limit_max: int) -> dict[str, Schema]:
    one = {"parameters": [_param_ref("JobId")]}
    return {
        "/v1/jobs": {"post": _submit_op(), "get": _list_op(list_limit_max)},
        "/v1/jobs/{job_id}": {
            **one,
            "get": _get_op(),
            "delete": _op(
                "cancelJob",
                "jobs",
                "Cancel: a queued job never starts, a running one ends `cancelled`",
                {
                    "200": _job_response("cancelled (it was queued)"),
                    "202": _json(
                        {"allOf": [_ref("Job"), _obj(cancel_requested={"const": True})]},
                        "cancel requested (it is running): `cancel_requested` says so",
                        Location=_header("/v1/jobs/{id}"),
                    ),
                    **_errors(404, 409),
                },
            ),
        },
        "/v1/jobs/{job_id}/retry": {
            **one,
            "post": _op(
                "retryJob",
                "jobs",
                "Run a failed or cancelled job again",
                {"202": _job_response("queued again"), **_errors(404, 409)},
            ),
        },
        "/v1/job-types": {
            "get": _op(
                "listJobTypes",
                "jobs",
                "The registered job types with their payload JSON Schemas",
                {"200": _json(_ref("JobTypes"), "the types"), **_errors()},
            )
        },
    }


def _stream_paths() -> dict[str, Schema]:
    ids = {"type": "array", "items": {"type": "string"}, "maxItems": 100}
    job_list = _param(
        "query", "job", ids, "jobs to follow (none: all the tenant's)", style="form", explode=True
    )
    return {
        "/v1/jobs/{job_id}/events": {
            "get": _op(
                "jobEvents",
                "streams",
                "One job's events (SSE); closes after the terminal event",
                _stream_responses(),
                parameters=[_param_ref("JobId"), *STREAM_PARAMS],
                security=STREAM_SECURITY,
            )
        },
        "/v1/events": {
            "get": _op(
                "manyEvents",
                "streams",
                "Many jobs' events over one connection (SSE)",
                _stream_responses(422),
                parameters=[job_list, *STREAM_PARAMS],
                security=STREAM_SECURITY,
            )
        },
        "/v1/stream-tokens": {
            "post": _op(
                "issueStreamToken",
                "streams",
                "A tenant-scoped token for `GET /v1/events?token=`",
                {"201": _json(_ref("StreamToken"), "the token"), **_errors()},
            )
        },
    }


def _public(op_id: str, summary: str, media: str, schema: Schema, tag: str = "ops") -> Schema:
    ok = {"description": summary, "content": {media: {"schema": schema}}}
    return {"get": _op(op_id, tag, summary, {"200": ok}, security=[])}


def _ops_paths() -> dict[str, Schema]:
    string, html_page = {"type": "string"}, "text/html"
    ready = _public("readyz", "Readiness: Redis answers", JSON, _ref("Ready"))
    ready["get"]["responses"]["503"] = _json(_ref("Ready"), "Redis is unreachable")
    static = _public("static", "The browser client and the console's assets", "*/*", {}, "web")
    static["get"]["parameters"] = [_param("path", "path", string, "a file", required=True)]
    static["get"]["responses"]["404"] = {"$ref": "#/components/responses/NotFound"}
    docs_assets = _public("docsAssets", "The API reference's Swagger UI files", "*/*", {}, "web")
    docs_assets["get"]["parameters"] = static["get"]["parameters"]
    docs_assets["get"]["responses"]["404"] = static["get"]["responses"]["404"]
    stats_summary = "Queue depth, running, throughput, success rate, durations, alerts"
    return {
        "/v1/stats": {
            "get": _op(
                "getStats",
                "ops",
                stats_summary,
                {"200": _json(_ref("Stats"), "the stats"), **_errors()},
            )
        },
        "/v1/stats/events": {
            "get": _op(
                "statsEvents",
                "ops",
                "The stats, pushed periodically (SSE)",
                {"200": _stream_responses()["200"], **_errors()},
                parameters=[_param_ref("Token")],
                security=STREAM_SECURITY,
            )
        },
        "/healthz": _public("healthz", "Liveness", JSON, _ref("Health")),
        "/readyz": ready,
        "/metrics": _public("metrics", "Prometheus metrics of this process", "text/plain", string),
        "/openapi.json": _public("openapi", "This document", JSON, {"type": "object"}),
        "/docs": _public(
            "docs", "The API reference: Swagger UI over this document", html_page, string
        ),
        "/docs/plain": _public(
            "docsPlain", "This document as a page without scripts", html_page, string
        ),
        "/docs/assets/{path}": docs_assets,
        "/": _public("console", "The job console", html_page, string, "web"),
        "/dashboard": _public(
            "dashboard", "The live dashboard (stats and alerts over SSE)", html_page, string, "web"
        ),
        "/static/{path}": static,
    }


def openapi_document(types: Registry, settings: Settings | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every endpoint; payloads follow ``types``' models."""
    limit_max = (
        settings.list_limit_max
        if settings is not None
        else int(Settings.model_fields["list_limit_max"].default)
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pushsvc",
            "version": "1",
            "description": "Long-running LLM jobs whose progress is pushed over SSE.",
        },
        "security": [{"apiKey": []}],
        "tags": [
            {"name": "jobs", "description": "submit, poll, cancel, retry"},
            {"name": "streams", "description": "Server-Sent Events and stream tokens"},
            {"name": "ops", "description": "health, readiness, metrics, stats"},
            {"name": "web", "description": "the browser console"},
        ],
        "paths": {**_job_paths(limit_max), **_stream_paths(), **_ops_paths()},
        "components": _components(types),
    }


def _document(request: Request) -> dict[str, Any]:
    svc = request.app.state.services
    return openapi_document(svc.types, svc.settings)


async def openapi_endpoint(request: Request) -> Response:
    """``GET /openapi.json``."""
    return JSONResponse(_document(request))


def render_html(doc: dict[str, Any]) -> str:
    """The paths, parameters and responses of ``doc`` as one plain page."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        f"<title>{esc(doc['info']['title'])} API</title></head><body>",
        f"<h1>{esc(doc['info']['title'])} API</h1><p>{esc(doc['info']['description'])}</p>",
        '<p>The machine-readable document: <a href="/openapi.json">/openapi.json</a></p>',
        *_operations_html(doc),
        "</body></html>",
    ]
    return "\n".join(parts)


def _operations_html(doc: dict[str, Any]) -> list[str]:
    esc = html.escape
    parts: list[str] = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            parts.append(f"<h2><code>{method.upper()} {esc(path)}</code></h2>")
            parts.append(f"<p>{esc(op.get('summary', ''))}</p>")
            params = [*item.get("parameters", []), *op.get("parameters", [])]
            names = [_param_name(doc, p) for p in params]
            if names:
                parts.append("<p>Parameters: " + ", ".join(map(esc, names)) + "</p>")
            codes = ", ".join(esc(code) for code in op["responses"])
            parts.append(f"<p>Responses: {codes}</p>")
    return parts


def render_reference(doc: dict[str, Any]) -> str:
    """``/docs`` (``web/docs.html``): Swagger UI over ``/openapi.json``; without scripts,
    the plain list of operations."""
    page = (web_dir() / "docs.html").read_text(encoding="utf-8")
    return page.replace("{operations}", "\n".join(_operations_html(doc)))


def _param_name(doc: dict[str, Any], param: Schema) -> str:
    if "$ref" in param:
        param = doc["components"]["parameters"][param["$ref"].rsplit("/", 1)[1]]
    return f"{param['name']} ({param['in']})"


async def docs_endpoint(request: Request) -> Response:
    """``GET /docs/plain``: readable without scripts or any other origin."""
    headers = {"Content-Security-Policy": "default-src 'none'", "Cache-Control": "no-cache"}
    return HTMLResponse(render_html(_document(request)), headers=headers)


async def reference_endpoint(request: Request) -> Response:
    """``GET /docs``: the pages' own policy (our scripts and styles, this origin only)."""
    return HTMLResponse(render_reference(_document(request)), headers=PAGE_HEADERS)


routes: list[BaseRoute] = [
    Route("/openapi.json", openapi_endpoint, methods=["GET"]),
    Route("/docs", reference_endpoint, methods=["GET"]),
    Route("/docs/plain", docs_endpoint, methods=["GET"]),
    Mount("/docs/assets", app=Assets(directory=swagger_ui_dir()), name="docs-assets"),
]
