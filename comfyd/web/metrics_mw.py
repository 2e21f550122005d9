"""Request counts and latencies per route template (bounded labels: never the raw path)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from comfyd.metrics import Metrics
from comfyd.web.errors import Handler


def metrics_middleware(metrics: Metrics):  # type: ignore[no-untyped-def]
    counters: dict[tuple[str, str, int], Any] = {}  # label children, looked up once (labels() takes a lock)
    latencies: dict[tuple[str, str], Any] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            key = (request.method, route)
            if (counter := counters.get((*key, status))) is None:
                counter = counters[(*key, status)] = metrics.http_requests.labels(
                    method=request.method, route=route, status=str(status))
            if (latency := latencies.get(key)) is None:
                latency = latencies[key] = metrics.http_latency.labels(method=request.method, route=route)
            counter.inc()
            latency.observe(time.perf_counter() - started)

    return middleware
