"""Request counts and latencies per route template (bounded labels: never the raw path)."""

from __future__ import annotations

import time

from aiohttp import web

from comfyd.metrics import Metrics
from comfyd.web.errors import Handler


def metrics_middleware(metrics: Metrics):  # type: ignore[no-untyped-def]
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
            metrics.http_requests.labels(method=request.method, route=route, status=str(status)).inc()
            metrics.http_latency.labels(method=request.method, route=route).observe(time.perf_counter() - started)

    return middleware
