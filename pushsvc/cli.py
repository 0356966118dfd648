"""The ``pushsvc`` command: a thin shell that builds Settings and calls library functions.

Every flag can also be given as a ``PUSHSVC_*`` environment variable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Annotated, Any

import typer

from .settings import Settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
logger = logging.getLogger("pushsvc")

Host = Annotated[str | None, typer.Option(help="bind address [PUSHSVC_HOST]")]
Port = Annotated[int | None, typer.Option(help="port [PUSHSVC_PORT]")]
RedisUrl = Annotated[str | None, typer.Option(help="Redis URL [PUSHSVC_REDIS_URL]")]


def build_settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    import uvicorn

    from .app import create_app

    _setup_logging()
    settings = build_settings(host=host, port=port, redis_url=redis_url)
    check_auth(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,  # ours (app.AccessLog) leaves out query strings, and so tokens
    )


@cli.command()
def worker(redis_url: RedisUrl = None) -> None:
    """Run a job worker (arq)."""
    from .worker import run_worker

    _setup_logging()
    asyncio.run(run_worker(build_settings(redis_url=redis_url)))


@cli.command()
def dev(host: Host = None, port: Port = None, redis_url: RedisUrl = None) -> None:
    """API + worker in one command, with an embedded Redis when none answers."""
    from .dev import run_dev

    settings = build_settings(host=host, port=port, redis_url=redis_url)
    check_auth(settings)
    raise typer.Exit(run_dev(settings))


@cli.command("fake-llm")
def fake_llm(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8001,
    tokens_per_s: Annotated[float, typer.Option(help="how fast it writes")] = 50.0,
) -> None:
    """An offline OpenAI-compatible model: deterministic text, faults on request."""
    from .fakellm import run_fake_llm

    _setup_logging()
    run_fake_llm(host, port, tokens_per_s)


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
    from .client import submit_command

    raise typer.Exit(submit_command(type_, payload, follow, url, api_key))


def main() -> None:
    cli()
