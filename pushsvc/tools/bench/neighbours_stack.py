"""The stack ``pushsvc bench neighbours`` runs on: a private Redis, one API process and
workers that know the bench's job types, with three tenants (``KEYS``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..procs import wait_until
from .stack import private, stack_env, workers_seen

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
    with private("neighbours") as own:
        tenants = {key: key for key in KEYS.values()}
        env = stack_env(own.redis.url, tenants, job_modules="pushsvc.tools.bench.jobtypes")
        own.workers(workers, env)
        url, api = own.api(env)
        headers = {"Authorization": f"Bearer {KEYS['noisy']}"}
        wait_until(lambda: workers_seen(url, workers, headers), 30, f"{workers} workers up")
        log.print(f"bench: Redis :{own.redis.port}, API {url}, {workers} worker(s)")
        yield Stack(url, api.pid, Path(own.workdir, "api.log"))
