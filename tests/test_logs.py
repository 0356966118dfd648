"""Structured logs: real output of real processes, parsed line by line.

Each case runs ``configure_logging`` in a fresh interpreter (it owns process-wide
logging state) and reads what that process wrote to stderr, through a pipe or a pty.
"""

from __future__ import annotations

import json
import os
import pty
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from pushsvc.auth import Authenticator
from pushsvc.logs import REDACTED, Redactor, settings_secrets
from pushsvc.settings import Settings

from .conftest import stack_env
from .procs import ROOT, Api, Proc, RedisServer, free_port, http_ok, wait_until
from .sse import read

API_KEY = "key-live-7f3a9c51"
SECRET = "hmac-secret-0b1e2d3c"
LLM_KEY = "sk-proj-abcdef1234567890"
JOB_ID = "3f0c5a8e-6d1b-4e2f-9a7c-5b4d3e2f1a0b"
TOKEN = Authenticator(Settings(api_keys={API_KEY: "tenant-a"}, secret=SecretStr(SECRET))).issue(
    "tenant-a", f"job:{JOB_ID}"
)[0]
SECRETS = (API_KEY, SECRET, LLM_KEY)
PRELUDE = f"""
import asyncio, logging, sys
from pushsvc.logs import bind_job, configure_logging, get_logger
SECRETS = {list(SECRETS)!r}
TOKEN = {TOKEN!r}
JOB_ID = {JOB_ID!r}
"""


