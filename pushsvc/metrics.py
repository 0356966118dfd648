"""Prometheus metrics of one API process (each process exposes its own ``/metrics``)."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from .events import EventBus


def redis_connections(bus: EventBus, pool_in_use: int, pool_idle: int) -> int:
    return pool_in_use + pool_idle + (1 if bus.connected.is_set() else 0)


class ApiCollector(Collector):
    """Reads live counts at scrape time: nothing to keep in step."""

    def __init__(self, request_app: object) -> None:
        self._app = request_app

    def collect(self) -> Iterator[Metric]:
        svc = self._app.state.services  # type: ignore[attr-defined]
        bus: EventBus = svc.bus
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
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "pushsvc_events_delivered", "events routed to stream queues", value=bus.delivered
        )
        counters = {
            "pushsvc_redis_reconnects": ("pub/sub reconnects", max(0, bus.reconnects - 1)),
            "pushsvc_frames_merged": ("frames coalesced for slow readers", bus.stats.merged),
            "pushsvc_stream_resyncs": ("slow readers resynced", bus.stats.resyncs),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


def _tasks() -> int:
    return len(asyncio.all_tasks())


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")


def make_registry(app: object) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ApiCollector(app))
    return registry
