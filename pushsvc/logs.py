"""Structured logs: one structlog pipeline for our loggers and every stdlib one (uvicorn,
arq, ``logging.getLogger(__name__)``), job context on each line, secrets redacted.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from .settings import Settings

REDACTED = "[redacted]"

# Stream tokens (auth.issue) are ``<base64url body>.<base64url signature>``; JWT-like
# values have a third part. Each part is long, so module names ("pushsvc.access"), hosts
# and arq ids ("<uuid>.<8 hex>") stay readable.
_TOKEN = re.compile(r"(?<![\w.-])[\w-]{16,}\.[\w-]{16,}(?:\.[\w-]{16,})?(?![\w-])")
_QUERY_TOKEN = re.compile(r"(?i)\b([\w-]*token=)[^&\s\"'<>]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[\w.~+/=-]+")
_AUTH_HEADER = re.compile(
    r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?)(?!bearer\s)(?:[a-z]+\s+)?[^\s\"',;}]+"
)
# What the three patterns above need, matched as they match it (case-insensitively):
# text without any of it is left as it is by all three.
_CREDENTIAL_HINT = re.compile(r"(?i)token=|bearer\s|authorization")
# Fields whose whole value is a credential, whatever it looks like.
SENSITIVE_KEYS = frozenset(
    {"token", "secret", "api_key", "apikey", "authorization", "password", "llm_api_key"}
)
# uvicorn repeats each message with ANSI colours in ``extra``: noise in a structured line.
_DROPPED_EXTRAS = ("color_message",)
_HANDLER_FLAG = "_pushsvc_handler"
KEY_CACHE = 1024  # redacted keys a Redactor remembers


class Redactor:
    """A processor that masks secrets and token-like values in every string, recursively."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._keys: dict[str, str] = {}  # key -> as redacted

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, REDACTED)
        # Each line passes here a dozen times (keys included): the patterns run only on
        # text holding what each needs, found in one pass (the access log's share of a
        # request's CPU was mostly these patterns).
        if _CREDENTIAL_HINT.search(value):
            value = _QUERY_TOKEN.sub(rf"\1{REDACTED}", value)
            value = _BEARER.sub(rf"\1{REDACTED}", value)
            value = _AUTH_HEADER.sub(rf"\1{REDACTED}", value)
        return _TOKEN.sub(REDACTED, value) if "." in value else value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes):
            return self.text(value.decode("utf-8", "replace"))
        if isinstance(value, Mapping):
            return {self._key(k): self._field(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v) for v in value]
        return value

    def _key(self, key: Any) -> Any:
        if not isinstance(key, str):
            return key
        masked = self._keys.get(key)
        if masked is None:
            masked = self.text(key)
            if len(self._keys) < KEY_CACHE:  # keys repeat (field names): remembered
                self._keys[key] = masked
        return masked

    def _field(self, key: str, value: Any) -> Any:
        if key.lower() in SENSITIVE_KEYS and isinstance(value, str | bytes) and value:
            return REDACTED
        return self.value(value)

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        return {self._key(k): self._field(str(k), v) for k, v in event_dict.items()}


def _drop_extras(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    for key in _DROPPED_EXTRAS:
        event_dict.pop(key, None)
    return event_dict


def _shared_processors() -> list[Processor]:
    """What every line gets, whether it came from structlog or from stdlib logging."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        _drop_extras,
        structlog.processors.StackInfoRenderer(),
    ]


def _level(level: str | int) -> int:
    number = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    return number


def configure_logging(
    level: str = "INFO", json: bool | None = None, secrets: Iterable[str] = ()
) -> None:
    """Send every log line to stderr through structlog: JSON lines, or a console view on a tty.

    ``secrets`` (API keys, the token secret, the model's API key) never appear in a line;
    neither do stream tokens, ``token=`` query values or bearer credentials. Calling it
    again replaces the earlier configuration.
    """
    number = _level(level)  # first: a bad level must not leave logging half-replaced
    as_json = not sys.stderr.isatty() if json is None else json
    shared = _shared_processors()
    _install_handler(_formatter(shared, as_json, Redactor(secrets)), number)
    # Warnings and crashes would otherwise print raw text (and whatever secret it holds).
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def _formatter(
    shared: list[Processor], as_json: bool, redactor: Redactor
) -> structlog.stdlib.ProcessorFormatter:
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Tracebacks become text before redaction: exception messages carry secrets too.
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
            redactor,
            renderer,
        ],
    )


def _install_handler(formatter: logging.Formatter, level: int) -> None:
    """One stderr handler on the root logger (replacing ours from an earlier call)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_FLAG, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_FLAG, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries that installed handlers of their own (uvicorn's default config) would print
    # unstructured, unredacted lines: their records go to the root handler instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq", "arq.worker"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C stays the usual short traceback
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("pushsvc").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def settings_secrets(settings: Settings) -> list[str]:
    """Every credential in ``settings``: what ``configure_logging(secrets=...)`` masks."""
    values = [*settings.api_keys, settings.secret.get_secret_value()]
    values += [k.get_secret_value() for k in settings.admin_keys]
    values.append(settings.metrics_token.get_secret_value())
    if settings.llm_api_key is not None:
        values.append(settings.llm_api_key.get_secret_value())
    return [v for v in values if v]


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger whose lines take the same path as stdlib ones."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


@contextlib.contextmanager
def bind_job(job_id: str, tenant: str, type_: str, attempt: int) -> Iterator[None]:
    """Every line logged inside (this task and tasks it starts) names the job."""
    with structlog.contextvars.bound_contextvars(
        job_id=job_id, tenant=tenant, type=type_, attempt=attempt
    ):
        yield
