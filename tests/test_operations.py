"""Endpoint declarations (pushsvc/operations.py): ``@operation`` attaches one, ``public``
makes an unauthenticated one, ``by_method`` dispatches by method with HEAD as GET."""

from __future__ import annotations

import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from pushsvc.errors import NotFound
from pushsvc.models import Health
from pushsvc.operations import (
    Operation,
    Reply,
    by_method,
    declaration,
    method_handlers,
    operation,
    public,
    schema_ref,
)


async def _get(_request: Request) -> Response:
    return PlainTextResponse("got")


async def _post(_request: Request) -> Response:
    return PlainTextResponse("posted")


@pytest.mark.timeout(10)
def test_operation_attaches_a_declaration_and_returns_the_target() -> None:
    ok = Reply(200, "fine", Health)
    decorated = operation("getThing", "things", "Get it", ok, errors=(NotFound,))(_get)
    assert decorated is _get
    declared = declaration(_get)
    assert isinstance(declared, Operation)
    assert (declared.id, declared.tag, declared.auth) == ("getThing", "things", "key")
    assert declared.replies == (ok,) and declared.errors == (NotFound,)
    assert declaration(_post) is None


@pytest.mark.timeout(10)
def test_public_declares_a_200_for_anyone() -> None:
    def target() -> None: ...

    public("health", "ops", "Alive", Health)(target)
    declared = declaration(target)
    assert declared is not None and declared.auth == "none"
    assert declared.replies[0].status == 200 and declared.replies[0].body is Health


@pytest.mark.timeout(10)
def test_schema_ref_names_the_component() -> None:
    assert schema_ref(Health) == {"$ref": "#/components/schemas/Health"}


def _request(method: str) -> Request:
    return Request({"type": "http", "method": method, "path": "/", "headers": []})


@pytest.mark.timeout(10)
async def test_by_method_dispatches_and_head_is_get() -> None:
    endpoint = by_method(GET=_get, POST=_post)
    assert method_handlers(endpoint) == {"GET": _get, "POST": _post}
    assert method_handlers(_get) is None
    assert (await endpoint(_request("GET"))).body == b"got"
    assert (await endpoint(_request("HEAD"))).body == b"got"
    assert (await endpoint(_request("POST"))).body == b"posted"
