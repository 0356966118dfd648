"""What a chat request asks of the offline model, and its deterministic answer.

Reads the body and the directives of the last user turn (listed below) for fakellm.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

DEFAULT_TOKENS = 40
JSON_PIECE_CHARS = 8
CUT_AFTER_CHUNKS = 3  # content chunks a stream sends before a cutting fault, unless ``at=N``
MAX_DIRECTIVE = 100_000  # tokens and rate: keeps a typo from building a huge answer

# Directives, anywhere in the last user message (the header X-Fake-Fault: SPEC wins); none
# changes the answer's words, which come from the message without its directives:
#   [[tokens:N]]   answer N words (default 40, or the server's --answer-tokens; capped by
#                  max_tokens)
#   [[rate:N]]     write N tokens a second (0: unpaced)
#   [[finish:R]]   end with finish_reason R: stop, length, content_filter (the text stays
#                  whole), or none (no finish_reason at all; the stream still ends with [DONE])
#   [[no_usage]]   send no usage, as servers without ``stream_options`` do
#   [[stamp]]      in a stream, end each content piece with the server's clock when it was
#                  written (``<t:EPOCH_MS>``, see STAMP): benches measure token -> client
#   [[fault:SPEC]] where SPEC is NAME[:after=S][:times=K][:at=N], NAME one of FAULTS below;
#   ``after`` is a 429's retry hint (Retry-After, or "try again in S s" inside a stream),
#   ``times`` fails only the first K requests with that SPEC + message, ``at`` is how many
#   content chunks a stream sends before a cutting fault (default 3).
# FAULTS, in a stream (``stream: true``):
#   400 401 429 500 503   answer that status with OpenAI's error body
#   stall                 stop after the first content chunk for an hour
#   drop                  after ``at`` chunks, close the connection mid-response
#   truncate              after ``at`` chunks, end the response cleanly: no finish_reason,
#                         no usage, no [DONE]
#   stream_400 .. _503    after ``at`` chunks, the status's error body as an event inside the
#                         200 stream (``data: {"error": {...}}``, as OpenAI does), then the end
#   bad_chunk             after ``at`` chunks, half a chunk (not JSON), then the end
#   malformed             a JSON answer cut to a prefix that never parses (the stream is fine)
# Without ``stream``: stream_NNN answers status NNN, truncate a whole answer of ``at`` tokens
# with finish_reason null, bad_chunk a 200 whose body is not JSON.
_DIRECTIVE = re.compile(r"\[\[(tokens|rate|fault|finish|no_usage|stamp)(?::([^\]]*))?\]\]")
_KEYS_LINE = re.compile(r"^[ \t]*JSON keys:[ \t]*(.*)$", re.MULTILINE)
STATUS_FAULTS = frozenset({"400", "401", "429", "500", "503"})
STREAM_ERROR_FAULTS = frozenset(f"stream_{status}" for status in STATUS_FAULTS)
CUT_FAULTS = STREAM_ERROR_FAULTS | {"drop", "truncate", "bad_chunk"}
FAULTS = STATUS_FAULTS | CUT_FAULTS | {"stall", "malformed"}
FINISHES = frozenset({"stop", "length", "content_filter", "none"})
# A write time in a streamed piece ([[stamp]]): epoch milliseconds, to the microsecond.
STAMP = re.compile(r"<t:(\d+\.\d{3})>")

VOCAB = (
    "the quick model writes plain words for tests while jobs wait and browsers listen "
    "to every token that arrives over a stream of events from one small server on the "
    "local machine with no key no network and no cost so each answer stays the same "
    "until someone changes what they ask or how many tokens they want today"
).split()


class InvalidAsk(Exception):
    """A request this server cannot answer; becomes a 400 in OpenAI's error shape."""


@dataclass(frozen=True)
class Fault:
    spec: str
    name: str
    after_s: float = 1.0
    times: int | None = None
    at: int = CUT_AFTER_CHUNKS


@dataclass(frozen=True)
class Ask:
    """One chat request, read: its body's options and the directives of its last user turn."""

    model: str
    message: str  # the last user message as sent
    prompt: str  # the same without directives: the seed of the answer
    prompt_tokens: int
    stream: bool
    include_usage: bool
    max_tokens: int | None
    tokens: int
    rate: float
    json_keys: tuple[str, ...] | None
    fault: Fault | None
    finish: str | None = None  # [[finish:R]]
    no_usage: bool = False
    stamp: bool = False  # [[stamp]]