def run(code: str, *, tty: bool = False) -> str:
    """What a fresh ``python -c PRELUDE + code`` wrote to stderr (a pipe, or a terminal)."""
    argv = [sys.executable, "-c", PRELUDE + textwrap.dedent(code)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not tty:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return done.stderr
    leader, follower = pty.openpty()
    with subprocess.Popen(argv, stderr=follower, stdout=subprocess.DEVNULL, env=env) as proc:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end of the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        assert proc.wait(30) == 0
    return b"".join(chunks).decode(errors="replace")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line, parsed: a line that is not one JSON object fails the test."""
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        assert isinstance(line, dict), line
        assert {"timestamp", "level", "logger", "event"} <= line.keys(), line
    return lines


def by_event(lines: list[dict[str, Any]], text: str) -> dict[str, Any]:
    found = [line for line in lines if text in line["event"]]
    assert len(found) == 1, (text, lines)
    return found[0]


def assert_no_secret(text: str) -> None:
    body, _, signature = TOKEN.partition(".")
    for value in (*SECRETS, TOKEN, body, signature):
        assert value not in text, value


@pytest.mark.timeout(30)
def test_piped_stderr_gets_json_lines_with_secrets_redacted_everywhere() -> None:
    out = run(
        """
        configure_logging("INFO", secrets=SECRETS)   # json=None: stderr is a pipe here
        logging.getLogger("pushsvc.access").info(
            '"GET /v1/jobs/%s/events?token=%s&x=1" 200 1.0ms', JOB_ID, TOKEN
        )
        logging.getLogger("uvicorn.error").warning("key %s rejected", SECRETS[0])
        get_logger("pushsvc.llm").info(
            "calling the model",
            headers={"Authorization": "Bearer " + SECRETS[2], "Accept": "text/plain"},
            url="http://127.0.0.1:8000/v1/events?job=1&token=" + TOKEN,
            nested=[{"deep": ("x", "secret is " + SECRETS[1])}],
            raw=SECRETS[1].encode(),
            token="anything at all",
            count=3,
        )
        logging.getLogger("arq.worker").info("resumed with %s", TOKEN)
        logging.getLogger("httpx").info("sent Authorization: Bearer some-other-credential")
        logging.getLogger("pushsvc.api").info(
            "submitted", extra={"job": JOB_ID, "api_key": "not-configured-but-named"}
        )
        try:
            raise RuntimeError("upstream said: bad key " + SECRETS[2])
        except RuntimeError:
            logging.getLogger("pushsvc.worker").exception("job failed")
        logging.getLogger("pushsvc.worker").info(
            "kept: pushsvc.worker %s.deadbeef at 127.0.0.1:8000 in /srv/app.py", JOB_ID
        )
        """
    )
    assert_no_secret(out)
    lines = json_lines(out)
    assert len(lines) == 8, out
    access = by_event(lines, "GET /v1/jobs/")
    assert access["logger"] == "pushsvc.access" and access["level"] == "info"
    assert f"token={REDACTED}&x=1" in access["event"] and JOB_ID in access["event"]
    assert by_event(lines, "rejected")["event"] == f"key {REDACTED} rejected"
    model = by_event(lines, "calling the model")
    # A field named like a credential is masked whole, whatever its value looks like.
    assert model["headers"] == {"Authorization": REDACTED, "Accept": "text/plain"}
    assert model["url"].endswith(f"token={REDACTED}")
    assert model["nested"] == [{"deep": ["x", f"secret is {REDACTED}"]}]
    assert model["raw"] == REDACTED and model["token"] == REDACTED and model["count"] == 3
    assert by_event(lines, "resumed with")["event"] == f"resumed with {REDACTED}"
    assert by_event(lines, "sent Authorization")["event"].endswith(f"Bearer {REDACTED}")
    submitted = by_event(lines, "submitted")
    assert submitted["job"] == JOB_ID and submitted["api_key"] == REDACTED
    failed = by_event(lines, "job failed")
    assert failed["level"] == "error" and "Traceback" in failed["exception"]
    assert f"bad key {REDACTED}" in failed["exception"]
    # Module names, arq ids, hosts and paths look nothing like tokens: left alone.
    kept = by_event(lines, "kept:")["event"]
    assert kept == f"kept: pushsvc.worker {JOB_ID}.deadbeef at 127.0.0.1:8000 in /srv/app.py"


@pytest.mark.timeout(30)
def test_job_context_is_on_every_line_inside_bind_job_and_gone_after() -> None:
    out = run(
        """
        configure_logging(json=True)
        log, std = get_logger("pushsvc.worker"), logging.getLogger("arq.worker")

        async def job(job_id, tenant):
            with bind_job(job_id, tenant, "ticker", 2):
                for step in range(2):
                    std.info("step %d of %s", step, job_id)
                    await asyncio.sleep(0)  # the other job runs in between
                await asyncio.create_task(child(job_id))

        async def child(job_id):
            log.info("child task of " + job_id)

        async def main():
            await asyncio.gather(job("J1", "tenant-a"), job("J2", "tenant-b"))

        log.info("before")
        asyncio.run(main())
        with bind_job("J3", "tenant-c", "generate", 1):
            with bind_job("J4", "tenant-d", "batch", 3):
                log.info("nested")
            log.info("outer again")
        std.info("after")
        """
    )
    lines = json_lines(out)
    context = ("job_id", "tenant", "type", "attempt")
    for event in ("before", "after"):
        assert not set(context) & by_event(lines, event).keys()
    for job_id, tenant in (("J1", "tenant-a"), ("J2", "tenant-b")):
        mine = [line for line in lines if line["event"].endswith(job_id)]
        assert len(mine) == 3, lines
        for line in mine:
            assert [line[k] for k in context] == [job_id, tenant, "ticker", 2], line
    assert [by_event(lines, "nested")[k] for k in context] == ["J4", "tenant-d", "batch", 3]
    assert [by_event(lines, "outer again")[k] for k in context] == ["J3", "tenant-c", "generate", 1]


@pytest.mark.timeout(30)
def test_a_terminal_gets_the_console_view_still_redacted() -> None:
    out = run(
        """
        configure_logging(secrets=SECRETS)   # json=None: stderr is a terminal here
        logging.getLogger("pushsvc.cli").warning("hello with %s", SECRETS[0])
        """,
        tty=True,
    )
    assert "hello with" in out and REDACTED in out and "pushsvc.cli" in out
    assert_no_secret(out)
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.strip().splitlines()[-1])


@pytest.mark.timeout(30)
def test_json_false_gives_the_console_view_and_json_true_wins_on_a_terminal() -> None:
    console = run('configure_logging(json=False); logging.getLogger("a").warning("plain")')
    assert "plain" in console and not console.lstrip().startswith("{")
    forced = run('configure_logging(json=True); logging.getLogger("a").warning("x")', tty=True)
    assert json_lines(forced)[0]["event"] == "x"


@pytest.mark.timeout(30)
def test_level_filters_and_configuring_again_replaces_rather_than_duplicates() -> None:
    out = run(
        """
        configure_logging("INFO", json=True)
        configure_logging("WARNING", json=True, secrets=SECRETS)
        logging.getLogger("x").info("dropped")
        get_logger("x").debug("dropped too")
        logging.getLogger("x").warning("kept %s", SECRETS[0])
        try:
            configure_logging("LOUD")
        except ValueError as exc:
            logging.getLogger("x").error("refused %s: %s", SECRETS[0], exc)
        """
    )
    lines = json_lines(out)
    assert [line["event"] for line in lines] == [
        f"kept {REDACTED}",
        f"refused {REDACTED}: unknown log level 'LOUD'",  # the bad call changed nothing
    ]


@pytest.mark.timeout(30)
def test_warnings_and_uncaught_exceptions_are_structured_and_redacted() -> None:
    argv_code = """
        import warnings
        configure_logging(json=True, secrets=SECRETS)
        warnings.warn("deprecated thing " + SECRETS[1], DeprecationWarning, stacklevel=1)
        raise SystemError("crashed holding " + SECRETS[0])
        """
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", PRELUDE + textwrap.dedent(argv_code)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1
    assert_no_secret(done.stderr)
    lines = json_lines(done.stderr)
    warned = by_event(lines, "deprecated thing")
    assert warned["logger"] == "py.warnings" and REDACTED in warned["event"]
    crash = by_event(lines, "uncaught exception")
    assert crash["level"] == "critical"
    assert f"SystemError: crashed holding {REDACTED}" in crash["exception"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"GET /x?token={TOKEN}", f"GET /x?token={REDACTED}"),
        ("a=1&access_token=abc.def&b=2", f"a=1&access_token={REDACTED}&b=2"),
        ("authorization: Bearer abc.DEF-123", f"authorization: Bearer {REDACTED}"),
        ("Authorization: Basic dXNlcjpwYXNz", f"Authorization: {REDACTED}"),
        ("{'authorization': 'k-1'}", f"{{'authorization': '{REDACTED}'}}"),
        (f"{TOKEN}", REDACTED),
        ("jwt aaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbb.cccccccccccccccccccc", f"jwt {REDACTED}"),
        (f"x{API_KEY}y and {SECRET}", f"x{REDACTED}y and {REDACTED}"),
        ("pushsvc.access uvicorn.error arq.worker", "pushsvc.access uvicorn.error arq.worker"),
        (f"{JOB_ID}.deadbeef", f"{JOB_ID}.deadbeef"),
        ("10.0.0.12:6379 v1.2.3 README.md", "10.0.0.12:6379 v1.2.3 README.md"),
    ],
    # Named: a stream token holds the time it was made, and the two test processes
    # (xdist) must collect the same names.
    ids=[
        "token-in-query",
        "access-token",
        "bearer",
        "basic",
        "authorization-field",
        "token-alone",
        "jwt",
        "key-and-secret",
        "logger-names",
        "job-id",
        "addresses",
    ],  # fmt: skip
)
def test_redactor_masks_credentials_and_leaves_ordinary_text(text: str, expected: str) -> None:
    assert Redactor(SECRETS).text(text) == expected


def test_longest_secret_is_masked_whole() -> None:
    redact = Redactor(["abc", "abcdef"])
    assert redact.text("abcdef abc") == f"{REDACTED} {REDACTED}"


def test_settings_secrets_are_every_credential() -> None:
    settings = Settings.model_validate(
        {"api_keys": "k1=t1,k2=t2", "secret": "s", "PUSHSVC_LLM_API_KEY": "sk-1"}
    )
    assert sorted(settings_secrets(settings)) == ["k1", "k2", "s", "sk-1"]
    bare = Settings.model_validate({"api_keys": {}, "secret": "", "PUSHSVC_LLM_API_KEY": None})
    assert settings_secrets(bare) == []


# -- the real processes (these need the CLI and worker wiring) -------------------


@pytest.fixture(scope="module")
def logged_stack(redis_server: RedisServer) -> Iterator[dict[str, Any]]:
    """An API, a worker (at DEBUG: the model client's chattiest) and the offline model."""
    port = free_port()
    model = Proc(["fake-llm", "--port", str(port), "--tokens-per-s", "1000"], {}).start()
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/v1/models"), 20, "fake-llm")
    env = stack_env(
        redis_server.url,
        f"log{secrets.token_hex(3)}",
        llm_base_url=f"http://127.0.0.1:{port}/v1",
        llm_api_key=LLM_KEY,
        llm_model="fake-1",
    )
    worker = Proc(["worker"], {**env, "PUSHSVC_LOG_LEVEL": "DEBUG"}).start()
    api = Api([], env).start()
    yield {"api": api, "worker": worker, "model": model, "env": env}
    for proc in (api, worker, model):
        proc.stop()


@pytest.mark.timeout(60)
async def test_api_and_worker_write_only_json_lines_with_job_context_and_no_secret(
    logged_stack: dict[str, Any],
) -> None:
    api, worker = logged_stack["api"], logged_stack["worker"]
    headers = {"Authorization": "Bearer key-a"}
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        body = {"type": "generate", "payload": {"prompt": "say something", "max_tokens": 8}}
        resp = await http.post("/v1/jobs", json=body, headers=headers)
        assert resp.status_code == 202, resp.text
        job = resp.json()
        stream = await read(http, job["links"]["events"])  # ?token= in the URL
        assert stream.events[-1].kind == "completed", stream.events
        tenant_token = (await http.post("/v1/stream-tokens", headers=headers)).json()["token"]
        bad = await http.get(f"/v1/events?token={tenant_token}x")
        assert bad.status_code == 401
    api.stop()
    worker.stop()  # both flush and close their logs
    api_log, worker_log = api.output(), worker.output()
    env = logged_stack["env"]
    for text in (api_log, worker_log):
        for value in (env["PUSHSVC_SECRET"], LLM_KEY, tenant_token, job["links"]["events"]):
            assert value not in text
        for key in ("key-a", "key-b"):
            assert f"Bearer {key}" not in text
    api_lines, worker_lines = json_lines(api_log), json_lines(worker_log)
    assert any(line["logger"] == "uvicorn.error" for line in api_lines)
    access = [line for line in api_lines if line["logger"] == "pushsvc.access"]
    assert any(f"/v1/jobs/{job['id']}/events" in line["event"] for line in access), access
    in_job = [line for line in worker_lines if line.get("job_id") == job["id"]]
    assert in_job, "no worker line carries the job's context"
    for line in in_job:
        assert (line["tenant"], line["type"], line["attempt"]) == ("tenant-a", "generate", 1)
    assert any(line["logger"].startswith(("httpx", "openai")) for line in in_job), in_job
