"""The OpenAPI document: valid, complete (every route of the app, by construction: it is
derived from the routes and their handlers' declarations), served as built, and true to the
running API (schemathesis against a live API and worker)."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import jsonschema
import pytest
import schemathesis
from openapi_spec_validator import validate
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from pushsvc.app import ROUTES, create_app
from pushsvc.docs import render_html
from pushsvc.jobs import JobContext, Registry, job_type, registry
from pushsvc.models import Job, JobSnapshot
from pushsvc.openapi import DocumentSchema, endpoints, openapi_document
from pushsvc.operations import TEXT, by_method, public
from pushsvc.settings import Settings

from .conftest import stack_env
from .procs import Api, Proc, RedisServer, free_port
from .sse import read

AUTH = {"Authorization": "Bearer key-a"}
METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
REF = "#/components/schemas/{model}"
STREAMS = ("/v1/jobs/{job_id}/events", "/v1/events", "/v1/stats/events")
# Routes left out of the document on purpose (``include_in_schema=False``): none.
UNDOCUMENTED: set[str] = set()


def builtin_types() -> Registry:
    """The types an API serves without PUSHSVC_JOB_MODULES (the tests' own left out)."""
    return Registry(
        {n: t for n, t in registry.types.items() if t.func.__module__.startswith("pushsvc.")}
    )


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, m) for path, item in doc["paths"].items() for m in item if m in METHODS}


def served(settings: Settings) -> set[tuple[str, str]]:
    """(path, method) of every route the app answers, HEAD aside (Starlette adds it to GET),
    but those left out on purpose."""
    found: set[tuple[str, str]] = set()
    for route in create_app(settings).routes:
        if not getattr(route, "include_in_schema", True):
            assert route.path in UNDOCUMENTED, f"{route.path} left out, not in UNDOCUMENTED"
            continue
        if isinstance(route, Route):
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
            found |= {(path, m.lower()) for m in route.methods or () if m != "HEAD"}
        elif isinstance(route, Mount):
            found.add((f"{route.path}/{{path}}", "get"))
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return found


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        *_, kind, name = node["$ref"].split("/")
        node = doc["components"][kind][name]
    return node


def validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    """A validator for one component schema, its references resolved inside ``doc``."""
    root = {**doc, "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(root)


def conforms(doc: dict[str, Any], path: str, method: str, resp: httpx.Response) -> None:
    """``resp`` has a status, media type and (JSON) body the document gives for the operation."""
    responses = doc["paths"][path][method]["responses"]
    assert str(resp.status_code) in responses, (path, method, resp.status_code, resp.text)
    content = resolve(doc, responses[str(resp.status_code)]).get("content")
    if not content:
        assert resp.content == b"", (path, method, resp.status_code)
        return
    media = resp.headers["content-type"].split(";")[0].strip()
    assert media in content, (path, method, media)
    if media == "application/json":
        root = {**doc, **content[media]["schema"]}
        jsonschema.Draft202012Validator(root).validate(resp.json())


# -- the document itself ----------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    doc = openapi_document(registry, routes=ROUTES)
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_every_route_is_documented_and_nothing_else() -> None:
    """A route added without documentation (or documentation of a route that went) fails."""
    doc = openapi_document(registry, routes=ROUTES)
    app_routes = served(Settings())
    assert app_routes - documented(doc) == set(), "routes missing from /openapi.json"
    assert documented(doc) - app_routes == set(), "documented routes the app does not serve"


async def _plain(_request: Request) -> Response:
    return PlainTextResponse("")


def test_a_route_without_a_declaration_fails_the_document() -> None:
    """The document cannot leave a route out silently: undeclared, it does not build;
    ``include_in_schema=False`` is the one way out."""
    with pytest.raises(LookupError, match="GET /undeclared"):
        openapi_document(registry, routes=[Route("/undeclared", _plain)])
    doc = openapi_document(registry, routes=[Route("/hidden", _plain, include_in_schema=False)])
    assert doc["paths"] == {}
    declared = public("plain", "ops", "A plain page", media="text/plain", schema=TEXT)(_plain)
    doc = openapi_document(registry, routes=[Route("/plain", declared)])
    assert doc["paths"]["/plain"]["get"]["operationId"] == "plain"


def test_one_route_per_path_documents_each_methods_handler() -> None:
    """A path's route dispatching on the method documents each method's own handler, and
    must have one for every method it serves."""
    get = public("getIt", "ops", "Get it", schema=TEXT)(_plain)
    found = list(endpoints([Route("/it", by_method(GET=get), methods=["GET", "HEAD"])]))
    assert [(e.path, e.method, e.operation.id) for e in found] == [("/it", "get", "getIt")]
    with pytest.raises(ValueError, match="serves"):
        list(endpoints([Route("/it", by_method(GET=get), methods=["GET", "POST"])]))


def test_an_extending_model_is_its_base_and_its_own_fields() -> None:
    """``Job`` documents as ``allOf`` [``JobSnapshot``, its links], not a copy of the
    snapshot's fields."""
    refs, top = models_json_schema(
        [(Job, "serialization")], ref_template=REF, schema_generator=DocumentSchema
    )
    job = top["$defs"]["Job"]
    assert job["allOf"][0] == {"$ref": REF.format(model=JobSnapshot.__name__)}
    assert job["allOf"][1]["required"] == ["links"]
    assert set(job["allOf"][1]["properties"]) == {"links"}


def test_each_description_says_what_its_own_field_is() -> None:
    """Bug: the hand-written shapes shared one ``{"type": "string"}`` object and set a
    description on it, so the error's code and message, the stream token and the job type's
    name all said "the job's stream, with a job-scoped token"."""
    text = str(openapi_document(registry, routes=ROUTES))
    assert text.count("the job's stream, with a job-scoped token") == 1


def test_every_operation_documents_its_errors_and_security() -> None:
    doc = openapi_document(registry, routes=ROUTES)
    for path, method in documented(doc):
        op = doc["paths"][path][method]
        assert op["operationId"] and op["summary"], (path, method)
        statuses = set(op["responses"])
        if path.startswith("/v1/"):
            assert {"401", "503"} <= statuses, (path, method)
            assert op.get("security", doc["security"]), (path, method)
            for status in statuses - {"200", "201", "202", "204", "304"}:
                error = resolve(doc, op["responses"][status])["content"]["application/json"]
                assert error["schema"] == {"$ref": "#/components/schemas/Error"}
        else:
            assert op["security"] == [], (path, method)
    for path in STREAMS:
        op = doc["paths"][path]["get"]
        assert "text/event-stream" in op["responses"]["200"]["content"]
        assert {"streamToken": []} in op["security"] and {"apiKey": []} in op["security"]


def test_submit_body_is_one_variant_per_type_told_apart_by_type() -> None:
    doc = openapi_document(registry, routes=ROUTES)
    body = doc["components"]["schemas"]["SubmitJob"]
    assert body["discriminator"]["propertyName"] == "type"
    assert set(body["discriminator"]["mapping"]) == set(registry.types)
    check = validator(doc, "SubmitJob")
    assert check.is_valid({"type": "ticker", "payload": {"steps": 2}, "priority": "high"})
    assert check.is_valid({"type": "ticker"})
    assert not check.is_valid({"type": "ticker", "payload": {"steps": 0}})
    assert not check.is_valid({"type": "ticker", "payload": {"steps": 2, "nope": 1}})
    assert not check.is_valid({"type": "no-such-type", "payload": {}})
    assert not check.is_valid({"type": "ticker", "priority": "urgent"})
    # A type whose payload has required fields needs the payload.
    assert not check.is_valid({"type": "generate"})
    assert check.is_valid({"type": "generate", "payload": {"prompt": "hi"}})


def test_payload_models_with_the_same_name_stay_apart() -> None:
    """Two job types' payload classes both named ``Payload`` keep their own schemas."""

    def make(field: str) -> type[BaseModel]:
        return type("Payload", (BaseModel,), {"__annotations__": {field: int}})

    types = Registry()

    async def run(ctx: JobContext, payload: Any) -> None:
        return None

    job_type("one", payload=make("alpha"), target=types)(run)
    job_type("two", payload=make("beta"), target=types)(run)
    doc = openapi_document(types, routes=ROUTES)
    validate(doc)
    check = validator(doc, "SubmitJob")
    assert check.is_valid({"type": "one", "payload": {"alpha": 1}})
    assert not check.is_valid({"type": "one", "payload": {"alpha": "x"}})
    assert check.is_valid({"type": "two", "payload": {"beta": 1}})
    assert not check.is_valid({"type": "two", "payload": {"beta": "x"}})


def test_job_snapshot_schema_matches_the_model_and_requires_links() -> None:
    doc = openapi_document(registry, routes=ROUTES)
    check = validator(doc, "Job")
    job = {
        "id": "7b1f0c2e-2a57-4b0e-9c55-1d1f3a5d8e77",
        "type": "ticker",
        "status": "running",
        "progress": 12.5,
        "stage": "ticking",
        "message": None,
        "output": "",
        "result": None,
        "error": None,
        "attempt": 1,
        "max_attempts": 3,
        "priority": "normal",
        "created_at": 1.0,
        "started_at": 2.0,
        "finished_at": None,
        "eta_s": None,
        "queue_position": None,
        "starts_in_s": None,
        "waiting": {"reason": "rate_limited", "until": 9.5},
        "llm": None,
        "seq": 3,
    }
    links = {"self": "/v1/jobs/x", "events": "/v1/jobs/x/events?token=t", "events_expires_at": 9}
    assert check.is_valid({**job, "links": links})
    assert not check.is_valid(job)
    assert not check.is_valid({**job, "status": "paused", "links": links})


def test_docs_page_lists_every_operation_without_scripts() -> None:
    doc = openapi_document(registry, routes=ROUTES)
    page = render_html(doc)
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    for path, method in documented(doc):
        assert f"{method.upper()} {path}" in page


# -- against a running API --------------------------------------------------------


@pytest.fixture(scope="module")
def live(redis_server: RedisServer) -> Iterator[Api]:
    """An API and a worker of their own (fuzzed jobs stay out of other tests' tenants).

    Only the built-in job types: the tests' own ones take unbounded sizes. The model URL
    is a closed local port, so ``generate`` jobs fail fast and nothing leaves the machine.
    """
    env = stack_env(
        redis_server.url,
        f"oa{secrets.token_hex(3)}",
        job_modules="",
        publish_rate_hz="10",
        llm_base_url=f"http://127.0.0.1:{free_port()}/v1",
        llm_api_key="sk-test-not-a-real-key",
    )
    worker = Proc(["worker"], env).start()
    api = Api([], env).start()
    yield api
    api.stop()
    worker.stop()


@pytest.mark.timeout(30)
def test_served_document_is_the_built_one(live: Api) -> None:
    settings = Settings(list_limit_max=200)
    resp = httpx.get(f"{live.url}/openapi.json", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == openapi_document(builtin_types(), settings, routes=ROUTES)
    page = httpx.get(f"{live.url}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "POST /v1/jobs" in page.text


@pytest.mark.timeout(30)
def test_405_names_every_method_the_path_serves(live: Api) -> None:
    """Bug: each method of /v1/jobs and /v1/jobs/{job_id} is its own Starlette Route, and
    the 405 for an unknown method names only the first route's methods (``Allow: POST``
    on /v1/jobs, where GET works too; ``Allow: GET, HEAD`` where DELETE works too)."""
    doc = openapi_document(builtin_types(), routes=ROUTES)
    for path, url in [("/v1/jobs", "/v1/jobs"), ("/v1/jobs/{job_id}", f"/v1/jobs/{uuid.uuid4()}")]:
        resp = httpx.request("PATCH", live.url + url, headers=AUTH, timeout=10)
        assert resp.status_code == 405
        assert resp.json()["error"]["code"] == "method_not_allowed"
        allowed = {m.strip().lower() for m in resp.headers["allow"].split(",")}
        assert documented(doc) & {(path, m) for m in METHODS} <= {(path, m) for m in allowed}


@pytest.mark.timeout(30)
def test_payloads_are_held_to_their_published_schema(live: Api) -> None:
    """Bug: payloads are validated in pydantic's lax mode, so the API accepts what the
    schema it publishes (here and in /v1/job-types) refuses: ``0`` for a boolean, ``"3"``
    for an integer."""
    check = validator(openapi_document(builtin_types(), routes=ROUTES), "SubmitJob")
    for payload in ({"fail_retryable": 0}, {"steps": "3"}):
        body = {"type": "ticker", "payload": {"interval_ms": 0, **payload}}
        assert not check.is_valid(body)
        resp = httpx.post(f"{live.url}/v1/jobs", json=body, headers=AUTH, timeout=10)
        assert resp.status_code == 422, (payload, resp.status_code, resp.text)


# Built here, not fetched: schemathesis' lazy loader (``from_fixture``) breaks on pytest 9,
# and test_served_document_is_the_built_one shows the API serves this very document.
FUZZ_CONFIG = schemathesis.Config.from_dict(
    {
        "headers": AUTH,
        "request-timeout": 10,
        "generation": {"max-examples": 8, "database": "none"},
        "checks": {
            # DELETE cancels: the job stays readable (as `cancelled`), by design.
            "use_after_free": {"enabled": False},
        },
        # Follow only the document's own links: inferred ones start from answers that
        # depend on the worker's timing, which hypothesis cannot replay.
        "phases": {"stateful": {"inference": {"algorithms": []}}},
        "operations": [
            {
                # The cursor is opaque: only a `next_cursor` the API issued is valid, and
                # no schema can say so; any other string is rightly a 400 `bad_cursor`.
                "include-operation-id": "listJobs",
                "checks": {"positive_data_acceptance": {"expected-statuses": [200, 400, 401, 404]}},
            },
            {
                # A body the schema allows can still pass the byte limit (a 100,000-character
                # prompt of 3-byte characters is 300 KB): a documented 413, not a refusal.
                "include-operation-id": "submitJob",
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "401", "403", "404", "409", "413", "429"]
                    }
                },
            },
        ],
    }
)
fuzz = schemathesis.openapi.from_dict(
    openapi_document(builtin_types(), Settings(list_limit_max=200), routes=ROUTES),
    config=FUZZ_CONFIG,
).exclude(path=list(STREAMS))  # streams never end by themselves: read bounded below


