"""The ``pushsvc`` command: a thin shell that builds Settings and calls library functions.

Every flag can also be given as a ``PUSHSVC_*`` environment variable.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from .guard import is_loopback
from .logs import configure_logging, settings_secrets
from .settings import Settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
logger = logging.getLogger("pushsvc")

Host = Annotated[str | None, typer.Option(help="bind address [PUSHSVC_HOST]")]
Port = Annotated[int | None, typer.Option(help="port [PUSHSVC_PORT]")]
RedisUrl = Annotated[str | None, typer.Option(help="Redis URL [PUSHSVC_REDIS_URL]")]


def build_settings(**overrides: Any) -> Settings:
    """The settings, or a usage error (exit 2) naming each bad variable and what is wrong,
    without its value (a value may be a key or a password)."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            message = error["msg"].removeprefix("Value error, ")
            if error["loc"] and not message.startswith("PUSHSVC_"):
                message = f"PUSHSVC_{str(error['loc'][0]).upper()}: {message}"
            problems.append(message)
        raise typer.BadParameter("; ".join(problems)) from None


def _setup_logging(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_json, settings_secrets(settings))


def check_auth(settings: Settings) -> None:
    """No API keys: allowed on loopback only (one local tenant), refused elsewhere.

    With keys, a secret is required: every API process must verify the stream tokens
    any other one issued, or a client resuming on another process would be refused.
    """
    if settings.auth_enabled:
        if not settings.secret.get_secret_value():
            raise typer.BadParameter("PUSHSVC_API_KEYS is set: set PUSHSVC_SECRET too")
        return
    if not is_loopback(settings.host):
        raise typer.BadParameter(
            f"refusing to serve {settings.host} without API keys: set PUSHSVC_API_KEYS"
        )
    logger.warning("no PUSHSVC_API_KEYS: serving one local tenant without auth on loopback")


@cli.command()
def api(host: Host = None, port: Port = None, redis_url: RedisUrl = None) -> None:
    """Serve the HTTP API (uvicorn)."""
    from .app import create_app
    from .server import serve

    settings = build_settings(host=host, port=port, redis_url=redis_url)
    _setup_logging(settings)
    check_auth(settings)
    if not serve(create_app(settings), settings):
        raise typer.Exit(3)  # as uvicorn.run: the app did not start


@cli.command()
def worker(redis_url: RedisUrl = None) -> None:
    """Run a job worker (arq)."""
    from .worker import run_worker

    settings = build_settings(redis_url=redis_url)
    _setup_logging(settings)
    asyncio.run(run_worker(settings))


@cli.command()
def dev(host: Host = None, port: Port = None, redis_url: RedisUrl = None) -> None:
    """API + worker in one command, with an embedded Redis when none answers."""
    from .tools.dev import run_dev

    settings = build_settings(host=host, port=port, redis_url=redis_url)
    check_auth(settings)
    raise typer.Exit(run_dev(settings))


@cli.command("fake-llm")
def fake_llm(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8001,
    tokens_per_s: Annotated[float, typer.Option(help="how fast it writes")] = 50.0,
    answer_tokens: Annotated[
        int, typer.Option(min=1, max=100_000, help="words in an answer no [[tokens:N]] sets")
    ] = 40,
    rpm: Annotated[
        int, typer.Option(min=0, help="requests per window before it answers 429 (0: no limit)")
    ] = 0,
    rpm_window_s: Annotated[
        float, typer.Option(min=0.1, help="the window --rpm counts over, in seconds")
    ] = 60.0,
    reuse_port: Annotated[
        bool, typer.Option(help="share the port with other fake-llm processes (SO_REUSEPORT)")
    ] = False,
) -> None:
    """An offline OpenAI-compatible model: deterministic text, faults on request."""
    from .tools.fakellm import RequestWindow, run_fake_llm

    _setup_logging(build_settings())
    window = RequestWindow(rpm, rpm_window_s) if rpm else None
    run_fake_llm(host, port, tokens_per_s, answer_tokens, window, reuse_port)


@cli.command()
def submit(
    type_: Annotated[str, typer.Argument(metavar="TYPE", help="job type")],
    payload: Annotated[str, typer.Option(help="the payload, as JSON")] = "{}",
    follow: Annotated[bool, typer.Option(help="stream progress and text until the end")] = False,
    url: Annotated[str, typer.Option(envvar="PUSHSVC_URL", help="API base URL")] = (
        "http://127.0.0.1:8000"
    ),
    api_key: Annotated[str | None, typer.Option(envvar="PUSHSVC_API_KEY", help="API key")] = None,
) -> None:
    """Submit a job; with --follow, show its progress bar and streamed text."""
    from .tools.submit import submit_command

    raise typer.Exit(submit_command(type_, payload, follow, url, api_key))


@cli.command()
def bench(
    scenario: Annotated[
        str,
        typer.Argument(
            help="fanout | push-vs-poll | throughput | scaleout | chaos | neighbours"
            " | fairness | model-limits | queue-cost | token-latency | workers"
            " | redis-ceiling | cluster-publish"
        ),
    ],
    url: Annotated[
        str | None,
        typer.Option(
            envvar="PUSHSVC_BENCH_URL",
            help="API URL(s), comma-separated; default: start a private stack",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    streams: Annotated[int | None, typer.Option(help="open streams (fanout)")] = None,
    jobs: Annotated[int | None, typer.Option(help="jobs")] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes")] = None,
    clients: Annotated[int | None, typer.Option(help="clients or submitters")] = None,
    duration: Annotated[
        float | None, typer.Option(help="seconds measured (model-limits: the limit's window)")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(help="events per second per job (model-limits: the model's requests/s)"),
    ] = None,
    per_client: Annotated[
        int | None, typer.Option(help="jobs each client watches (push-vs-poll)")
    ] = None,
    minutes: Annotated[float | None, typer.Option(help="minutes of faults (chaos)")] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="fanout: also a peer server, in the same run (broadcaster)"),
    ] = None,
) -> None:
    """Load-test a stack (its own, unless given --url) and print the figures."""
    options = {
        "streams": streams,
        "jobs": jobs,
        "workers": workers,
        "clients": clients,
        "duration_s": duration,
        "rate": rate,
        "per_client": per_client,
        "minutes": minutes,
        "baseline": baseline,
    }
    raise typer.Exit(_run_bench(scenario, url, as_json, options))


def _run_bench(scenario: str, url: str | None, as_json: bool, options: dict[str, Any]) -> int:
    """The bench's command, imported only now: it needs psutil, the ``bench`` extra."""
    try:
        from .tools.bench.command import bench_command
    except ModuleNotFoundError as exc:
        if exc.name != "psutil":
            raise
        typer.echo("pushsvc bench needs psutil: pip install 'pushsvc[bench]'", err=True)
        raise typer.Exit(2) from None
    return bench_command(scenario, url, as_json, options)


def main() -> None:
    cli()
