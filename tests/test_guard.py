"""The request guard (pushsvc/guard.py): loopback and allowed Host names, same-origin
checks, and what a keyless or keyed API refuses before any handler runs."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from pushsvc.guard import (
    HostNames,
    RequestGuard,
    has_body,
    is_json,
    is_loopback,
    is_loopback_name,
    same_origin,
    split_host,
)
from pushsvc.settings import Settings


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("the guard's tests never reach the app")


def guard(**settings: object) -> RequestGuard:
    return RequestGuard(_app, Settings(**settings))  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_loopback_addresses_and_names() -> None:
    for host in ("localhost", "127.0.0.1", "127.8.9.1", "::1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "10.0.0.1", "example.com", "localhost.example.com", ""):
        assert not is_loopback(host), host
    assert is_loopback_name("app.localhost")
    assert not is_loopback_name("localhost.evil.com")


@pytest.mark.timeout(10)
def test_split_host_refuses_what_could_hide_another_name() -> None:
    assert split_host("Example.COM.:8080") == ("example.com", 8080)
    assert split_host("[::1]:80") == ("::1", 80)
    for bad in ("evil@127.0.0.1", "a/b", "127.0.0.1:port", "[::1"):
        assert split_host(bad) is None, bad


@pytest.mark.timeout(10)
def test_host_names_loopback_exact_and_wildcards() -> None:
    hosts = HostNames(["api.test", "*.example.org"])
    assert hosts.allows("localhost:8000") and hosts.allows("[::1]:8000")
    assert hosts.allows("API.test") and hosts.allows("a.b.example.org")
    assert not hosts.allows("example.org") and not hosts.allows("evil.com")
    assert not hosts.allows("")
    assert HostNames(["*"]).allows("anything.at.all")


@pytest.mark.timeout(10)
def test_same_origin_compares_scheme_default_ports() -> None:
    assert same_origin("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert same_origin("http://localhost", "localhost:80")
    assert not same_origin("http://localhost:8001", "localhost:8000")
    assert not same_origin("null", "localhost:8000")


@pytest.mark.timeout(10)
def test_body_and_json_detection() -> None:
    assert has_body(Headers({"content-length": "3"}))
    assert has_body(Headers({"transfer-encoding": "chunked"}))
    assert not has_body(Headers({"content-length": "0"})) and not has_body(Headers({}))
    assert is_json(Headers({"content-type": "Application/JSON; charset=utf-8"}))
    assert not is_json(Headers({"content-type": "text/plain"}))


@pytest.mark.timeout(10)
def test_a_keyless_api_refuses_other_hosts_and_cross_site_requests() -> None:
    keyless = guard()
    local = {"host": "127.0.0.1:8000"}
    assert keyless.check("GET", Headers(local)) is None
    refused = keyless.check("GET", Headers({"host": "rebound.evil.com"}))
    assert refused is not None and refused.status_code == 421
    cross = {**local, "origin": "https://evil.com"}
    refused = keyless.check("POST", Headers(cross))
    assert refused is not None and refused.status_code == 403
    navigate = {**local, "sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}
    assert keyless.check("GET", Headers(navigate)) is None


@pytest.mark.timeout(10)
def test_bodies_must_be_json_with_or_without_keys() -> None:
    keyed = guard(api_keys={"k": "t"})
    text = {"host": "anywhere.example", "content-length": "2", "content-type": "text/plain"}
    refused = keyed.check("POST", Headers(text))
    assert refused is not None and refused.status_code == 415
    assert keyed.check("POST", Headers({**text, "content-type": "application/json"})) is None
