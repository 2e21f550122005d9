"""The aiohttp application factory: routes, middlewares, and the service behind them."""

from __future__ import annotations

from aiohttp import web

from comfyd.web import (
    gpus,
    jobs_list,
    models,
    outputs,
    services,
    stream,
    system,
    workflows,
)
from comfyd.web.auth import ApiKeyGate
from comfyd.web.edge import edge_middleware
from comfyd.web.keys import SERVICE
from comfyd.web.metrics_mw import RequestMetrics


def create_app(service) -> web.Application:  # type: ignore[no-untyped-def]
    config = service.config
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[edge_middleware(RequestMetrics(service.metrics), ApiKeyGate(
            config.auth.api_keys, public_metrics=config.server.public_metrics,
            public_health=config.server.public_health))],
    )
    app[SERVICE] = service
    for table in (system.routes, workflows.routes, jobs_list.routes, outputs.routes, models.routes, stream.routes,
                  gpus.routes, services.routes):
        app.add_routes(table)
    return app
