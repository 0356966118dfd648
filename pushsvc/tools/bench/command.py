"""``pushsvc bench <scenario>``: the options, the stack a scenario runs on, the table.

Server-side costs come from the API processes' own accounting (psutil CPU and RSS) and
their ``/metrics``; client-side figures from the one asyncio loop that makes the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
from rich.console import Console
from rich.table import Table

from ...guard import is_loopback
from .chaos import chaos_command
from .cluster_publish import cluster_publish
from .fairness import fairness
from .load import Options, fanout, fanout_beside, scaleout, throughput
from .model_limits import model_limits
from .neighbours import neighbours
from .push_poll import push_vs_poll
from .queue_cost import queue_cost
from .redis_ceiling import redis_ceiling
from .stack import BASELINES, BenchError, Target, attach, own_stack, own_stack_with_baseline
from .token_latency import token_latency
from .worker_load import workers

DEFAULTS: dict[str, dict[str, float]] = {
    "fanout": {"streams": 1000, "jobs": 20, "workers": 1, "duration_s": 20, "rate": 1},
    "push-vs-poll": dict(clients=200, jobs=20, workers=1, duration_s=20, rate=1, per_client=1),
    "throughput": {"jobs": 3000, "workers": 2, "clients": 32},
    "scaleout": dict(jobs=3000, workers=2, clients=32, streams=1000, duration_s=20, rate=1),
    "chaos": {"minutes": 2},  # its own stack and report: chaos.py
    "neighbours": dict(streams=300, clients=300, jobs=4000, workers=1, duration_s=10),
    # duration_s: one job's length (a worker slot's time); fairness.py
    "fairness": dict(jobs=3000, workers=1, clients=32, duration_s=1),
    # rate: the model's requests a second, counted over duration_s (60 rpm); model_limits.py
    "model-limits": dict(jobs=120, workers=2, rate=1, duration_s=60),
    # rate: attempt starts a second while the line moves; queue_cost.py
    "queue-cost": dict(jobs=10000, streams=100, per_client=100, rate=10, duration_s=20),
    # streams: watchers in all; rate: the model's tokens/s per job for duration_s; tokens.py
    "token-latency": dict(jobs=100, streams=1000, rate=50, duration_s=10),
    # jobs: the last step (25, 50, 100, 200, 300 before it), all in one worker; worker_load.py
    "workers": dict(jobs=500, rate=30, duration_s=20),
    # jobs: the last paced step; rate: flushes/s per job; clients: load processes;
    # streams: pub/sub subscribers (API processes) in the second pass; redis_ceiling.py
    "redis-ceiling": dict(jobs=800, rate=10, clients=2, streams=4, duration_s=5),
    # jobs: publishing flat out (32 a load process at most); clients: load processes;
    # cluster_publish.py
    "cluster-publish": dict(jobs=64, clients=2, duration_s=10),
}
LIMITS = dict(
    streams=20000,
    jobs=100000,
    workers=16,
    clients=5000,
    duration_s=600,
    rate=50,
    per_client=100,
    minutes=30,
)
INTS = frozenset({"streams", "jobs", "workers", "clients", "per_client"})


def parse_options(scenario: str, given: dict[str, Any]) -> Options:
    """The scenario's defaults, overridden by the options given (None: not given)."""
    if scenario not in DEFAULTS:
        raise BenchError(f"unknown scenario {scenario!r}: one of {', '.join(DEFAULTS)}")
    values: dict[str, Any] = dict(DEFAULTS[scenario])
    for key, value in given.items():
        if value is None:
            continue
        if key not in values:
            raise BenchError(f"option {key!r} does not apply to {scenario}")
        if not 0 < float(value) <= LIMITS[key]:
            raise BenchError(f"{key} must be above 0 and at most {LIMITS[key]:g}")
        values[key] = value
    typed: dict[str, Any] = {k: int(v) if k in INTS else float(v) for k, v in values.items()}
    return Options(**typed)


def parse_urls(url: str | None) -> list[str] | None:
    """``--url``: one API base URL, or several separated by commas; loopback only."""
    if url is None:
        return None
    urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
    for u in urls:
        if not is_loopback(httpx.URL(u).host):
            raise BenchError(f"{u}: the bench only loads loopback addresses")
    if not urls:
        raise BenchError("--url names no API")
    return urls


