"""Prometheus metrics. Every process exposes its own: API processes at ``/metrics``,
workers on ``PUSHSVC_WORKER_METRICS_PORT``; scrape them all and sum by job type.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from .events import EventBus

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# A model's first token: a fast hosted model 0.2-1 s, a loaded one or a long prompt 5-30 s.
TTFT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60)
# Answer tokens a second: a local CPU model 5-20, hosted models 30-200, small fast ones more.
TOKENS_PER_S_BUCKETS = (5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


def redis_connections(bus: EventBus, pool_in_use: int, pool_idle: int) -> int:
    return pool_in_use + pool_idle + (1 if bus.connected.is_set() else 0)


class ApiMetrics:
    """An API process's instruments, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.submitted = Counter("pushsvc_jobs_submitted", "jobs accepted", ["type"], registry=r)
        self.latency = Histogram(
            "pushsvc_publish_to_delivery_seconds",
            "from the publish script's PUBLISH to the API routing the event",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = 0
        self.running = 0

    def observe_event(self, data: str) -> None:
        """Publish-to-delivery latency from the event's ``ts`` (read without a JSON parse)."""
        at = data.find('"ts":')
        if at >= 0:
            end = data.find(",", at)
            try:
                self.latency.observe(max(0.0, time.time() - float(data[at + 5 : end])))
            except ValueError:
                pass


class ApiCollector(Collector):
    """Counts read live at scrape time: nothing to keep in step."""

    def __init__(self, app: Any) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        svc = self._app.state.services
        bus: EventBus = svc.bus
        api: ApiMetrics = self._app.state.metrics
        pool = svc.redis.connection_pool
        in_use, idle = len(pool._in_use_connections), len(pool._available_connections)
        gauges = {
            "pushsvc_open_streams": ("SSE streams open in this process", bus.stream_count),
            "pushsvc_bus_channels": ("pub/sub channels subscribed", bus.channel_count),
            "pushsvc_asyncio_tasks": ("asyncio tasks alive in this process", _tasks()),
            "pushsvc_redis_connections": (
                "Redis connections held (pool + the one pub/sub connection)",
                redis_connections(bus, in_use, idle),
            ),
            "pushsvc_process_rss_bytes": ("resident memory now", _rss()),
            "pushsvc_stream_buffered_bytes": (
                "event bytes waiting in stream queues",
                bus.stats.buffered_bytes,
            ),
            "pushsvc_queue_depth": ("attempts waiting (ready + in backoff)", api.queue_depth),
            "pushsvc_running_jobs": ("attempts running on any worker", api.running),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "pushsvc_events_delivered": ("events routed to stream queues", bus.delivered),
            "pushsvc_redis_reconnects": ("pub/sub reconnects", max(0, bus.reconnects - 1)),
            "pushsvc_frames_merged": ("frames coalesced for slow readers", bus.stats.merged),
            "pushsvc_stream_resyncs": ("slow readers resynced", bus.stats.resyncs),
            "pushsvc_snapshot_reads": ("job snapshot reads sent for streams", svc.reads.reads),
            "pushsvc_snapshot_reads_joined": (
                "times a stream joined another's snapshot read instead",
                svc.reads.joined,
            ),
            "pushsvc_outbox_swept": (
                "attempts this process's sweeper queued: the process that made them died, or "
                "Redis failed, between the change and the hand-over to the queue",
                svc.outbox.swept,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


def _tasks() -> int:
    return len(asyncio.all_tasks())


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def make_api_metrics(app: Any) -> ApiMetrics:
    api = ApiMetrics()
    api.registry.register(ApiCollector(app))
    return api


async def metrics(request: Request) -> Response:
    api: ApiMetrics = request.app.state.metrics
    svc = request.app.state.services
    keys = svc.store.keys
    async with svc.redis.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.queue)
        pipe.zcard(keys.delayed)
        pipe.zcard(keys.leases)
        in_queue, delayed, api.running = await pipe.execute()
    # arq keeps a running attempt in its queue until it ends: those are not waiting.
    api.queue_depth = max(0, in_queue - api.running) + delayed
    return Response(generate_latest(api.registry), media_type="text/plain; version=0.0.4")


class WorkerMetrics:
    """A worker process's instruments (served by prometheus_client's own HTTP server)."""

    def __init__(self, models: Iterable[str] = ()) -> None:
        # The models a ``model`` label may name (the operator's: the default, priced and
        # limited ones); any other is "other": a payload's free text must not make series.
        self.models = frozenset(models)
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.outcomes = Counter(
            "pushsvc_jobs",
            "attempt outcomes: completed, failed, cancelled, retried",
            ["type", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "pushsvc_job_duration_seconds",
            "running time of completed jobs",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "pushsvc_job_queue_wait_seconds",
            "from submit (or retry) to start",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._llm_instruments(r)

    def _llm_instruments(self, r: CollectorRegistry) -> None:
        """Per model (the name a job asked for, as in PUSHSVC_LLM_PRICES): every finished
        call's time to first token, answer rate, tokens and cost."""
        self.llm_ttft = Histogram(
            "pushsvc_llm_ttft_seconds",
            "model calls: from the request to the first token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.llm_rate = Histogram(
            "pushsvc_llm_tokens_per_second",
            "model calls: answer tokens a second since the first token",
            ["model"],
            buckets=TOKENS_PER_S_BUCKETS,
            registry=r,
        )
        self.llm_tokens = Counter(
            "pushsvc_llm_tokens",
            "tokens of finished model calls, by kind: prompt, completion",
            ["model", "kind"],
            registry=r,
        )
        self.llm_cost = Counter(
            "pushsvc_llm_cost_usd",
            "what finished model calls cost, from PUSHSVC_LLM_PRICES (priced models only)",
            ["model"],
            registry=r,
        )

    def observe_llm(self, llm: dict[str, Any]) -> None:
        """One finished model call's telemetry (``models.LLMTelemetry``'s fields)."""
        model = llm["model"] if llm["model"] in self.models else "other"
        if llm["ttft_s"] is not None:
            self.llm_ttft.labels(model).observe(llm["ttft_s"])
        if llm["tokens_per_s"] is not None:
            self.llm_rate.labels(model).observe(llm["tokens_per_s"])
        self.llm_tokens.labels(model, "prompt").inc(llm["prompt_tokens"] or 0)
        self.llm_tokens.labels(model, "completion").inc(llm["completion_tokens"])
        if llm["cost_usd"] is not None:
            self.llm_cost.labels(model).inc(llm["cost_usd"])

    def serve(self, port: int, published: Any) -> None:
        """prometheus_client's own HTTP server (a thread), plus the live publish count."""
        self.registry.register(_PublishedCollector(published))
        start_http_server(port, registry=self.registry)


class _PublishedCollector(Collector):
    def __init__(self, store: Any) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "pushsvc_events_published", "events this worker published", value=self._store.published
        )
