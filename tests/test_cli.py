"""The ``pushsvc`` command: zero-setup ``dev`` and the refusal to serve without keys."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from pushsvc.cli import is_loopback

from .procs import ROOT, free_port, http_ok, wait_until


def test_api_refuses_a_public_address_without_keys() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSVC_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pushsvc", "api", "--host", "0.0.0.0", "--port", str(free_port())],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "PUSHSVC_API_KEYS" in proc.stderr


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def test_dev_starts_embedded_redis_and_runs_a_job(tmp_path: Path) -> None:
    """With no Redis answering, ``pushsvc dev`` brings its own and the stack works."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUSHSVC_", "OPENAI_"))}
    env.update(PUSHSVC_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", PUSHSVC_PORT=str(port))
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pushsvc", "dev"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: f"open {url}/" in log.read_text(), 30, "pushsvc dev")
        assert "using embedded Valkey" in log.read_text()
        wait_until(lambda: http_ok(f"{url}/readyz"), 30, "pushsvc dev")
        job = httpx.post(
            f"{url}/v1/jobs", json={"type": "ticker", "payload": {"steps": 2, "interval_ms": 10}}
        ).json()
        with httpx.Client(base_url=url) as http:
            # No SSE yet at this layer: the snapshot's Retry-After paces the poll.
            wait_until(
                lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "completed",
                30,
                "the job",
            )
            # No OPENAI_API_KEY: dev started the offline model and pointed the worker at it.
            ask = {"type": "generate", "payload": {"prompt": "hello [[tokens:5]]"}}
            gen = http.post("/v1/jobs", json=ask).json()
            wait_until(
                lambda: http.get(f"/v1/jobs/{gen['id']}").json()["status"] == "completed",
                30,
                "the generate job",
            )
            assert len(http.get(f"/v1/jobs/{gen['id']}").json()["result"]["text"].split()) == 5
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert proc.returncode == 0
    embedded = re.search(r"embedded Valkey at (redis://\S+)", log.read_text())
    assert embedded is not None
    with pytest.raises(redis.ConnectionError):  # stopped with the stack
        redis.Redis.from_url(embedded.group(1), socket_connect_timeout=1).ping()
