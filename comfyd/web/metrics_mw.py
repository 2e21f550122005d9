"""Request counts and latencies per route template (bounded labels: never the raw path)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from comfyd.metrics import Metrics


class RequestMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._counters: dict[tuple[str, str, int], Any] = {}  # label children, looked up once (labels() locks)
        self._latencies: dict[tuple[str, str], Any] = {}

    def record(self, request: web.Request, status: int, seconds: float) -> None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        method = request.method
        if (counter := self._counters.get((method, route, status))) is None:
            counter = self._counters[(method, route, status)] = self.metrics.http_requests.labels(
                method=method, route=route, status=str(status))
        if (latency := self._latencies.get((method, route))) is None:
            latency = self._latencies[(method, route)] = self.metrics.http_latency.labels(method=method, route=route)
        counter.inc()
        latency.observe(seconds)