def raise_fd_limit(need: int) -> None:
    """Lift the open-file limit to the hard limit (API processes we start inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if need > soft:
        raise BenchError(f"about {need} sockets need more than the open-file limit, {soft}")


SCENARIOS: dict[str, Callable[[Target, Options, Console], Awaitable[dict[str, Any]]]] = {
    "fanout": fanout,
    "push-vs-poll": push_vs_poll,
    "throughput": throughput,
}

TOKEN_PATH: dict[str, Callable[[Options, Console], dict[str, Any]]] = {
    "token-latency": token_latency,
    "workers": workers,
}


async def run_scenario(
    name: str, target: Target, o: Options, log: Console, own: bool
) -> dict[str, Any]:
    """Scenario ``name`` (a key of SCENARIOS, or scaleout) against ``target``; ``own``:
    a stack started for it, where scaleout also measures throughput via one API."""
    if name == "scaleout":
        return await scaleout(target, o, log, single=own)
    return await SCENARIOS[name](target, o, log)


# The scenarios that bring their own stack, never another's (--url): each with what it
# brings (the error says).
OWN_STACK: dict[str, tuple[Callable[[Options, Console], dict[str, Any]], str]] = {
    "fairness": (fairness, "stacks"),  # two tenants, fair share on and off
    "model-limits": (model_limits, "stack"),  # a rate-limited model
    "queue-cost": (queue_cost, "stack"),  # no worker while the jobs queue up
    "redis-ceiling": (redis_ceiling, "Redis"),  # and load processes, no API or worker
    "cluster-publish": (cluster_publish, "Redis and cluster"),  # and load processes
    **{name: (fn, "stack") for name, fn in TOKEN_PATH.items()},  # a model stamping tokens
}


def run(scenario: str, urls: list[str] | None, o: Options, log: Console) -> dict[str, Any]:
    """The scenario's figures, on a private stack unless ``urls`` name running APIs."""
    head = {
        "scenario": scenario,
        "stack": "own" if urls is None else "url",
        "params": {k: getattr(o, k) for k in DEFAULTS[scenario]},
    }
    if scenario == "neighbours":  # its own stack: three tenants (neighbours.py)
        return {**head, **neighbours(urls, o, log)}
    if scenario in OWN_STACK:
        scenario_fn, brings = OWN_STACK[scenario]
        if urls is not None:
            raise BenchError(f"{scenario} runs on its own {brings} (no --url)")
        return {**head, **scenario_fn(o, log)}
    if urls is not None:
        return {**head, **asyncio.run(run_scenario(scenario, attach(urls), o, log, own=False))}
    with own_stack(2 if scenario == "scaleout" else 1, o.workers, log) as target:
        return {**head, **asyncio.run(run_scenario(scenario, target, o, log, own=True))}


def check_baseline(name: str | None, scenario: str, urls: list[str] | None, o: Options) -> None:
    """``--baseline``: a known peer, for fanout on its own stack, two streams at least."""
    if name is None:
        return
    if name not in BASELINES:
        raise BenchError(f"unknown baseline {name!r}: one of {', '.join(BASELINES)}")
    if scenario != "fanout" or urls is not None:
        raise BenchError("--baseline runs with fanout, on its own stack (no --url)")
    if o.streams < 2:
        raise BenchError("--baseline splits the streams between two servers: 2 at least")


def run_beside(name: str, o: Options, log: Console) -> dict[str, Any]:
    """fanout on a private stack, half its streams to pushsvc's API and half to the
    baseline server ``name`` at once: the same jobs, load and noise for both (load.py)."""
    head = {
        "scenario": "fanout",
        "stack": "own",
        "params": {**{k: getattr(o, k) for k in DEFAULTS["fanout"]}, "baseline": name},
    }
    with own_stack_with_baseline(name, o.workers, log) as (target, peer):
        return {**head, **asyncio.run(fanout_beside(target, peer, name, o, log))}


def _rows(result: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in result.items():
        if isinstance(value, dict):
            yield from _rows(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render(result: dict[str, Any]) -> Table:
    table = Table(title=f"pushsvc bench {result['scenario']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in _rows(result):
        if key != "scenario":
            table.add_row(key, _fmt(value))
    return table


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 6) if isinstance(value, float) else value


def bench_command(scenario: str, url: str | None, as_json: bool, options: dict[str, Any]) -> int:
    """``pushsvc bench``: the table (on stderr with --json) and, with --json, one JSON
    object on stdout. Options: streams, jobs, workers, clients, duration_s, rate, minutes;
    baseline (fanout): a peer server measured in the same run."""
    log = Console(stderr=True)
    options = dict(options)
    baseline = options.pop("baseline", None)
    try:
        opts = parse_options(scenario, options)
        urls = parse_urls(url)
        check_baseline(baseline, scenario, urls, opts)
        raise_fd_limit(opts.streams + opts.clients + 200)
    except BenchError as exc:
        log.print(f"pushsvc bench: {exc}", markup=False)
        return 2
    if scenario == "chaos":
        return chaos_command(opts.minutes, urls, as_json, log)
    try:
        if baseline is None:
            result = run(scenario, urls, opts, log)
        else:
            result = run_beside(baseline, opts, log)
    except (BenchError, httpx.HTTPError, psutil.Error, OSError) as exc:
        log.print(f"pushsvc bench {scenario} failed: {exc}", markup=False)
        return 1
    Console(stderr=as_json).print(render(result))
    if as_json:
        print(json.dumps(_rounded(result)), flush=True)
    return 0
