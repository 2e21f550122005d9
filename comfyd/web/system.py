"""The root index, ``/health``, ``/metrics`` and ``/v1/comfyui/backends``."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from comfyd import __version__
from comfyd.web.keys import SERVICE

routes = web.RouteTableDef()

ENDPOINTS = {
    "comfyui": {
        "submitWorkflow": "POST /v1/comfyui/workflow",
        "getStatus": "GET /v1/comfyui/workflow/:id",
        "cancelWorkflow": "DELETE /v1/comfyui/workflow/:id",
        "listModels": "GET /v1/comfyui/models",
        "listOutputs": "GET /v1/comfyui/outputs",
        "getOutput": "GET /v1/comfyui/output/:filename",
        "deleteOutput": "DELETE /v1/comfyui/outputs/:filename",
        "listBackends": "GET /v1/comfyui/backends",
        "listGpus": "GET /v1/comfyui/gpus",
        "listWorkflows": "GET /v1/comfyui/workflows",
        "stream": "WS /v1/comfyui/stream",
    },
    "services": {"register": "POST /v1/services/register", "list": "GET /v1/services",
                 "deregister": "DELETE /v1/services/:name"},
    "health": "GET /health",
    "metrics": "GET /metrics",
}


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return web.json_response({"name": "comfyd", "version": __version__, "endpoints": ENDPOINTS})


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    snapshot = await service.ask_snapshot()
    backends_up = sum(1 for b in snapshot["backends"].values() if b["up"])
    status = "ok" if backends_up else "degraded"
    if not service.accepting:
        status = "draining"
    body = {"status": status, "version": __version__, "queued": snapshot["queued"],
            "running": snapshot["running"], "backendsUp": backends_up, "backends": len(snapshot["backends"])}
    if service.accepting:
        return web.json_response(body)
    return web.json_response(body, status=503, headers={"Retry-After": "10"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    registry = request.app[SERVICE].metrics.registry
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/v1/comfyui/backends")
async def backends(request: web.Request) -> web.Response:
    return web.json_response({"backends": request.app[SERVICE].backend_views()})
