"""``pushsvc submit`` (pushsvc/tools/submit.py): the command's output, exit codes, and
text printed as it arrives, against the shared stack.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from typing import Any

import httpx
import pytest

from pushsvc.tools.submit import job_note, line_words, llm_words, submit_command, wait_words

from ..golden import WORDS
from ..procs import ROOT

TICKER = "ticker"


def test_submit_command_follows_to_the_end(
    stack: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url = stack["api"].url
    code = submit_command("chatty", '{"chunks": 6, "size": 12}', True, url, "key-a")
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.match(r"^[0-9a-f-]{36}\n", out), out
    text = "".join(f"<{i}>".ljust(12, ".") for i in range(6))
    assert text in out.replace("\n", "")  # the streamed text, whole
    assert out.count("<0>") == 1  # once: not again in the result
    assert "completed" in out and '{"chunks": 6}' in out

    # Without --follow: the id only, at once.
    assert submit_command(TICKER, '{"steps": 1}', False, url, "key-a") == 0
    assert re.fullmatch(r"[0-9a-f-]{36}\n", capsys.readouterr().out)


def test_submit_command_exit_codes(
    stack: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url = stack["api"].url
    failing = '{"steps": 3, "interval_ms": 10, "fail_at_step": 2}'
    assert submit_command(TICKER, failing, True, url, "key-a") == 1
    assert "ticker failed at step 2" in capsys.readouterr().out
    assert submit_command(TICKER, "{not json", True, url, "key-a") == 2
    assert submit_command(TICKER, '{"steps": 0}', False, url, "key-a") == 1
    assert "payload" in capsys.readouterr().err
    assert submit_command(TICKER, "{}", False, url, "wrong-key") == 1
    assert "invalid_credentials" in capsys.readouterr().err


def test_pushsvc_submit_cli(stack: dict[str, Any]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PUSHSVC_API_KEY": "key-a"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pushsvc",
            "submit",
            TICKER,
            "--payload",
            '{"steps": 3}',
            "--follow",
            "--url",
            stack["api"].url,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "completed" in proc.stdout


@pytest.mark.timeout(60)
async def test_pushsvc_submit_follow_prints_text_as_it_arrives(stack: dict[str, Any]) -> None:
    """Was: only the bar moved; the text came at the end, broken mid-word, then again in
    the result. Now the first chunk is on stdout while the job still runs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PUSHSVC_API_KEY": "key-a"}
    payload = '{"chunks": 30, "size": 8, "interval_ms": 100}'
    args = ["submit", "chatty", "--payload", payload, "--follow", "--url", stack["api"].url]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pushsvc",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    job_id = (await proc.stdout.readline()).decode().strip()
    seen = b""
    while b"<0>" not in seen:
        chunk = await proc.stdout.read(64)
        assert chunk, f"stdout ended before any text: {seen!r}"
        seen += chunk
    async with httpx.AsyncClient(headers={"Authorization": "Bearer key-a"}) as http:
        job = (await http.get(f"{stack['api'].url}/v1/jobs/{job_id}")).json()
    assert job["status"] == "running", job  # the text came while the job ran
    seen += await proc.stdout.read()
    assert await proc.wait() == 0
    out = seen.decode()
    text = "".join(f"<{i}>".ljust(8, ".") for i in range(30))
    assert out.count(text) == 1, out  # whole, once


def test_waits_places_and_telemetry_in_the_consoles_words() -> None:
    """The words of web/page.js: tests/golden/words.json (tests/browser/test_web.py checks
    page.js against the same cases)."""
    now = WORDS["now"]
    assert [wait_words(given, now) for given, _ in WORDS["waits"]] == [
        said for _, said in WORDS["waits"]
    ]
    lines = [line_words(*given) for given, _ in WORDS["lines"]]
    assert lines == [said for _, said in WORDS["lines"]]
    assert [llm_words(given) for given, _ in WORDS["llm"] if given] == [
        said for given, said in WORDS["llm"] if given
    ]
    # The bar's note: the place in line counts down from when it was told.
    queued = {"status": "queued", "queue_position": 3, "starts_in_s": 12.0, "waiting": None}
    assert job_note(queued, now=1004, line_at=1000) == "3rd in line, starts in ~8 s"
    waiting = {**queued, "waiting": {"reason": "backoff", "until": 1010}}
    assert job_note(waiting, now=1004, line_at=1000) == "retrying in 6 s"


def test_submit_follow_says_a_retry_wait(
    stack: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A retryable failure: the wait before the next attempt is said in words."""
    payload = '{"steps": 3, "interval_ms": 10, "fail_at_step": 2, "fail_retryable": true, '
    payload += '"fail_attempts": 1}'
    code = submit_command(TICKER, payload, True, stack["api"].url, "key-a")
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"^retrying (now|in \d+ s)$", out, re.MULTILINE), out
    assert "completed" in out
