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

from pushsvc.tools.submit import submit_command

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
