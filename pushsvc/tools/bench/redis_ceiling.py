"""``pushsvc bench redis-ceiling``: how many events a second one Redis takes through the
publish script (``lua/publish_fn.lua``) before it saturates, and its CPU per event.

A private ``redis-server``; ``clients`` load processes (redis_load.py: each its own
event loop and connection pool, like a worker) create and start ``jobs`` jobs and then
publish as a worker's flush does: one call with two events in it, a ``progress`` and
an ``output`` (an *event* is one of them: a seq, a log entry, a PUBLISH to each channel).
Steps of more and more jobs at ``rate`` flushes a second each, until the offered rate is
no longer kept up, then flat out; all of it once with no subscriber and once with ``streams``
pub/sub connections subscribed to every job's channel (API processes: one each, events.py).
Per step: events/s, Redis's CPU (``INFO cpu``) per second and per event, its time inside
the script (``INFO commandstats``) per event, the load processes' CPU, and a publish call's
p50/p99 (per call: two events).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil  # type: ignore[import-untyped]
from redis import Redis
from rich.console import Console

from ...keys import Keys
from ..procs import wait_until
from .load import Options, pct
from .redis_load import CALLS_PER_FLUSH, EVENTS_PER_CALL, TENANT, Loads, load_processes
from .stack import BenchError, cpu_seconds, private

FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)  # of ``jobs``: the paced steps
SATURATED = 0.9  # kept up: at least this share of the offered rate; busy: of a core
MAX_CLIENTS, MAX_SUBSCRIBERS = 16, 64
EVENTS_PER_FLUSH = CALLS_PER_FLUSH * EVENTS_PER_CALL
START_S = 0.5  # a step starts this long after it is sent: every load process has it


# -- subscribers: API processes' pub/sub connections ------------------------------------

MESSAGE = b"*3\r\n$7\r\nmessage\r\n"  # a RESP2 pub/sub message's head (JSON has no CRLF)


class Subscriber:
    """A raw pub/sub connection subscribed to ``channels`` that counts the messages it
    reads (a thread reading a socket: as little CPU as a subscriber can take from the
    2 cores Redis and the load share, so Redis's side is what is measured)."""

    def __init__(self, port: int, channels: list[str]) -> None:
        self.messages = 0
        self._sock = socket.create_connection(("127.0.0.1", port))
        words = [b"SUBSCRIBE", *(c.encode() for c in channels)]
        head = b"*%d\r\n" % len(words)
        self._sock.sendall(head + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        tail = b""
        keep = len(MESSAGE) - 1  # a head split between two reads is counted once
        with contextlib.suppress(OSError):
            while chunk := self._sock.recv(1 << 20):
                data = tail + chunk
                self.messages += data.count(MESSAGE)
                tail = data[-keep:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._sock.close()


def _numsub(redis: Redis, channel: str) -> int:
    reply: list[tuple[bytes, int]] = redis.pubsub_numsub(channel)  # type: ignore[assignment]
    return int(reply[0][1])


@contextlib.contextmanager
def subscribers(
    count: int, port: int, redis: Redis, channels: list[str]
) -> Iterator[list[Subscriber]]:
    """``count`` subscribers of every channel, once Redis has them all subscribed."""
    subs: list[Subscriber] = []
    try:
        subs += [Subscriber(port, channels) for _ in range(count)]
        # One SUBSCRIBE each, run whole: its last channel subscribed, all of them are.
        last = channels[-1]
        wait_until(lambda: _numsub(redis, last) >= count, 30, f"{count} subscribers subscribed")
        yield subs
    finally:
        for sub in subs:
            sub.close()


# -- measuring ----------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    at: float  # monotonic seconds
    redis_cpu: float  # seconds, user + system
    calls: int  # publish script calls (EVALSHA), EVENTS_PER_CALL events each
    script_us: int  # time inside them
    publishes: int  # PUBLISH commands (the script's, two an event: job's and tenant's)
    load_cpu: float  # the load processes' CPU seconds
    usec: dict[str, int]  # time in each command (those the script calls too)
    machine: tuple[float, float]  # CPU seconds of all cores: busy, in all


class Meter:
    def __init__(self, redis: Redis, loads: Loads) -> None:
        self.redis, self.loads = redis, loads

    def read(self) -> Reading:
        cpu: dict[str, Any] = self.redis.info("cpu")  # type: ignore[assignment]
        stats: dict[str, Any] = self.redis.info("commandstats")  # type: ignore[assignment]
        script = stats.get("cmdstat_evalsha", {})
        return Reading(
            time.monotonic(),
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            int(script.get("calls", 0)),
            int(script.get("usec", 0)),
            int(stats.get("cmdstat_publish", {}).get("calls", 0)),
            cpu_seconds(self.loads.pids) or 0.0,
            {k[8:]: int(v["usec"]) for k, v in stats.items() if k.startswith("cmdstat_")},
            _machine(),
        )


def _machine() -> tuple[float, float]:
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return sum(times) - idle, sum(times)


def _figures(before: Reading, after: Reading, took: list[float]) -> dict[str, Any]:
    """A window's figures: per event (a call is EVENTS_PER_CALL of them) unless named
    per call."""
    span = after.at - before.at
    calls = after.calls - before.calls
    events = max(1, calls * EVENTS_PER_CALL)
    redis_cpu = after.redis_cpu - before.redis_cpu
    busy, total = (a - b for a, b in zip(after.machine, before.machine, strict=True))
    ms = [t * 1000 for t in took]
    return {
        "events_per_s": round(calls * EVENTS_PER_CALL / span, 1),
        "calls_per_s": round(calls / span, 1),
        "redis_cpu_s_per_s": round(redis_cpu / span, 3),
        "redis_us_per_event": round(redis_cpu / events * 1e6, 2),
        "redis_script_us_per_event": round((after.script_us - before.script_us) / events, 2),
        "load_cpu_s_per_s": round((after.load_cpu - before.load_cpu) / span, 3),
        # Of all cores, by anything (the load, Redis, the subscribers, other processes).
        "machine_busy": round(busy / max(1e-9, total), 3),
        # A publish call's round trip, both its events: the worker waits on the call.
        "publish_call_p50_ms": pct(ms, 0.5),
        "publish_call_p99_ms": pct(ms, 0.99),
        "calls_sent": len(took),
    }


def _step(loads: Loads, meter: Meter, jobs: int, o: Options) -> dict[str, Any]:
    """One step: ``jobs`` jobs at ``o.rate`` flushes a second (0 jobs: flat out)."""
    rate = o.rate if jobs else 0.0
    start_at = time.time() + START_S
    publishing = loads.send(start_at, o.duration_s, jobs, rate)
    time.sleep(max(0.0, start_at - time.time()))  # the window opens with the step
    before = meter.read()
    time.sleep(o.duration_s)  # the measured window itself: nothing to await
    after = meter.read()
    took = [t for part in loads.answers() for t in part]
    row = {"jobs": publishing, **_figures(before, after, took)}
    if jobs:
        row["offered_events_per_s"] = offered = jobs * rate * EVENTS_PER_FLUSH
        row["kept_up"] = row["events_per_s"] >= SATURATED * offered
    return row


def _limit(row: dict[str, Any]) -> str:
    """What stopped the rate growing at ``row``."""
    if row["redis_cpu_s_per_s"] >= SATURATED:
        return "redis"
    if row["machine_busy"] >= SATURATED:
        return "cores (Redis, the load processes and anything else running share them)"
    return "neither (the load waits on round trips)"


def _phase(
    loads: Loads, meter: Meter, port: int, k: int, o: Options, log: Console
) -> dict[str, Any]:
    """Every step with ``k`` subscribers of every job's channel."""
    channels = [Keys(loads.namespace).job_channel(TENANT, j) for j in loads.job_ids]
    with subscribers(k, port, meter.redis, channels) as subs:
        first = meter.read()
        steps: dict[str, dict[str, Any]] = {}
        for jobs in sorted({max(1, round(o.jobs * f)) for f in FRACTIONS}):
            steps[str(jobs)] = row = _step(loads, meter, jobs, o)
            log.print(f"bench: {k} subscribers, {jobs} jobs: {_said(row)}")
            if not row["kept_up"]:
                break
        steps["flat_out"] = row = _step(loads, meter, 0, o)
        log.print(f"bench: {k} subscribers, flat out ({row['jobs']} jobs): {_said(row)}")
        last = meter.read()
        expected = (last.calls - first.calls) * EVENTS_PER_CALL  # one message an event
        result: dict[str, Any] = {"steps": steps, **_summary(steps, o)}
        result["script_commands_us_per_event"] = _inside(first, last)
        if k:
            result["messages_expected"] = expected
            result["messages_per_subscriber"] = _delivered(subs, expected)
    return result


def _inside(first: Reading, last: Reading) -> dict[str, float]:
    """The script's costliest commands: µs each takes per event (the rest of the
    script's time is Lua's own)."""
    events = max(1, (last.calls - first.calls) * EVENTS_PER_CALL)
    spent = {c: (u - first.usec.get(c, 0)) / events for c, u in last.usec.items()}
    top = sorted(spent.items(), key=lambda cu: -cu[1])
    return {c: round(us, 2) for c, us in top if c not in ("evalsha", "info") and us >= 0.5}


def _said(row: dict[str, Any]) -> str:
    return (
        f"{row['events_per_s']:,.0f} events/s, Redis {row['redis_cpu_s_per_s']:.2f} cores, "
        f"{row['redis_us_per_event']:.1f} µs/event, call p99 {row['publish_call_p99_ms']:.2f} ms"
    )


def _delivered(subs: list[Subscriber], expected: int) -> int:
    """The fewest messages a subscriber read, once all read ``expected`` (or 30 s)."""
    deadline = time.monotonic() + 30
    while min(s.messages for s in subs) < expected and time.monotonic() < deadline:
        time.sleep(0.05)  # Redis's writes to our own threads: nothing to await
    return min(s.messages for s in subs)


def _summary(steps: dict[str, dict[str, Any]], o: Options) -> dict[str, Any]:
    best = max(steps.values(), key=lambda r: r["events_per_s"])
    us = best["redis_us_per_event"]
    return {
        "max_events_per_s": best["events_per_s"],
        "redis_cpu_at_max": best["redis_cpu_s_per_s"],
        "redis_us_per_event": us,
        "limited_by": _limit(best),
        "one_core_events_per_s": round(1e6 / us) if us > 0 else None,
        # Jobs one Redis core carries at ``rate`` flushes a second (two events each).
        "one_core_jobs_at_rate": round(1e6 / (us * EVENTS_PER_FLUSH * o.rate)) if us > 0 else None,
    }


def _seq_events(redis: Redis, keys: Keys, job_ids: list[str]) -> int:
    """Events the jobs' sequences counted past their first two (created, started)."""
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(keys.job(TENANT, job_id), "seq")
        seqs = pipe.execute()
    return sum(int(s) - 2 for s in seqs)


def redis_ceiling(o: Options, log: Console) -> dict[str, Any]:
    """The scenario: its own Redis, the load processes, the steps with 0 and ``streams``
    subscribers, and the checks that every event was counted once."""
    if o.clients > MAX_CLIENTS or o.streams > MAX_SUBSCRIBERS:
        raise BenchError(f"at most {MAX_CLIENTS} clients and {MAX_SUBSCRIBERS} streams")
    if o.jobs < o.clients:
        raise BenchError("jobs: at least one a client (load process)")
    namespace = f"bench{secrets.token_hex(3)}"
    with private("redis-ceiling") as own, Redis.from_url(own.redis.url) as redis:
        with load_processes(own.redis.url, namespace, o.jobs, o.clients) as loads:
            log.print(f"bench: Redis :{own.redis.port}, {o.clients} load processes, {o.jobs} jobs")
            meter = Meter(redis, loads)
            first = meter.read()
            result: dict[str, Any] = {
                "cores": os.cpu_count(),
                "calls_per_flush": CALLS_PER_FLUSH,
                "events_per_call": EVENTS_PER_CALL,
            }
            for k in sorted({0, o.streams}):
                result[f"subscribers_{k}"] = _phase(loads, meter, own.redis.port, k, o, log)
            last = meter.read()
            result |= _per_delivery(result, o.streams)
            sent = sum(r["calls_sent"] for p in _phases(result) for r in p["steps"].values())
            result["check"] = {
                "calls_sent": sent,
                "events_sent": sent * EVENTS_PER_CALL,
                "redis_script_calls": last.calls - first.calls,
                "redis_publishes": last.publishes - first.publishes,
                "jobs_seq_events": _seq_events(redis, Keys(namespace), loads.job_ids),
            }
    return result


def _phases(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for k, v in result.items() if k.startswith("subscribers_")]


def _per_delivery(result: dict[str, Any], k: int) -> dict[str, float]:
    """What a subscriber adds to an event: Redis's CPU (flat out, ``k`` subscribers against
    none; noisy on a shared machine) and the time in PUBLISH alone (commandstats)."""
    with_k, alone = result[f"subscribers_{k}"], result["subscribers_0"]
    cpu = [float(p["steps"]["flat_out"]["redis_us_per_event"]) for p in (with_k, alone)]
    inside = [float(p["script_commands_us_per_event"].get("publish", 0)) for p in (with_k, alone)]
    return {
        "redis_us_per_delivery": round((cpu[0] - cpu[1]) / k, 2),
        "publish_us_per_delivery": round((inside[0] - inside[1]) / k, 2),
    }
