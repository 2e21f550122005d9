"""The app's one middleware: every request is counted and timed, let in only with a key, and any error it
raises becomes a JSON body. One layer on purpose: aiohttp runs each middleware as a coroutine of its own per
request, and on the submit path three of them cost more than the key check itself."""

from __future__ import annotations

import time

from aiohttp import web

from comfyd.web.auth import ApiKeyGate
from comfyd.web.errors import Handler, response_for
from comfyd.web.metrics_mw import RequestMetrics


def edge_middleware(metrics: RequestMetrics, gate: ApiKeyGate):  # type: ignore[no-untyped-def]
    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = gate.refuse(request)
            if response is None:
                try:
                    response = await handler(request)
                except Exception as exc:  # noqa: BLE001 - every error gets its body; redirects pass on
                    response = response_for(request, exc)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.record(request, status, time.perf_counter() - started)

    return edge
