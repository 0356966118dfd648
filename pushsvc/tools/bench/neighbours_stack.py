"""The stack ``pushsvc bench neighbours`` runs on: a private Redis, one API process and
workers that know the bench's job types, with three tenants (``KEYS``)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..procs import RedisServer, free_port, spawn, stop_all, wait_until
from .stack import BenchError, stack_env, start_api, workers_seen

KEYS = {"noisy": "bench-noisy", "neighbour": "bench-neighbour", "lister": "bench-lister"}
LOG_MARKS = {
    "internal_errors": "Traceback",
    "response_already_started": "response already started",
    "pool_timeouts": "No connection available",
}


@dataclass
class Stack:
    url: str
    pid: int
    log: Path

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[who]}"}

    def log_marks(self) -> dict[str, int]:
        text = self.log.read_text(errors="replace")
        return {name: text.count(mark) for name, mark in LOG_MARKS.items()}


@contextlib.contextmanager
def neighbours_stack(workers: int, log: Console) -> Iterator[Stack]:
    """A private Redis, one API process (pool of 2, the default) and ``workers``
    workers that know the bench's job types, with three tenants."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("the neighbours bench needs redis-server on PATH")
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pushsvc-bench-"))
        redis = RedisServer(dir=workdir, exe=exe)
        redis.start()
        stack.callback(redis.kill)
        tenants = {key: key for key in KEYS.values()}
        env = stack_env(redis.url, tenants, job_modules="pushsvc.tools.bench.jobtypes")
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_all, procs)
        for i in range(workers):
            procs.append(spawn(["worker"], env, Path(workdir, f"worker{i}.log")))
        port, api_log = free_port(), Path(workdir, "api.log")
        procs.append(start_api(port, env, api_log))
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEYS['noisy']}"}
        wait_until(lambda: workers_seen(url, workers, headers), 30, f"{workers} workers up")
        log.print(f"bench: Redis :{redis.port}, API {url}, {workers} worker(s)")
        yield Stack(url, procs[-1].pid, api_log)