def parse_fault(spec: str) -> Fault:
    name, *options = spec.strip().split(":")
    if name not in FAULTS:
        raise InvalidAsk(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
    values: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        try:
            number = {"after": float, "times": int, "at": int}[key](value)
        except (KeyError, ValueError):
            number = -1
        if not 0 <= number < math.inf:
            raise InvalidAsk(f"bad fault option {option!r} in {spec!r}")
        values["after_s" if key == "after" else key] = number
    return Fault(spec=spec.strip(), name=name, **values)


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _number(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidAsk(f"bad directive [[{name}:{value}]]") from None
    if not 0 <= number <= MAX_DIRECTIVE or not math.isfinite(number):
        raise InvalidAsk(f"bad directive [[{name}:{value}]] (0 to {MAX_DIRECTIVE})")
    return number


def _finish(value: str | None) -> str | None:
    if value is not None and value not in FINISHES:
        raise InvalidAsk(f"bad directive [[finish:{value}]]; one of {', '.join(sorted(FINISHES))}")
    return value


def _max_tokens(body: dict[str, Any]) -> int | None:
    limits = [body.get("max_tokens"), body.get("max_completion_tokens")]
    ints = [v for v in limits if v is not None]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints):
        raise InvalidAsk("max_tokens must be a non-negative integer")
    return min(ints) if ints else None


def _json_keys(body: dict[str, Any], message: str) -> tuple[str, ...] | None:
    line = _KEYS_LINE.search(message)
    if line is not None:
        keys = tuple(k.strip() for k in line.group(1).split(",") if k.strip())
        return keys or ("name", "description")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        return ("name", "description")
    return None


def read_ask(
    body: object,
    fault_header: str | None,
    default_rate: float,
    default_tokens: int = DEFAULT_TOKENS,
) -> Ask:
    """Read a chat request's body and directives; raise InvalidAsk for what OpenAI refuses."""
    if not isinstance(body, dict):
        raise InvalidAsk("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidAsk("'messages' must be a non-empty array")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidAsk("you must provide a model parameter")
    turns = [m for m in messages if isinstance(m, dict)]
    users = [_text(m.get("content")) for m in turns if m.get("role") == "user"]
    message = users[-1] if users else ""
    directives = dict(_DIRECTIVE.findall(message))
    fault_spec = fault_header or directives.get("fault")
    stream_options = body.get("stream_options") or {}
    wants_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    return Ask(
        model=body["model"],
        message=message,
        prompt=_DIRECTIVE.sub("", message).strip(),
        prompt_tokens=max(1, sum(len(_text(m.get("content")).split()) for m in turns)),
        stream=bool(body.get("stream")),
        include_usage=wants_usage and "no_usage" not in directives,
        max_tokens=_max_tokens(body),
        tokens=int(_number("tokens", directives.get("tokens", str(default_tokens)))),
        rate=_number("rate", directives["rate"]) if "rate" in directives else default_rate,
        json_keys=_json_keys(body, message),
        fault=parse_fault(fault_spec) if fault_spec else None,
        finish=_finish(directives.get("finish")),
        no_usage="no_usage" in directives,
        stamp="stamp" in directives,
    )


def stamped(piece: str, now_s: float) -> str:
    """``piece`` carrying its write time ``now_s`` (epoch seconds) as a STAMP."""
    return f"{piece}<t:{now_s * 1000:.3f}>"


def stamps(text: str) -> list[float]:
    """The write times (epoch seconds) of the stamped pieces in ``text``, in order."""
    return [float(ms) / 1000 for ms in STAMP.findall(text)]


def words(seed: str, count: int) -> list[str]:
    """``count`` words from VOCAB, the same for the same seed on any machine and Python."""
    root = hashlib.sha256(seed.encode()).digest()
    picks = (hashlib.sha256(root + i.to_bytes(4, "big")).digest() for i in range(count))
    return [VOCAB[int.from_bytes(p[:4], "big") % len(VOCAB)] for p in picks]


def answer(ask: Ask, malformed: bool) -> tuple[list[str], str | None]:
    """The answer as token pieces, and its finish reason (``length`` when max_tokens cut it,
    or what ``[[finish:R]]`` says)."""
    if ask.json_keys is None and not malformed:
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words(ask.prompt, ask.tokens))]
    else:
        keys = ask.json_keys or ("name", "description")
        obj = {k: " ".join(words(f"{ask.prompt}\0{k}", 3)) for k in keys}
        text = json.dumps(obj)
        if malformed:  # a proper prefix of a JSON object never parses
            text = text[: max(1, len(text) * 2 // 3)]
        pieces = [text[i : i + JSON_PIECE_CHARS] for i in range(0, len(text), JSON_PIECE_CHARS)]
    finish: str | None = "stop"
    if ask.max_tokens is not None and len(pieces) > ask.max_tokens:
        pieces, finish = pieces[: ask.max_tokens], "length"
    if ask.finish is not None:
        finish = None if ask.finish == "none" else ask.finish
    return pieces, finish