@pytest.mark.timeout(60)
@fuzz.parametrize()
def test_api_conforms_to_its_document(case: Any, live: Api) -> None:
    case.call_and_validate(base_url=live.url, headers=AUTH)


@pytest.mark.timeout(60)
def test_job_workflows_conform_to_the_document(live: Api) -> None:
    """Submit, then follow the document's links (get, cancel, retry) with the job's id."""

    class Workflow(fuzz.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": live.url, "headers": AUTH}

    Workflow.run(
        settings=hypothesis.settings(
            max_examples=10, stateful_step_count=6, deadline=None, database=None
        )
    )


@pytest.mark.timeout(30)
async def test_streams_answer_as_documented(live: Api) -> None:
    """The stream endpoints, left out of fuzzing (they stay open), read to their end."""
    doc = openapi_document(builtin_types(), routes=ROUTES)
    snapshot = validator(doc, "JobSnapshot")
    async with httpx.AsyncClient(base_url=live.url, timeout=10) as http:
        body = {"type": "ticker", "payload": {"steps": 2, "interval_ms": 1}}
        resp = await http.post("/v1/jobs", json=body, headers=AUTH)
        conforms(doc, "/v1/jobs", "post", resp)
        job = resp.json()
        # links.events carries a job-scoped token: no header, as EventSource would.
        one = await read(http, job["links"]["events"])
        assert one.closed and one.events[0].kind == "snapshot", one.events
        assert one.events[-1].kind == "completed"
        snapshot.validate(one.events[0].data)
        ended = await http.get(job["links"]["events"], headers={"Last-Event-ID": str(one.last_id)})
        conforms(doc, "/v1/jobs/{job_id}/events", "get", ended)
        assert ended.status_code == 204

        resp = await http.post("/v1/stream-tokens", headers=AUTH)
        conforms(doc, "/v1/stream-tokens", "post", resp)
        token = resp.json()["token"]
        many = await read(http, f"/v1/events?job={job['id']}&token={token}")
        assert many.closed and many.events[0].kind == "snapshot", many.events
        snapshot.validate(many.events[0].data)
        stats = await read(
            http, f"/v1/stats/events?token={token}", stop=lambda s: len(s.events) == 1
        )
        assert stats.events[0].kind == "stats"
        validator(doc, "Stats").validate(stats.events[0].data)

        too_many = "&".join(f"job={uuid.uuid4()}" for _ in range(101))
        for path, url, headers, status in [
            ("/v1/jobs/{job_id}/events", f"/v1/jobs/{uuid.uuid4()}/events", AUTH, 404),
            ("/v1/jobs/{job_id}/events", job["links"]["self"] + "/events", {}, 401),
            ("/v1/jobs/{job_id}/events", f"{job['links']['self']}/events?token=a.b", {}, 401),
            (
                "/v1/jobs/{job_id}/events",
                job["links"]["events"],
                {"Last-Event-ID": "seven"},
                400,
            ),
            ("/v1/events", f"/v1/events?job={uuid.uuid4()}", AUTH, 404),
            ("/v1/events", f"/v1/events?{too_many}", AUTH, 422),
            ("/v1/events", "/v1/events?last_event_id=-1", AUTH, 400),
            ("/v1/stats/events", "/v1/stats/events", {}, 401),
        ]:
            resp = await http.get(url, headers=headers)
            assert resp.status_code == status, (url, resp.status_code, resp.text)
            conforms(doc, path, "get", resp)
